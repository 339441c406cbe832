//! Limits: client connections overall, sessions and statements per identity, and failed
//! authentications per peer address. Each refusal says which limit and when to retry.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use pgbastion_config::IdentityLimits;
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Peers remembered for failed authentications, at most.
const MAX_TRACKED_PEERS: usize = 100_000;

/// Statement budgets of identities under one quota.
type IdentityRate = DefaultKeyedRateLimiter<String>;

/// Why a limit refused, in words for the client, and which metric label it counts under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub limit: &'static str,
    pub message: String,
}

#[derive(Debug)]
pub struct Limits {
    clock: DefaultClock,
    connections: AtomicUsize,
    /// Sessions per identity (issuer, user).
    sessions: Mutex<HashMap<(String, String), u32>>,
    /// Failed authentications per peer; a peer over its quota is refused until `blocked`.
    failures: DefaultKeyedRateLimiter<IpAddr>,
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    /// Statement rate per identity, one limiter per quota.
    statements: Mutex<HashMap<(u32, u32), Arc<IdentityRate>>>,
}

/// Holds a client connection's place under `max_client_connections`.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<Limits>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Holds a session's place under its identity's `max_connections`.
#[derive(Debug)]
pub struct SessionSlot {
    limits: Arc<Limits>,
    key: (String, String),
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut sessions = self.limits.sessions.lock().expect("limits lock");
        if let Some(n) = sessions.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                sessions.remove(&self.key);
            }
        }
    }
}

/// A statement rate for one identity.
#[derive(Debug, Clone)]
pub struct StatementRate {
    limiter: Arc<IdentityRate>,
    key: String,
    per_second: u32,
}

impl Limits {
    pub fn new(auth_failures_per_minute: u32) -> Arc<Limits> {
        let per_minute = NonZeroU32::new(auth_failures_per_minute.max(1)).expect("at least 1");
        Arc::new(Limits {
            clock: DefaultClock::default(),
            connections: AtomicUsize::new(0),
            sessions: Mutex::default(),
            failures: RateLimiter::keyed(Quota::per_minute(per_minute)),
            blocked: Mutex::default(),
            statements: Mutex::default(),
        })
    }

