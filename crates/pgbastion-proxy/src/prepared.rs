//! The session's book of prepared statements: what each name may hold upstream, and under
//! which catalog snapshot the policy approved it.
//!
//! A Bind or EXECUTE of a statement approved under an older snapshot is decided again:
//! PostgreSQL re-plans it against the current definitions of the views it reads.
//! Protocol-level statements (Parse) and SQL PREPAREs share PostgreSQL's one namespace, so
//! they share the book.
//!
//! When a Parse, PREPARE, Close or DEALLOCATE is forwarded, the proxy cannot know yet whether
//! it will succeed upstream (a name in use, an earlier error in the pipeline that makes the
//! upstream skip it). So a name maps to every statement it may hold, and the upstream's
//! answers narrow that down: ParseComplete, CloseComplete, or a ReadyForQuery ending the
//! Query without an error. Re-deciding checks every candidate, so doubt fails closed.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// The most statements one name may be in doubt between; more are refused.
pub const MAX_CANDIDATES: usize = 16;
/// The most names one session may have prepared; more are refused.
pub const MAX_NAMES: usize = 10_000;

/// A statement the policy approved.
#[derive(Debug, Clone)]
pub struct Approved {
    /// How it was decided: b'P' (a Parse's query) or b'Q' (the Query that PREPAREd it).
    pub kind: u8,
    /// The catalog snapshot it was approved under (0: none).
    pub catalog: u64,
    /// Its text, what it reads and writes, and the policy version that approved it.
    pub about: Arc<About>,
    seq: u64,
}

/// What the audit log and metrics say about a statement that runs.
#[derive(Debug)]
pub struct About {
    pub text: Arc<str>,
    /// `text` redacted for the audit log, when the session redacted it already (in the same
    /// tokenizer pass as its decision key); else the audit writer redacts `text` if configured.
    pub redacted: Option<Arc<str>>,
    /// The prepared statement's name, for executions of one.
    pub statement: Option<String>,
    pub classes: Arc<[&'static str]>,
    pub relations: Arc<[String]>,
    pub policy: Arc<str>,
    pub policy_version: Arc<str>,
    /// It reads `currval`/`lastval` before it could set them, or it may set them (see
    /// `Effects`).
    pub reads_earlier_sequence_values: bool,
    pub sets_sequence_values: bool,
}

/// A forwarded message whose outcome is not known yet; `group` numbers the ReadyForQuery
/// that ends its Sync group or Query.
#[derive(Debug)]
struct Pending {
    group: u64,
    seq: u64,
    op: Op,
}

#[derive(Debug)]
enum Op {
    Parse(String),
    /// A Close of a statement (None: of a portal).
    Close(Option<String>),
    Prepare(String),
    /// None: DEALLOCATE ALL.
    Deallocate(Option<String>),
}

#[derive(Debug, Default)]
pub struct Book {
    names: HashMap<String, Vec<Approved>>,
    /// Forwarded Parse messages, oldest first: each ends in ParseComplete or an error.
    parses: VecDeque<Pending>,
    /// Forwarded Close messages: each ends in CloseComplete or is skipped after an error.
    closes: VecDeque<Pending>,
    /// PREPARE and DEALLOCATE in forwarded Queries: they took effect when the Query ends
    /// without an error (with one, they may or may not have).
    statements: VecDeque<Pending>,
    next_seq: u64,
    /// An ErrorResponse arrived since the last ReadyForQuery.
    error: bool,
    /// Set when the upstream's answers can no longer be paired with what was sent (a COPY
    /// FROM STDIN in the extended protocol swallows a Sync): from then on nothing is removed
    /// on the upstream's word, only added, so the book stays a superset.
    uncertain: bool,
}

impl Book {
    /// What `name` may hold: empty when the proxy approved nothing under that name.
    pub fn candidates(&mut self, name: &str) -> &mut [Approved] {
        self.names
            .get_mut(name)
            .map_or(&mut [], |c| c.as_mut_slice())
    }

