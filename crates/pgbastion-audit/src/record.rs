//! What an audit record says, and its JSON line.

use serde::Serialize;
use std::sync::Arc;
use std::time::SystemTime;

/// One event, as a session hands it to the auditor.
#[derive(Debug, Clone)]
pub struct Record {
    pub time: SystemTime,
    /// The connection id, as in the proxy's logs (0: not about a connection).
    pub conn: u64,
    /// Who the session is, as a JSON object (built once per session).
    pub session: Option<Arc<str>>,
    pub event: Event,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failure,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A client connected and sent its startup packet (before authentication).
    Connection {
        peer: String,
        tls: Option<String>,
    },
    /// A token was verified and mapped, or refused. Never holds the token.
    Authentication {
        outcome: Outcome,
        peer: String,
        tls: Option<String>,
        user: String,
        database: String,
        application_name: Option<String>,
        issuer: Option<String>,
        subject: Option<String>,
        groups: Vec<String>,
        role: Option<String>,
        policy: Option<String>,
        /// Why it failed, in the words the client got.
        reason: Option<String>,
        sqlstate: Option<String>,
    },
    Statement(StatementRecord),
    /// A limit refused a connection or a statement.
    Limit {
        limit: String,
        message: String,
        sqlstate: String,
    },
    Disconnect {
        reason: String,
        seconds: f64,
        bytes_from_client: u64,
        bytes_to_client: u64,
    },
    /// The configuration was reloaded, or a reload was refused.
    Reload {
        outcome: Outcome,
        error: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatementStatus {
    /// Denied by the policy: never reached the upstream.
    Denied,
    /// Ran upstream and completed.
    Ok,
    /// Ran upstream and failed (see `sqlstate`).
    Error,
    /// Not run: an earlier error in the same pipeline made the upstream skip it.
    Skipped,
    /// Forwarded, but the session ended before the upstream answered.
    Unknown,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatementRecord {
    /// "query" (simple protocol), "execute" (a Bind/Execute of a prepared statement), "parse"
    /// (a denied Parse) or "function_call".
    pub kind: &'static str,
    /// Literals replaced by `$0` unless the configuration asks for full text.
    pub text: Arc<str>,
    /// Whether `text` still needs redacting (done by the writer, off the hot path).
    #[serde(skip)]
    pub redact: bool,
    /// The prepared statement's name, for "execute".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
    pub classes: Arc<[&'static str]>,
    pub relations: Arc<[String]>,
    /// "allow" or "deny".
    pub decision: &'static str,
    pub policy: Arc<str>,
    pub policy_version: Arc<str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub status: StatementStatus,
    /// From forwarding to the upstream's answer (0 when denied).
    pub duration_us: u64,
    /// Rows as the upstream's command tags count them.
    pub rows: Option<u64>,
    pub sqlstate: Option<String>,
}

impl Record {
    /// The record's line: fixed fields first, then the event's; control characters escaped.
    pub(crate) fn line(&self, seq: u64, prev: &str) -> String {
        let event = serde_json::to_string(&self.event).unwrap_or_else(|err| {
            format!(
                "{{\"event\":\"unserialisable\",\"error\":{:?}}}",
                err.to_string()
            )
        });
        let time = humantime::format_rfc3339_micros(self.time);
        let mut line = format!("{{\"time\":\"{time}\",\"seq\":{seq},\"prev\":\"{prev}\"");
        if self.conn != 0 {
            line.push_str(&format!(",\"conn\":{}", self.conn));
        }
        if let Some(session) = &self.session {
            line.push_str(",\"session\":");
            line.push_str(session);
        }
        line.push(',');
        line.push_str(event.strip_prefix('{').unwrap_or(&event));
        escape_controls(line)
    }
}

/// JSON escapes control characters below 0x20; DEL and the C1 controls (U+0080..U+009F) can
/// also upset terminals and log tools, so they are escaped too.
fn escape_controls(line: String) -> String {
    if !line
        .chars()
        .any(|c| c == '\u{7f}' || ('\u{80}'..='\u{9f}').contains(&c))
    {
        return line;
    }
    let mut out = String::with_capacity(line.len() + 16);
    for c in line.chars() {
        if c == '\u{7f}' || ('\u{80}'..='\u{9f}').contains(&c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_strings_cannot_break_the_line_or_the_terminal() {
        let record = Record {
            time: SystemTime::UNIX_EPOCH,
            conn: 7,
            session: Some("{\"user\":\"alice\"}".into()),
            event: Event::Connection {
                peer: "x\n{\"forged\":1}\u{1b}[31m\u{7f}\u{9b}".into(),
                tls: None,
            },
        };
        let line = record.line(3, crate::ZERO_HASH);
        assert!(!line.contains('\n') && !line.contains('\u{1b}') && !line.contains('\u{9b}'));
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["peer"], "x\n{\"forged\":1}\u{1b}[31m\u{7f}\u{9b}");
        assert_eq!(value["event"], "connection");
        assert_eq!(value["seq"], 3);
        assert_eq!(value["conn"], 7);
        assert_eq!(value["session"]["user"], "alice");
    }
}
