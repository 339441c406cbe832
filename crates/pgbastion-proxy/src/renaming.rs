//! Transaction pools: a session's protocol-level prepared statements live on whichever
//! upstream connection each transaction lands on.
//!
//! A named statement is prepared upstream under a name derived from its content (query and
//! parameter types): `pgbastion_` and 128 bits of SHA-256. The same statement of any session
//! is then one preparation per connection, and a connection that lacks it gets it prepared
//! just before the Bind or Describe that needs it; that ParseComplete is swallowed. A Parse
//! of a statement the connection already holds becomes a Close of a name that does not exist
//! (PostgreSQL answers CloseComplete, in order), whose answer the client gets as its
//! ParseComplete. A client's Close of a statement only forgets it: other sessions may use the
//! upstream statement. The unnamed statement keeps its name and is prepared again when a
//! later transaction on another connection binds it.

use bytes::{BufMut, BytesMut};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// A name no statement has: the target of the Close messages that stand in for a Parse or
/// for a client's Close.
pub(crate) const NO_STATEMENT: &str = "pgbastion_no_statement";

/// Upstream statements a connection may hold before it is closed rather than reused.
pub(crate) const MAX_STATEMENTS_PER_CONNECTION: usize = 2_000;

/// A client statement as the upstream knows it.
#[derive(Debug)]
pub(crate) struct Definition {
    /// The upstream name ("" for the unnamed statement).
    pub upstream: String,
    /// The Parse message that prepares it under that name, whole.
    pub parse: BytesMut,
}

impl Definition {
    /// From the body of a client's Parse message (name, query, parameter types).
    pub fn new(named: bool, query: &str, types: &[u8]) -> Arc<Definition> {
        let upstream = if named {
            let mut hash = Sha256::new();
            hash.update(query.as_bytes());
            hash.update([0]);
            hash.update(types);
            let digest = hash.finalize();
            format!("pgbastion_{}", hex::encode(&digest[..16]))
        } else {
            String::new()
        };
        let mut body = BytesMut::with_capacity(upstream.len() + query.len() + types.len() + 2);
        body.put_slice(upstream.as_bytes());
        body.put_u8(0);
        body.put_slice(query.as_bytes());
        body.put_u8(0);
        body.put_slice(types);
        let mut parse = BytesMut::with_capacity(body.len() + 5);
        parse.put_u8(b'P');
        parse.put_u32(body.len() as u32 + 4);
        parse.put_slice(&body);
        Arc::new(Definition { upstream, parse })
    }
}

/// The session's statements, by the client's names.
#[derive(Debug, Default)]
pub(crate) struct ClientStatements {
    named: HashMap<String, Arc<Definition>>,
    /// The unnamed statement and the connection (attach cycle) it was last prepared on.
    unnamed: Option<(Arc<Definition>, u64)>,
}

impl ClientStatements {
    pub fn define(&mut self, name: &str, definition: Arc<Definition>, cycle: u64) {
        if name.is_empty() {
            self.unnamed = Some((definition, cycle));
        } else {
            self.named.insert(name.to_string(), definition);
        }
    }

    pub fn forget(&mut self, name: &str) {
        if name.is_empty() {
            self.unnamed = None;
        } else {
            self.named.remove(name);
        }
    }

    /// What a Bind or Describe of `name` runs on the connection of attach `cycle`, and
    /// whether it must be prepared there first. None: a statement the session never defined
    /// (forwarded as is: the upstream answers 26000).
    pub fn lookup(
        &mut self,
        name: &str,
        cycle: u64,
        connection: &ConnectionStatements,
    ) -> Option<(Arc<Definition>, bool)> {
        if name.is_empty() {
            let (definition, prepared_in) = self.unnamed.as_mut()?;
            let missing = *prepared_in != cycle;
            *prepared_in = cycle;
            return Some((definition.clone(), missing));
        }
        let definition = self.named.get(name)?;
        let missing = !connection.holds(&definition.upstream);
        Some((definition.clone(), missing))
    }
}

/// The upstream statements of one connection (prepared, or Parse sent and not refused).
#[derive(Debug, Default)]
pub(crate) struct ConnectionStatements {
    names: HashSet<String>,
}

