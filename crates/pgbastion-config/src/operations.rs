//! Operating keys: the audit log, the admin HTTP listener, limits and shutdown.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where audit records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditSink {
    Stdout,
    File,
    /// No audit log. `check` warns about it.
    Off,
}

/// What happens when the audit queue is full (the sink cannot keep up or fails).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnAuditFull {
    /// Statements wait until the record is queued: nothing is lost.
    Block,
    /// The record is dropped, counted in metrics and logged.
    Drop,
}

/// How statement text is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatementText {
    /// Literals replaced by `$0` placeholders: no data values in the log.
    Redacted,
    Full,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    #[serde(default = "defaults::sink")]
    pub sink: AuditSink,
    /// The file for `sink = "file"`; rotated files get a numeric suffix (`audit.log.1`, ...).
    pub path: Option<PathBuf>,
    /// Rotate the file when it reaches this size.
    #[serde(default = "defaults::max_file_bytes")]
    pub max_file_bytes: u64,
    /// Records waiting for the sink, at most.
    #[serde(default = "defaults::queue")]
    pub queue: usize,
    #[serde(default = "defaults::on_full")]
    pub on_full: OnAuditFull,
    #[serde(default = "defaults::statement_text")]
    pub statement_text: StatementText,
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            sink: defaults::sink(),
            path: None,
            max_file_bytes: defaults::max_file_bytes(),
            queue: defaults::queue(),
            on_full: defaults::on_full(),
            statement_text: defaults::statement_text(),
        }
    }
}

/// The admin HTTP listener: /metrics, /healthz, /readyz.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    #[serde(default = "defaults::admin_address")]
    pub address: SocketAddr,
    #[serde(default = "defaults::enabled")]
    pub enabled: bool,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            address: defaults::admin_address(),
            enabled: true,
        }
    }
}

/// Limits that hold for the whole proxy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Client connections at most (authenticated or not).
    #[serde(default = "defaults::max_client_connections")]
    pub max_client_connections: usize,
    /// Failed token verifications per minute from one peer address (an IPv6 peer: its /64),
    /// not counting failures because the issuer's keys could not be fetched; over it the
    /// peer is refused for a while.
    #[serde(default = "defaults::auth_attempts_per_minute")]
    pub auth_attempts_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_client_connections: defaults::max_client_connections(),
            auth_attempts_per_minute: defaults::auth_attempts_per_minute(),
        }
    }
}

/// Limits per identity (the token's user), set per policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityLimits {
    /// Statements (Query, Parse, Execute, FunctionCall) per second; 0: unlimited.
    #[serde(default)]
    pub statements_per_second: u32,
    /// Statements allowed at once above the rate (default: one second's worth).
    #[serde(default)]
    pub statement_burst: u32,
    /// Sessions one identity may hold at once; 0: unlimited.
    #[serde(default)]
    pub max_connections: u32,
}

/// The process's threads.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// Threads that run sessions; 0: one per CPU. 1 runs everything on one thread, like a
    /// single-threaded pooler: the least CPU per round trip (no work stealing, no wake-ups
    /// across threads), the right choice on a small host shared with PostgreSQL.
    #[serde(default)]
    pub worker_threads: usize,
    /// After forwarding a message, keep polling the sockets this long before the thread
    /// sleeps: the answer then needs no wake-up. Costs CPU while traffic flows; 0 (default)
    /// turns it off. Needs `worker_threads = 1`; at most 1ms.
    #[serde(default, with = "crate::duration")]
    pub busy_poll: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Shutdown {
    /// After SIGTERM: how long sessions may run on before they are ended with 57P01.
    #[serde(default = "defaults::drain_timeout", with = "crate::duration")]
    pub drain_timeout: Duration,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            drain_timeout: defaults::drain_timeout(),
        }
    }
}

mod defaults {
    use super::*;

    pub fn sink() -> AuditSink {
        AuditSink::Stdout
    }
    pub fn max_file_bytes() -> u64 {
        100 * 1024 * 1024
    }
    pub fn queue() -> usize {
        65_536
    }
    pub fn on_full() -> OnAuditFull {
        OnAuditFull::Block
    }
    pub fn statement_text() -> StatementText {
        StatementText::Redacted
    }
    pub fn admin_address() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9930))
    }
    pub fn enabled() -> bool {
        true
    }
    pub fn max_client_connections() -> usize {
        10_000
    }
    pub fn auth_attempts_per_minute() -> u32 {
        60
    }
    pub fn drain_timeout() -> Duration {
        Duration::from_secs(30)
    }
}
