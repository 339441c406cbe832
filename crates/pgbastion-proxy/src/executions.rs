//! Statements forwarded upstream, followed to their outcome: rows, SQLSTATE and duration go
//! to the audit log and the latency histogram.
//!
//! The client side queues one `Execution` per forwarded Query and Execute; the upstream side
//! completes them in order as CommandComplete, EmptyQueryResponse, PortalSuspended,
//! ErrorResponse and ReadyForQuery arrive. After an error the upstream skips the rest of the
//! pipeline up to Sync: what is left when ReadyForQuery arrives was skipped.

use crate::prepared::About;
use pgbastion_audit::{Event, StatementRecord, StatementStatus};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::time::Instant;

#[derive(Debug)]
pub struct Execution {
    /// The ReadyForQuery that ends its Query or Sync group.
    pub group: u64,
    /// "query" or "execute".
    pub kind: &'static str,
    pub started: Instant,
    /// None when nothing is audited (metrics only).
    pub about: Option<Arc<About>>,
    rows: Option<u64>,
    sqlstate: Option<String>,
    status: StatementStatus,
}

/// A completed execution.
#[derive(Debug)]
pub struct Finished {
    pub execution: Execution,
    pub ended: Instant,
}

impl Execution {
    pub fn new(group: u64, kind: &'static str, about: Option<Arc<About>>) -> Execution {
        Execution {
            group,
            kind,
            started: Instant::now(),
            about,
            rows: None,
            sqlstate: None,
            status: StatementStatus::Ok,
        }
    }

    /// The audit event, when the statement is audited.
    pub fn event(&self, ended: Instant) -> Option<Event> {
        let about = self.about.as_ref()?;
        Some(Event::Statement(StatementRecord {
            kind: self.kind,
            text: about.redacted.as_ref().unwrap_or(&about.text).clone(),
            redact: about.redacted.is_none(),
            statement: about.statement.clone(),
            classes: about.classes.clone(),
            relations: about.relations.clone(),
            decision: "allow",
            policy: about.policy.clone(),
            policy_version: about.policy_version.clone(),
            rule: None,
            message: None,
            status: self.status,
            duration_us: ended.duration_since(self.started).as_micros() as u64,
            rows: self.rows,
            sqlstate: self.sqlstate.clone(),
        }))
    }
}

/// The executions of one session awaiting their outcome, oldest first.
#[derive(Debug, Default)]
pub struct Executions {
    queue: VecDeque<Execution>,
}

impl Executions {
    pub fn push(&mut self, execution: Execution) {
        self.queue.push_back(execution);
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// The kind of the oldest execution still waiting in `group`.
    pub fn front_kind(&self, group: u64) -> Option<&'static str> {
        self.queue
            .front()
            .filter(|e| e.group == group)
            .map(|e| e.kind)
    }

    /// The session ended: what was still waiting is recorded with its outcome unknown.
    pub fn abandon(&mut self, done: &mut Vec<Finished>) {
        let ended = Instant::now();
        for mut execution in self.queue.drain(..) {
            execution.status = StatementStatus::Unknown;
            done.push(Finished { execution, ended });
        }
    }

    /// CommandComplete (`tag`) for the oldest execution in `group`: an Execute is done, a
    /// Query (which may hold several statements) adds its rows and waits for ReadyForQuery.
    pub fn command_complete(&mut self, group: u64, tag: &[u8], done: &mut Vec<Finished>) {
        let Some(front) = self.queue.front_mut().filter(|e| e.group == group) else {
            return;
        };
        if let Some(rows) = rows(tag) {
            front.rows = Some(front.rows.unwrap_or(0) + rows);
        }
        if front.kind == "execute" {
            self.finish_front(done);
        }
    }

    /// EmptyQueryResponse or PortalSuspended: an Execute is done.
    pub fn execute_done(&mut self, group: u64, done: &mut Vec<Finished>) {
        if self
            .queue
            .front()
            .is_some_and(|e| e.group == group && e.kind == "execute")
        {
            self.finish_front(done);
        }
    }

    /// An ErrorResponse in `group`.
    pub fn error(&mut self, group: u64, sqlstate: &str, done: &mut Vec<Finished>) {
        let Some(front) = self.queue.front_mut().filter(|e| e.group == group) else {
            return;
        };
        front.status = StatementStatus::Error;
        front.sqlstate = Some(sqlstate.to_string());
        if front.kind == "execute" {
            self.finish_front(done);
        }
    }

    /// ReadyForQuery ending `group`: its Query is done; Executes still waiting were skipped.
    pub fn ready(&mut self, group: u64, done: &mut Vec<Finished>) {
        let ended = Instant::now();
        while self.queue.front().is_some_and(|e| e.group <= group) {
            let mut execution = self.queue.pop_front().expect("front");
            if execution.kind == "execute" {
                execution.status = StatementStatus::Skipped;
            }
            done.push(Finished { execution, ended });
        }
    }

    fn finish_front(&mut self, done: &mut Vec<Finished>) {
        if let Some(execution) = self.queue.pop_front() {
            done.push(Finished {
                execution,
                ended: Instant::now(),
            });
        }
    }
}

/// Rows counted by a command tag: `SELECT 5`, `INSERT 0 5`, `UPDATE 5`, `COPY 5`, ...
fn rows(tag: &[u8]) -> Option<u64> {
    let tag = std::str::from_utf8(tag).ok()?.trim_end_matches('\0');
    let mut words = tag.split(' ');
    let command = words.next()?;
    if !matches!(
        command,
        "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "COPY" | "FETCH" | "MOVE"
    ) {
        return None;
    }
    words.next_back()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_tags_count_rows() {
        assert_eq!(rows(b"SELECT 5\0"), Some(5));
        assert_eq!(rows(b"INSERT 0 12\0"), Some(12));
        assert_eq!(rows(b"COPY 3\0"), Some(3));
        assert_eq!(rows(b"CREATE TABLE\0"), None);
        assert_eq!(rows(b"SET\0"), None);
    }

    #[test]
    fn skipped_executes_and_multi_statement_queries_complete_in_order() {
        let mut executions = Executions::default();
        let mut done = Vec::new();
        executions.push(Execution::new(0, "query", None));
        executions.command_complete(0, b"SELECT 2\0", &mut done);
        executions.command_complete(0, b"UPDATE 3\0", &mut done);
        assert!(done.is_empty());
        executions.ready(0, &mut done);
        assert_eq!(done[0].execution.rows, Some(5));
        done.clear();
        executions.push(Execution::new(1, "execute", None));
        executions.push(Execution::new(1, "execute", None));
        executions.error(1, "22012", &mut done);
        executions.ready(1, &mut done);
        let statuses: Vec<_> = done.iter().map(|f| f.execution.status).collect();
        assert_eq!(statuses, [StatementStatus::Error, StatementStatus::Skipped]);
    }
}