impl ConnectionStatements {
    pub fn holds(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn clear(&mut self) {
        self.names.clear();
    }
}

/// Answers the upstream owes for Parse and Close messages the proxy sent on a connection, in
/// order, so that injected ones are hidden and stand-ins are answered as the client expects.
#[derive(Debug, Default)]
pub(crate) struct Owed {
    /// One per Parse sent: (group, swallow the ParseComplete, upstream name it prepares).
    parses: VecDeque<(u64, bool, Option<String>)>,
    /// One per Close sent: (group, answer as ParseComplete).
    closes: VecDeque<(u64, bool)>,
}

impl Owed {
    /// A Parse sent upstream in `group`; `swallow`: injected, the client expects no answer.
    pub fn parse_sent(
        &mut self,
        group: u64,
        swallow: bool,
        upstream: &str,
        connection: &mut ConnectionStatements,
    ) {
        let name = (!upstream.is_empty()).then(|| upstream.to_string());
        if let Some(name) = &name {
            connection.names.insert(name.clone());
        }
        self.parses.push_back((group, swallow, name));
    }

    /// A Close sent upstream; `as_parse`: it stands in for a client's Parse.
    pub fn close_sent(&mut self, group: u64, as_parse: bool) {
        self.closes.push_back((group, as_parse));
    }

    /// A ParseComplete arrived: whether the client must not see it.
    pub fn parse_complete(&mut self) -> bool {
        self.parses
            .pop_front()
            .is_some_and(|(_, swallow, _)| swallow)
    }

    /// A CloseComplete arrived: whether the client gets it as a ParseComplete.
    pub fn close_complete(&mut self) -> bool {
        self.closes
            .pop_front()
            .is_some_and(|(_, as_parse)| as_parse)
    }

    /// ReadyForQuery ended `group`: what it skipped after an error never happened, so the
    /// statements those Parses would have prepared are not there.
    pub fn ready(&mut self, group: u64, connection: &mut ConnectionStatements) {
        while self.parses.front().is_some_and(|(g, _, _)| *g <= group) {
            if let Some((_, _, Some(name))) = self.parses.pop_front() {
                connection.names.remove(&name);
            }
        }
        while self.closes.front().is_some_and(|(g, _)| *g <= group) {
            self.closes.pop_front();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.parses.is_empty() && self.closes.is_empty()
    }
}

/// A Close of statement `name` (a stand-in when `name` is `NO_STATEMENT`).
pub(crate) fn close_message(name: &str, out: &mut BytesMut) {
    out.put_u8(b'C');
    out.put_u32(4 + 1 + name.len() as u32 + 1);
    out.put_u8(b'S');
    out.put_slice(name.as_bytes());
    out.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_name_depends_on_query_and_types_only() {
        let a = Definition::new(true, "SELECT $1", &[0, 1, 0, 0, 0, 23]);
        let b = Definition::new(true, "SELECT $1", &[0, 1, 0, 0, 0, 23]);
        let c = Definition::new(true, "SELECT $1", &[0, 1, 0, 0, 0, 25]);
        assert_eq!(a.upstream, b.upstream);
        assert_ne!(a.upstream, c.upstream);
        assert!(a.upstream.len() < 63);
        assert_eq!(Definition::new(false, "SELECT 1", &[0, 0]).upstream, "");
        // A whole Parse message: tag, length, name, query, types.
        let parse = &a.parse;
        assert_eq!(parse[0], b'P');
        assert_eq!(
            u32::from_be_bytes(parse[1..5].try_into().unwrap()) as usize,
            parse.len() - 1
        );
    }

    #[test]
    fn answers_after_an_error_are_forgotten_with_what_they_would_have_prepared() {
        let mut connection = ConnectionStatements::default();
        let mut owed = Owed::default();
        owed.parse_sent(0, true, "pgbastion_a", &mut connection);
        owed.parse_sent(0, false, "pgbastion_b", &mut connection);
        owed.close_sent(0, true);
        owed.parse_sent(1, false, "pgbastion_c", &mut connection);
        assert!(owed.parse_complete(), "the injected one is swallowed");
        // An error: b's ParseComplete and the Close's answer never come.
        owed.ready(0, &mut connection);
        assert!(connection.holds("pgbastion_a"));
        assert!(!connection.holds("pgbastion_b"));
        assert!(
            connection.holds("pgbastion_c"),
            "the next group's is still owed"
        );
        assert!(!owed.parse_complete());
        owed.ready(1, &mut connection);
        assert!(owed.is_empty());
        assert!(connection.holds("pgbastion_c"));
    }
}
