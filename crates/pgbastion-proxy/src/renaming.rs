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
    unnamed: Option<Arc<Definition>>,
}

impl ClientStatements {
    pub fn define(&mut self, name: &str, definition: Arc<Definition>) {
        if name.is_empty() {
            self.unnamed = Some(definition);
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

    /// What a Bind or Describe of `name` runs on `connection`, and whether it must be
    /// prepared there first. None: a statement the session has not defined; the caller sends
    /// `NO_STATEMENT` instead, so the upstream answers 26000 rather than running a statement
    /// another session left on the connection.
    pub fn lookup(
        &self,
        name: &str,
        connection: &ConnectionStatements,
    ) -> Option<(Arc<Definition>, bool)> {
        if name.is_empty() {
            let definition = self.unnamed.as_ref()?;
            let missing = !connection
                .unnamed
                .as_ref()
                .is_some_and(|held| Arc::ptr_eq(held, definition));
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
    /// Which session definition the connection's unnamed statement holds, if any is known:
    /// the unnamed statement outlives transactions, so it may be another session's.
    unnamed: Option<Arc<Definition>>,
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
        self.unnamed = None;
    }

    /// A simple Query or a refused Parse destroys the unnamed statement.
    pub fn lose_unnamed(&mut self) {
        self.unnamed = None;
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
        definition: &Arc<Definition>,
        connection: &mut ConnectionStatements,
    ) {
        if definition.upstream.is_empty() {
            connection.unnamed = Some(definition.clone());
        } else {
            connection.names.insert(definition.upstream.clone());
        }
        self.parses
            .push_back((group, swallow, Some(definition.upstream.clone())));
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
            match self.parses.pop_front() {
                // A failed unnamed Parse drops the unnamed statement too.
                Some((_, _, Some(name))) if name.is_empty() => connection.unnamed = None,
                Some((_, _, Some(name))) => {
                    connection.names.remove(&name);
                }
                _ => {}
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
        let named = |query: &str| Definition::new(true, query, &[0, 0]);
        let (a, b, c) = (named("SELECT 1"), named("SELECT 2"), named("SELECT 3"));
        let unnamed = Definition::new(false, "SELECT 4", &[0, 0]);
        owed.parse_sent(0, true, &a, &mut connection);
        owed.parse_sent(0, false, &b, &mut connection);
        owed.parse_sent(0, false, &unnamed, &mut connection);
        owed.close_sent(0, true);
        owed.parse_sent(1, false, &c, &mut connection);
        assert!(owed.parse_complete(), "the injected one is swallowed");
        // An error: b's and the unnamed ParseComplete and the Close's answer never come.
        owed.ready(0, &mut connection);
        assert!(connection.holds(&a.upstream));
        assert!(!connection.holds(&b.upstream));
        assert!(connection.unnamed.is_none());
        assert!(
            connection.holds(&c.upstream),
            "the next group's is still owed"
        );
        assert!(!owed.parse_complete());
        owed.ready(1, &mut connection);
        assert!(owed.is_empty());
        assert!(connection.holds(&c.upstream));
    }

    #[test]
    fn another_sessions_unnamed_statement_is_never_taken_for_ours() {
        let mut connection = ConnectionStatements::default();
        let mut owed = Owed::default();
        let mut ours = ClientStatements::default();
        let our_unnamed = Definition::new(false, "SELECT 1", &[0, 0]);
        ours.define("", our_unnamed.clone());
        // Another session parses its own unnamed statement on the connection.
        let theirs = Definition::new(false, "SELECT secret FROM payroll", &[0, 0]);
        owed.parse_sent(0, false, &theirs, &mut connection);
        let (definition, missing) = ours.lookup("", &connection).unwrap();
        assert!(Arc::ptr_eq(&definition, &our_unnamed));
        assert!(missing, "ours is prepared again before our Bind");
        owed.parse_sent(1, true, &definition, &mut connection);
        assert!(!ours.lookup("", &connection).unwrap().1);
        ours.forget("");
        assert!(ours.lookup("", &connection).is_none(), "after Close: 26000");
        assert!(ours.lookup("s1", &connection).is_none());
    }
}