    #[cfg(test)]
    pub fn knows(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// An approved Parse is forwarded. Err: the name is in doubt between too many statements.
    pub fn parse_sent(&mut self, group: u64, name: &str, approved: Approved) -> Result<(), ()> {
        let seq = self.add(name, approved)?;
        if name.is_empty() {
            // PostgreSQL drops the unnamed statement before parsing a new one, even one that fails.
            self.names
                .get_mut(name)
                .expect("just added")
                .retain(|a| a.seq == seq);
        }
        self.parses.push_back(Pending {
            group,
            seq,
            op: Op::Parse(name.to_string()),
        });
        Ok(())
    }

    /// A statement `name` may come to hold without the proxy learning whether it did (a
    /// PREPARE sent as a Parse runs when executed, if ever).
    pub fn possible(&mut self, name: &str, approved: Approved) -> Result<(), ()> {
        self.add(name, approved).map(|_| ())
    }

    /// A Close message is forwarded: 'S' for a statement, 'P' for a portal.
    pub fn close_sent(&mut self, group: u64, kind: u8, name: &str) {
        let seq = self.next();
        let name = (kind == b'S').then(|| name.to_string());
        self.closes.push_back(Pending {
            group,
            seq,
            op: Op::Close(name),
        });
    }

    /// An approved Query with PREPARE statements is forwarded.
    pub fn prepare_sent(&mut self, group: u64, name: &str, approved: Approved) -> Result<(), ()> {
        let seq = self.add(name, approved)?;
        self.statements.push_back(Pending {
            group,
            seq,
            op: Op::Prepare(name.to_string()),
        });
        Ok(())
    }

    /// An approved Query with DEALLOCATE is forwarded (None: DEALLOCATE ALL).
    pub fn deallocate_sent(&mut self, group: u64, name: Option<&str>) {
        let seq = self.next();
        self.statements.push_back(Pending {
            group,
            seq,
            op: Op::Deallocate(name.map(str::to_string)),
        });
    }

    /// ParseComplete: the oldest outstanding Parse succeeded, so its name did not hold
    /// anything before it (or was the unnamed statement, which it replaced).
    pub fn parse_complete(&mut self) {
        if self.uncertain {
            self.parses.pop_front();
            return;
        }
        if let Some(Pending {
            seq,
            op: Op::Parse(name),
            ..
        }) = self.parses.pop_front()
        {
            self.keep(&name, |a| a.seq >= seq);
        }
    }

    /// CloseComplete: the oldest outstanding Close succeeded.
    pub fn close_complete(&mut self) {
        if self.uncertain {
            self.closes.pop_front();
            return;
        }
        if let Some(Pending {
            seq,
            op: Op::Close(Some(name)),
            ..
        }) = self.closes.pop_front()
        {
            self.keep(&name, |a| a.seq > seq);
        }
    }

    pub fn error(&mut self) {
        self.error = true;
    }

    /// The upstream's answers may be misaligned from now on (see `uncertain`).
    pub fn uncertain(&mut self) {
        self.uncertain = true;
    }

    /// ReadyForQuery number `group`: what was still outstanding in that group did not happen,
    /// except PREPARE and DEALLOCATE after an error, which may have.
    pub fn ready(&mut self, group: u64) {
        if self.uncertain {
            self.parses.retain(|p| p.group > group);
            self.closes.retain(|p| p.group > group);
            self.statements.retain(|p| p.group > group);
            self.error = false;
            return;
        }
        while let Some(p) = self.parses.front() {
            if p.group > group {
                break;
            }
            if let Some(Pending {
                seq,
                op: Op::Parse(name),
                ..
            }) = self.parses.pop_front()
            {
                self.keep(&name, |a| a.seq != seq);
            }
        }
        while self.closes.front().is_some_and(|p| p.group <= group) {
            self.closes.pop_front();
        }
        while self.statements.front().is_some_and(|p| p.group <= group) {
            let Some(Pending { seq, op, .. }) = self.statements.pop_front() else {
                break;
            };
            if self.error {
                continue;
            }
            match op {
                Op::Prepare(name) => self.keep(&name, |a| a.seq >= seq),
                Op::Deallocate(Some(name)) => self.keep(&name, |a| a.seq > seq),
                Op::Deallocate(None) => {
                    let names: Vec<String> = self.names.keys().cloned().collect();
                    for name in names {
                        self.keep(&name, |a| a.seq > seq);
                    }
                }
                Op::Parse(_) | Op::Close(_) => {}
            }
        }
        self.error = false;
    }

    fn next(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn add(&mut self, name: &str, mut approved: Approved) -> Result<u64, ()> {
        if self.names.len() >= MAX_NAMES && !self.names.contains_key(name) {
            return Err(());
        }
        let candidates = self.names.entry(name.to_string()).or_default();
        if candidates.len() >= MAX_CANDIDATES && !name.is_empty() {
            return Err(());
        }
        self.next_seq += 1;
        approved.seq = self.next_seq;
        candidates.push(approved);
        Ok(self.next_seq)
    }

    fn keep(&mut self, name: &str, keep: impl Fn(&Approved) -> bool) {
        if let Some(candidates) = self.names.get_mut(name) {
            candidates.retain(keep);
            if candidates.is_empty() {
                self.names.remove(name);
            }
        }
    }
}

impl Approved {
    pub fn new(kind: u8, catalog: u64, about: Arc<About>) -> Approved {
        Approved {
            kind,
            catalog,
            about,
            seq: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(book: &mut Book, name: &str) -> Vec<String> {
        book.candidates(name)
            .iter()
            .map(|a| a.about.text.to_string())
            .collect()
    }

    fn approved(kind: u8, text: &str) -> Approved {
        let about = About {
            text: text.into(),
            redacted: None,
            statement: None,
            classes: Arc::new([]),
            relations: Arc::new([]),
            policy: "p".into(),
            policy_version: "1".into(),
            reads_earlier_sequence_values: false,
            sets_sequence_values: false,
        };
        Approved::new(kind, 1, Arc::new(about))
    }

    fn parse(book: &mut Book, group: u64, name: &str, text: &str) {
        book.parse_sent(group, name, approved(b'P', text)).unwrap();
    }

    #[test]
    fn a_named_parse_that_fails_leaves_the_old_statement() {
        let mut book = Book::default();
        parse(&mut book, 0, "s1", "SELECT 1");
        book.parse_complete();
        book.ready(0);
        // A second Parse of s1 fails upstream (42P05): until then both are possible.
        parse(&mut book, 1, "s1", "SELECT 2");
        assert_eq!(texts(&mut book, "s1"), ["SELECT 1", "SELECT 2"]);
        book.error();
        book.ready(1);
        assert_eq!(texts(&mut book, "s1"), ["SELECT 1"]);
    }

    #[test]
    fn a_named_parse_that_succeeds_replaces_statements_that_failed() {
        let mut book = Book::default();
        parse(&mut book, 0, "s1", "SELECT 1");
        parse(&mut book, 0, "s1", "SELECT 2");
        // The first Parse failed, so the second was skipped: nothing is left.
        book.error();
        book.ready(0);
        assert!(!book.knows("s1"));
        parse(&mut book, 1, "s1", "SELECT 3");
        book.parse_complete();
        book.ready(1);
        assert_eq!(texts(&mut book, "s1"), ["SELECT 3"]);
    }

    #[test]
    fn a_close_counts_once_confirmed_and_not_when_skipped() {
        let mut book = Book::default();
        parse(&mut book, 0, "s1", "SELECT 1");
        book.parse_complete();
        book.ready(0);
        // Skipped after an error: s1 is still there upstream.
        book.close_sent(1, b'S', "s1");
        book.error();
        book.ready(1);
        assert_eq!(texts(&mut book, "s1"), ["SELECT 1"]);
        // Close then Parse of the same name in one pipeline.
        book.close_sent(2, b'S', "s1");
        parse(&mut book, 2, "s1", "SELECT 2");
        assert_eq!(texts(&mut book, "s1"), ["SELECT 1", "SELECT 2"]);
        book.close_complete();
        book.parse_complete();
        book.ready(2);
        assert_eq!(texts(&mut book, "s1"), ["SELECT 2"]);
    }

    #[test]
    fn portal_closes_keep_the_order_of_statement_closes() {
        let mut book = Book::default();
        parse(&mut book, 0, "s1", "SELECT 1");
        book.parse_complete();
        book.close_sent(0, b'P', "p1");
        book.close_sent(0, b'S', "s1");
        book.close_complete();
        assert_eq!(texts(&mut book, "s1"), ["SELECT 1"]);
        book.close_complete();
        book.ready(0);
        assert!(!book.knows("s1"));
    }

    #[test]
    fn sql_prepare_and_deallocate_count_when_the_query_succeeds() {
        let mut book = Book::default();
        let q = |text: &str| approved(b'Q', text);
        book.prepare_sent(0, "p", q("PREPARE p AS SELECT 1"))
            .unwrap();
        book.error();
        book.ready(0);
        // After an error a PREPARE may have run: it stays a candidate.
        assert_eq!(texts(&mut book, "p"), ["PREPARE p AS SELECT 1"]);
        book.deallocate_sent(1, Some("p"));
        book.prepare_sent(1, "p", q("PREPARE p AS SELECT 2"))
            .unwrap();
        book.ready(1);
        assert_eq!(texts(&mut book, "p"), ["PREPARE p AS SELECT 2"]);
        book.deallocate_sent(2, None);
        book.ready(2);
        assert!(!book.knows("p"));
    }

    #[test]
    fn the_unnamed_statement_holds_only_the_last_parse() {
        let mut book = Book::default();
        parse(&mut book, 0, "", "SELECT 1");
        parse(&mut book, 0, "", "SELECT 2");
        assert_eq!(texts(&mut book, ""), ["SELECT 2"]);
    }

    #[test]
    fn a_name_in_doubt_between_too_many_statements_is_refused() {
        let mut book = Book::default();
        for i in 0..MAX_CANDIDATES {
            parse(&mut book, 0, "s", &format!("SELECT {i}"));
        }
        assert!(book
            .parse_sent(0, "s", approved(b'P', "SELECT 99"))
            .is_err());
    }
}
