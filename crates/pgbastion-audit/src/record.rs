//! What an audit record says, and its JSON line.

use crate::json::Object;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

#[derive(Debug, Clone)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

#[derive(Debug, Clone)]
pub struct StatementRecord {
    /// "query" (simple protocol), "execute" (a Bind/Execute of a prepared statement), "parse"
    /// (a denied Parse) or "function_call".
    pub kind: &'static str,
    /// Literals replaced by `$0` unless the configuration asks for full text.
    pub text: Arc<str>,
    /// Whether `text` still needs redacting (done by the writer, off the hot path).
    pub redact: bool,
    /// The prepared statement's name, for "execute".
    pub statement: Option<String>,
    pub classes: Arc<[&'static str]>,
    pub relations: Arc<[String]>,
    /// "allow" or "deny".
    pub decision: &'static str,
    pub policy: Arc<str>,
    pub policy_version: Arc<str>,
    pub rule: Option<String>,
    pub message: Option<String>,
    pub status: StatementStatus,
    /// From forwarding to the upstream's answer (0 when denied).
    pub duration_us: u64,
    /// Rows as the upstream's command tags count them.
    pub rows: Option<u64>,
    pub sqlstate: Option<String>,
}

impl Record {
    /// Appends the record's line, without its newline, to `out`: fixed fields first, then the
    /// event's.
    pub fn encode(&self, seq: u64, prev: &str, out: &mut Vec<u8>) {
        use std::io::Write;
        // Writing to a Vec cannot fail.
        let _ = write!(
            out,
            "{{\"time\":\"{}\"",
            humantime::format_rfc3339_micros(self.time)
        );
        // The builder takes over after the time.
        let mut object = Object::resume(out);
        object.u64("seq", seq).str("prev", prev);
        if self.conn != 0 {
            object.u64("conn", self.conn);
        }
        if let Some(session) = &self.session {
            object.raw("session", session);
        }
        self.event.encode(&mut object);
        object.close();
    }
}

impl Event {
    fn encode(&self, object: &mut Object<'_>) {
        match self {
            Event::Connection { peer, tls } => {
                object
                    .str("event", "connection")
                    .str("peer", peer)
                    .opt_str("tls", tls.as_deref());
            }
            Event::Authentication {
                outcome,
                peer,
                tls,
                user,
                database,
                application_name,
                issuer,
                subject,
                groups,
                role,
                policy,
                reason,
                sqlstate,
            } => {
                object
                    .str("event", "authentication")
                    .str("outcome", outcome.as_str())
                    .str("peer", peer)
                    .opt_str("tls", tls.as_deref())
                    .str("user", user)
                    .str("database", database)
                    .opt_str("application_name", application_name.as_deref())
                    .opt_str("issuer", issuer.as_deref())
                    .opt_str("subject", subject.as_deref())
                    .strs("groups", groups.iter().map(String::as_str))
                    .opt_str("role", role.as_deref())
                    .opt_str("policy", policy.as_deref())
                    .opt_str("reason", reason.as_deref())
                    .opt_str("sqlstate", sqlstate.as_deref());
            }
            Event::Statement(statement) => {
                object
                    .str("event", "statement")
                    .str("kind", statement.kind)
                    .str("text", &statement.text);
                if let Some(name) = &statement.statement {
                    object.str("statement", name);
                }
                object
                    .strs("classes", statement.classes.iter().copied())
                    .strs("relations", statement.relations.iter().map(String::as_str))
                    .str("decision", statement.decision)
                    .str("policy", &statement.policy)
                    .str("policy_version", &statement.policy_version);
                if let Some(rule) = &statement.rule {
                    object.str("rule", rule);
                }
                if let Some(message) = &statement.message {
                    object.str("message", message);
                }
                object
                    .str("status", statement.status.as_str())
                    .u64("duration_us", statement.duration_us)
                    .opt_u64("rows", statement.rows)
                    .opt_str("sqlstate", statement.sqlstate.as_deref());
            }
            Event::Limit {
                limit,
                message,
                sqlstate,
            } => {
                object
                    .str("event", "limit")
                    .str("limit", limit)
                    .str("message", message)
                    .str("sqlstate", sqlstate);
            }
            Event::Disconnect {
                reason,
                seconds,
                bytes_from_client,
                bytes_to_client,
            } => {
                object
                    .str("event", "disconnect")
                    .str("reason", reason)
                    .f64("seconds", *seconds)
                    .u64("bytes_from_client", *bytes_from_client)
                    .u64("bytes_to_client", *bytes_to_client);
            }
            Event::Reload { outcome, error } => {
                object
                    .str("event", "reload")
                    .str("outcome", outcome.as_str())
                    .opt_str("error", error.as_deref());
            }
        }
    }
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
        }
    }
}

impl StatementStatus {
    fn as_str(self) -> &'static str {
        match self {
            StatementStatus::Denied => "denied",
            StatementStatus::Ok => "ok",
            StatementStatus::Error => "error",
            StatementStatus::Skipped => "skipped",
            StatementStatus::Unknown => "unknown",
        }
    }
}

/// Who a session is, for every record about it.
#[derive(Debug, Clone, Copy)]
pub struct Session<'a> {
    pub user: &'a str,
    pub subject: &'a str,
    pub issuer: &'a str,
    pub groups: &'a [String],
    pub role: &'a str,
    pub database: &'a str,
    pub application_name: Option<&'a str>,
}