    /// A place for a new client connection, if fewer than `max` are open.
    pub fn connection(self: &Arc<Self>, max: usize) -> Result<ConnectionSlot, Limited> {
        let open = self.connections.fetch_add(1, Ordering::Relaxed);
        let slot = ConnectionSlot(self.clone());
        if open >= max {
            return Err(Limited {
                limit: "max_client_connections",
                message: format!(
                    "too many client connections to pgbastion (limit {max}); retry in a few seconds"
                ),
            });
        }
        Ok(slot)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Whether `peer` may try to authenticate now (it is not blocked for failing too often).
    pub fn may_authenticate(&self, peer: IpAddr) -> Result<(), Limited> {
        let peer = failure_key(peer);
        let mut blocked = self.blocked.lock().expect("limits lock");
        match blocked.get(&peer) {
            Some(until) if *until > Instant::now() => Err(Limited {
                limit: "auth_attempts_per_minute",
                message: format!(
                    "too many failed authentications from {}; retry in {} s",
                    shown(peer),
                    until.duration_since(Instant::now()).as_secs() + 1
                ),
            }),
            Some(_) => {
                blocked.remove(&peer);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Counts a failed authentication from `peer`; over the quota it is blocked for a while.
    pub fn authentication_failed(&self, peer: IpAddr) {
        let peer = failure_key(peer);
        if self.failures.len() > MAX_TRACKED_PEERS {
            self.failures.retain_recent();
        }
        if let Err(not_until) = self.failures.check_key(&peer) {
            let wait = not_until.wait_time_from(self.clock.now());
            let mut blocked = self.blocked.lock().expect("limits lock");
            if blocked.len() > MAX_TRACKED_PEERS {
                // Bounded memory under a flood from many addresses.
                let now = Instant::now();
                blocked.retain(|_, until| *until > now);
                self.failures.retain_recent();
                if blocked.len() > MAX_TRACKED_PEERS {
                    blocked.clear();
                }
            }
            blocked.insert(peer, Instant::now() + wait.max(Duration::from_secs(1)));
        }
    }

    /// A place for a session of `user` (from `issuer`) under the policy's limits.
    pub fn session(
        self: &Arc<Self>,
        issuer: &str,
        user: &str,
        limits: &IdentityLimits,
    ) -> Result<Option<SessionSlot>, Limited> {
        if limits.max_connections == 0 {
            return Ok(None);
        }
        let key = (issuer.to_string(), user.to_string());
        let mut sessions = self.sessions.lock().expect("limits lock");
        let open = sessions.entry(key.clone()).or_default();
        if *open >= limits.max_connections {
            return Err(Limited {
                limit: "identity_connections",
                message: format!(
                    "too many sessions for {user} (limit {}); close one and retry",
                    limits.max_connections
                ),
            });
        }
        *open += 1;
        Ok(Some(SessionSlot {
            limits: self.clone(),
            key,
        }))
    }

    /// The statement rate of `user` under the policy's limits; None: unlimited.
    pub fn statement_rate(
        &self,
        issuer: &str,
        user: &str,
        limits: &IdentityLimits,
    ) -> Option<StatementRate> {
        let per_second = NonZeroU32::new(limits.statements_per_second)?;
        let burst = NonZeroU32::new(limits.statement_burst).unwrap_or(per_second);
        let limiter = self
            .statements
            .lock()
            .expect("limits lock")
            .entry((per_second.get(), burst.get()))
            .or_insert_with(|| {
                Arc::new(RateLimiter::keyed(
                    Quota::per_second(per_second).allow_burst(burst),
                ))
            })
            .clone();
        Some(StatementRate {
            limiter,
            key: format!("{issuer}\0{user}"),
            per_second: per_second.get(),
        })
    }
}

impl StatementRate {
    /// Takes one statement from the budget.
    pub fn check(&self) -> Result<(), Limited> {
        self.limiter.check_key(&self.key).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            Limited {
                limit: "statement_rate",
                message: format!(
                    "statement rate limit exceeded ({} per second); retry in {} ms",
                    self.per_second,
                    wait.as_millis().max(1)
                ),
            }
        })
    }
}

/// A counted peer as shown in messages: an IPv6 /64 as a network.
fn shown(key: IpAddr) -> String {
    match key {
        IpAddr::V4(_) => key.to_string(),
        IpAddr::V6(_) => format!("{key}/64"),
    }
}

/// What failed authentications are counted against: the address, or for IPv6 its /64
/// network (one host may hold all of it, and would otherwise never be blocked).
fn failure_key(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_peers_are_counted_by_their_64_bit_network() {
        let limits = Limits::new(1);
        let first: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        limits.authentication_failed(first);
        limits.authentication_failed(first);
        assert!(limits.may_authenticate(first).is_err());
        // Another address of the same /64: blocked too; another /64: not.
        assert!(limits
            .may_authenticate("2001:db8:1:2:ffff::7".parse().unwrap())
            .is_err());
        assert!(limits
            .may_authenticate("2001:db8:1:3::1".parse().unwrap())
            .is_ok());
        // IPv4 seen through an IPv6 socket counts as the IPv4 address.
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        limits.authentication_failed(mapped);
        limits.authentication_failed(mapped);
        assert!(limits
            .may_authenticate("192.0.2.1".parse().unwrap())
            .is_err());
        assert!(limits
            .may_authenticate("192.0.2.2".parse().unwrap())
            .is_ok());
    }

    #[test]
    fn connection_slots_are_returned() {
        let limits = Limits::new(10);
        let a = limits.connection(2).unwrap();
        let _b = limits.connection(2).unwrap();
        assert_eq!(
            limits.connection(2).unwrap_err().limit,
            "max_client_connections"
        );
        drop(a);
        assert!(limits.connection(2).is_ok());
    }

    #[test]
    fn identity_sessions_are_counted_per_identity() {
        let limits = Limits::new(10);
        let two = IdentityLimits {
            max_connections: 2,
            ..IdentityLimits::default()
        };
        let a = limits.session("i", "alice", &two).unwrap();
        let _b = limits.session("i", "alice", &two).unwrap();
        assert!(limits.session("i", "alice", &two).is_err());
        assert!(limits.session("i", "bob", &two).is_ok());
        drop(a);
        assert!(limits.session("i", "alice", &two).is_ok());
    }

    #[test]
    fn failed_authentications_block_the_peer_for_a_while() {
        let limits = Limits::new(3);
        let peer: IpAddr = "127.0.0.9".parse().unwrap();
        for _ in 0..3 {
            limits.may_authenticate(peer).unwrap();
            limits.authentication_failed(peer);
        }
        limits.may_authenticate(peer).unwrap();
        limits.authentication_failed(peer);
        let refused = limits.may_authenticate(peer).unwrap_err();
        assert!(refused.message.contains("retry in"), "{}", refused.message);
        assert!(limits
            .may_authenticate("127.0.0.8".parse().unwrap())
            .is_ok());
    }

    #[test]
    fn statement_rates_allow_the_burst_then_refuse() {
        let limits = Limits::new(10);
        let rate = limits
            .statement_rate(
                "i",
                "alice",
                &IdentityLimits {
                    statements_per_second: 1,
                    statement_burst: 5,
                    ..IdentityLimits::default()
                },
            )
            .unwrap();
        for _ in 0..5 {
            rate.check().unwrap();
        }
        let refused = rate.check().unwrap_err();
        assert_eq!(refused.limit, "statement_rate");
        assert!(refused.message.contains("retry in"));
    }
}
