//! Upstream connection pools: one per (login role, database), shared by every identity that
//! logs in as that role.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// How long a client holds an upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    /// For its whole session.
    Session,
    /// For each transaction; a session that creates session state (SET, LISTEN, PREPARE,
    /// temporary tables, ...) keeps its connection from then on, and currval()/lastval()
    /// are refused until the session has set a sequence value on the connection it holds.
    Transaction,
}

/// Settings of the pools of one login role, over the `[pool]` defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RolePool {
    pub mode: Option<PoolMode>,
    pub max_size: Option<usize>,
}

/// How pooled upstream connections are kept and reused. Every key takes effect at a reload.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    /// Session (default) or transaction pooling.
    #[serde(default = "defaults::mode")]
    pub mode: PoolMode,
    /// Upstream connections of one (login role, database) at most, in use and idle.
    #[serde(default = "defaults::max_size")]
    pub max_size: usize,
    /// Connections kept open when idle; after a health check or lifetime closes one, the pool
    /// opens a replacement with the startup parameters of its latest client.
    #[serde(default)]
    pub min_size: usize,
    /// How long a client waits for a connection when the pool is at `max_size`; then 53300.
    #[serde(default = "defaults::acquire_timeout", with = "crate::duration")]
    pub acquire_timeout: Duration,
    /// An idle connection above `min_size` is closed after this long. "0s": connections are
    /// never kept (no pooling).
    #[serde(default = "defaults::idle_timeout", with = "crate::duration")]
    pub idle_timeout: Duration,
    /// A connection is closed, not reused, once it is this old.
    #[serde(default = "defaults::max_lifetime", with = "crate::duration")]
    pub max_lifetime: Duration,
    /// A connection idle longer than this is checked with an empty query before reuse
    /// (every reuse first checks that the socket holds no unexpected bytes and is open).
    #[serde(default = "defaults::health_check_after", with = "crate::duration")]
    pub health_check_after: Duration,
    /// Run on a connection before it goes back to the pool: it must drop prepared statements
    /// (pgbastion assumes none remain) and reset settings, as DISCARD ALL does.
    #[serde(default = "defaults::reset_query")]
    pub reset_query: String,
    /// Per login role (the mapped role, or the gateway role): `mode` and `max_size`.
    #[serde(default)]
    pub roles: BTreeMap<String, RolePool>,
}

impl Pool {
    /// The mode and size of the pools of `role`.
    pub fn for_role(&self, role: &str) -> (PoolMode, usize) {
        let own = self.roles.get(role);
        (
            own.and_then(|r| r.mode).unwrap_or(self.mode),
            own.and_then(|r| r.max_size).unwrap_or(self.max_size),
        )
    }
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            mode: defaults::mode(),
            max_size: defaults::max_size(),
            min_size: 0,
            acquire_timeout: defaults::acquire_timeout(),
            idle_timeout: defaults::idle_timeout(),
            max_lifetime: defaults::max_lifetime(),
            health_check_after: defaults::health_check_after(),
            reset_query: defaults::reset_query(),
            roles: BTreeMap::new(),
        }
    }
}

mod defaults {
    use super::*;

    pub fn mode() -> PoolMode {
        PoolMode::Session
    }
    pub fn max_size() -> usize {
        100
    }
    pub fn acquire_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(600)
    }
    pub fn max_lifetime() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn health_check_after() -> Duration {
        Duration::from_secs(30)
    }
    pub fn reset_query() -> String {
        "DISCARD ALL".into()
    }
}