impl Session<'_> {
    /// The JSON object records carry as `session` (built once per session).
    pub fn json(&self) -> Arc<str> {
        let mut out = Vec::with_capacity(256);
        let mut object = Object::open(&mut out);
        object
            .str("user", self.user)
            .str("subject", self.subject)
            .str("issuer", self.issuer)
            .strs("groups", self.groups.iter().map(String::as_str))
            .str("role", self.role)
            .str("database", self.database)
            .opt_str("application_name", self.application_name);
        object.close();
        String::from_utf8(out)
            .expect("JSON of strs is UTF-8")
            .into()
    }
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
        let mut out = Vec::new();
        record.encode(3, crate::ZERO_HASH, &mut out);
        let line = String::from_utf8(out).unwrap();
        assert!(!line.contains('\n') && !line.contains('\u{1b}') && !line.contains('\u{9b}'));
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["peer"], "x\n{\"forged\":1}\u{1b}[31m\u{7f}\u{9b}");
        assert_eq!(value["event"], "connection");
        assert_eq!(value["seq"], 3);
        assert_eq!(value["conn"], 7);
        assert_eq!(value["session"]["user"], "alice");
    }

    fn json(event: Event) -> serde_json::Value {
        let record = Record {
            time: SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_795_000_000_000_001),
            conn: 0,
            session: None,
            event,
        };
        let mut out = Vec::new();
        record.encode(0, crate::ZERO_HASH, &mut out);
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn every_event_is_an_object_with_its_fields() {
        let statement = |rule: Option<&str>| {
            Event::Statement(StatementRecord {
                kind: "execute",
                text: "SELECT $0".into(),
                redact: false,
                statement: rule.map(|_| "s1".to_string()),
                classes: Arc::from(["read"]),
                relations: Arc::from(["public.t".to_string()]),
                decision: if rule.is_some() { "deny" } else { "allow" },
                policy: "p".into(),
                policy_version: "v".into(),
                rule: rule.map(str::to_string),
                message: rule.map(|_| "no".to_string()),
                status: StatementStatus::Skipped,
                duration_us: 12,
                rows: None,
                sqlstate: Some("42501".into()),
            })
        };
        let allowed = json(statement(None));
        assert_eq!(allowed["time"], "2026-11-18T11:06:40.000001Z");
        assert!(allowed.get("conn").is_none() && allowed.get("session").is_none());
        assert_eq!(allowed["event"], "statement");
        assert_eq!(allowed["status"], "skipped");
        assert_eq!(allowed["classes"], serde_json::json!(["read"]));
        assert_eq!(allowed["relations"], serde_json::json!(["public.t"]));
        assert_eq!(allowed["duration_us"], 12);
        assert!(allowed["rows"].is_null());
        // Absent, not null, when they do not apply.
        for key in ["statement", "rule", "message"] {
            assert!(allowed.get(key).is_none(), "{key}");
        }
        let denied = json(statement(Some("r")));
        assert_eq!(
            (denied["statement"].as_str(), denied["rule"].as_str()),
            (Some("s1"), Some("r"))
        );
        assert_eq!(denied["message"], "no");

        let auth = json(Event::Authentication {
            outcome: Outcome::Failure,
            peer: "127.0.0.1:5".into(),
            tls: None,
            user: "u".into(),
            database: "d".into(),
            application_name: None,
            issuer: Some("i".into()),
            subject: None,
            groups: vec!["g1".into(), "g2".into()],
            role: None,
            policy: None,
            reason: Some("why".into()),
            sqlstate: Some("28P01".into()),
        });
        assert_eq!(auth["event"], "authentication");
        assert_eq!(auth["outcome"], "failure");
        assert_eq!(auth["groups"], serde_json::json!(["g1", "g2"]));
        assert!(auth["tls"].is_null() && auth["role"].is_null());
        assert_eq!(auth["reason"], "why");

        let gone = json(Event::Disconnect {
            reason: "client_gone".into(),
            seconds: 1.5,
            bytes_from_client: 10,
            bytes_to_client: 20,
        });
        assert_eq!(
            (gone["seconds"].as_f64(), gone["bytes_to_client"].as_u64()),
            (Some(1.5), Some(20))
        );
        let limit = json(Event::Limit {
            limit: "max_client_connections".into(),
            message: "m".into(),
            sqlstate: "53300".into(),
        });
        assert_eq!(limit["limit"], "max_client_connections");
        let reload = json(Event::Reload {
            outcome: Outcome::Success,
            error: None,
        });
        assert!(reload["error"].is_null() && reload["outcome"] == "success");
    }

    #[test]
    fn the_session_object_is_json_with_controls_escaped() {
        let groups = vec!["a\u{9b}b".to_string()];
        let session = Session {
            user: "alice",
            subject: "s",
            issuer: "https://idp",
            groups: &groups,
            role: "analyst",
            database: "app",
            application_name: Some("psql\u{7f}"),
        }
        .json();
        assert!(!session.contains('\u{9b}') && !session.contains('\u{7f}'));
        let value: serde_json::Value = serde_json::from_str(&session).unwrap();
        assert_eq!(value["groups"][0], "a\u{9b}b");
        assert_eq!(value["application_name"], "psql\u{7f}");
        assert_eq!(value["role"], "analyst");
    }
}
