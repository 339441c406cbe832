//! Cancel routing. Clients get pgbastion's own BackendKeyData; a CancelRequest (which arrives
//! on a new, unauthenticated connection) is matched in constant time and forwarded to the
//! upstream connection it stands for. A wrong key does nothing and reveals nothing.

use pgbastion_wire::upstream::UpstreamTarget;
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subtle::ConstantTimeEq;

#[derive(Debug)]
struct Entry {
    secret: i32,
    route: Arc<Route>,
}

/// Where a session's cancel requests go; shared by the registry and the session's key, so
/// that a transaction-pooled session moving between connections touches only its own lock.
#[derive(Debug)]
struct Route {
    /// The upstream connection the session is using; None between transactions of a
    /// transaction pool (nothing runs, so there is nothing to cancel).
    upstream: Mutex<Option<(i32, i32)>>,
    /// Where the session's connections are: a reload that moves the upstream leaves running
    /// sessions, and their cancels, where they are.
    target: Arc<UpstreamTarget>,
    /// Cancel requests being forwarded for this session right now (at most one: another
    /// would only cancel the same statement again, at the cost of another upstream
    /// connection); raised under the `upstream` lock, so a request seen before
    /// `set_upstream` returns is counted here.
    in_flight: AtomicUsize,
    /// A cancel arrived while one was on its way: if that one fails, it is sent again.
    again: AtomicBool,
}

#[derive(Debug, Default)]
pub struct CancelRegistry {
    entries: Mutex<HashMap<i32, Entry>>,
}

/// Removes its key from the registry when the session ends.
#[derive(Debug)]
pub struct CancelKey {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
    route: Arc<Route>,
}

/// A cancel request on its way upstream; the session's connection is not handed to anyone
/// else while it exists (see `CancelKey::settle`).
#[derive(Debug)]
pub struct InFlight(Arc<Route>);

impl InFlight {
    /// Whether another cancel for the same key arrived while this one was on its way (and
    /// so should be tried again if this one failed).
    pub fn asked_again(&self) -> bool {
        self.0.again.swap(false, Ordering::AcqRel)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl CancelKey {
    /// Waits for cancel requests being forwarded to this session's connection, so that
    /// none reaches the connection's next user: up to twice the upstream's connect timeout,
    /// which bounds a forward and its one retry.
    pub async fn settle(&self) {
        if self.route.in_flight.load(Ordering::Acquire) == 0 {
            return;
        }
        let deadline = tokio::time::Instant::now() + self.route.target.connect_timeout * 2;
        while self.route.in_flight.load(Ordering::Acquire) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The session moved to another upstream connection, or to none.
    pub fn set_upstream(&self, upstream: Option<(i32, i32)>) {
        *self.route.upstream.lock().expect("cancel route lock") = upstream;
    }
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.registry
            .entries
            .lock()
            .expect("cancel registry lock")
            .remove(&self.pid);
    }
}

impl CancelRegistry {
    /// Issues a fresh (pid, secret) for a session whose upstream key is `upstream`, on
    /// `target`.
    pub fn register(
        self: &Arc<Self>,
        upstream: Option<(i32, i32)>,
        target: Arc<UpstreamTarget>,
    ) -> CancelKey {
        let mut rng = rand::rng();
        let mut entries = self.entries.lock().expect("cancel registry lock");
        let pid = loop {
            let pid = rng.random_range(1..i32::MAX);
            if !entries.contains_key(&pid) {
                break pid;
            }
        };
        let secret = rng.random::<i32>();
        let route = Arc::new(Route {
            upstream: Mutex::new(upstream),
            target,
            in_flight: AtomicUsize::new(0),
            again: AtomicBool::new(false),
        });
        entries.insert(
            pid,
            Entry {
                secret,
                route: route.clone(),
            },
        );
        CancelKey {
            registry: self.clone(),
            pid,
            secret,
            route,
        }
    }

    /// Where a client's cancel key leads, if the key is right and no cancel for it is on its
    /// way already: the upstream (pid, secret) and target, with the mark that keeps the
    /// connection from changing hands until the request is sent.
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<(Forward, InFlight)> {
        let entries = self.entries.lock().expect("cancel registry lock");
        let entry = entries.get(&pid)?;
        let matches: bool = entry
            .secret
            .to_be_bytes()
            .ct_eq(&secret.to_be_bytes())
            .into();
        if !matches {
            return None;
        }
        let route = entry.route.clone();
        drop(entries);
        let upstream = {
            let upstream = route.upstream.lock().expect("cancel route lock");
            let upstream = (*upstream)?;
            if route
                .in_flight
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                route.again.store(true, Ordering::Release);
                return None;
            }
            route.again.store(false, Ordering::Release);
            upstream
        };
        let forward = Forward {
            pid: upstream.0,
            secret: upstream.1,
            target: route.target.clone(),
        };
        Some((forward, InFlight(route)))
    }
}

/// A cancel request to send upstream.
#[derive(Debug)]
pub struct Forward {
    pub pid: i32,
    pub secret: i32,
    pub target: Arc<UpstreamTarget>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Arc<UpstreamTarget> {
        Arc::new(UpstreamTarget {
            host: "127.0.0.1".into(),
            port: 5432,
            tls: pgbastion_wire::tls::UpstreamTlsMode::Disable,
            connect_timeout: Duration::from_secs(5),
            auth_methods: pgbastion_wire::upstream::AuthMethods::SCRAM_ONLY,
        })
    }

    #[test]
    fn only_the_right_key_maps_to_the_upstream_and_it_expires_with_the_session() {
        let registry = Arc::new(CancelRegistry::default());
        let key = registry.register(Some((4242, 7)), target());
        let (forward, in_flight) = registry.lookup(key.pid, key.secret).unwrap();
        assert_eq!((forward.pid, forward.secret), (4242, 7));
        assert_eq!(forward.target.port, 5432);
        assert_eq!(key.route.in_flight.load(Ordering::Acquire), 1);
        assert!(!in_flight.asked_again());
        assert!(
            registry.lookup(key.pid, key.secret).is_none(),
            "one cancel in flight per key"
        );
        assert!(in_flight.asked_again(), "the second is remembered");
        assert!(!in_flight.asked_again());
        drop(in_flight);
        assert_eq!(key.route.in_flight.load(Ordering::Acquire), 0);
        assert!(registry
            .lookup(key.pid, key.secret.wrapping_add(1))
            .is_none());
        key.set_upstream(None);
        assert!(
            registry.lookup(key.pid, key.secret).is_none(),
            "between transactions"
        );
        let (pid, secret) = (key.pid, key.secret);
        drop(key);
        assert!(registry.lookup(pid, secret).is_none());
    }
}
