//! Cancel routing. Clients get pgbastion's own BackendKeyData; a CancelRequest (which arrives
//! on a new, unauthenticated connection) is matched in constant time and forwarded to the
//! upstream connection it stands for. A wrong key does nothing and reveals nothing.

use rand::Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use subtle::ConstantTimeEq;

#[derive(Debug, Clone, Copy)]
struct Entry {
    secret: i32,
    /// The upstream connection the session is using; None between transactions of a
    /// transaction pool (nothing runs, so there is nothing to cancel).
    upstream: Option<(i32, i32)>,
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
}

impl CancelKey {
    /// The session moved to another upstream connection, or to none.
    pub fn set_upstream(&self, upstream: Option<(i32, i32)>) {
        if let Some(entry) = self
            .registry
            .entries
            .lock()
            .expect("cancel registry lock")
            .get_mut(&self.pid)
        {
            entry.upstream = upstream;
        }
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
    /// Issues a fresh (pid, secret) for a session whose upstream key is `upstream`.
    pub fn register(self: &Arc<Self>, upstream: Option<(i32, i32)>) -> CancelKey {
        let mut rng = rand::rng();
        let mut entries = self.entries.lock().expect("cancel registry lock");
        let pid = loop {
            let pid = rng.random_range(1..i32::MAX);
            if !entries.contains_key(&pid) {
                break pid;
            }
        };
        let secret = rng.random::<i32>();
        entries.insert(pid, Entry { secret, upstream });
        CancelKey {
            registry: self.clone(),
            pid,
            secret,
        }
    }

    /// The upstream (pid, secret) for a client's cancel key, if the key is right.
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<(i32, i32)> {
        let entry = *self
            .entries
            .lock()
            .expect("cancel registry lock")
            .get(&pid)?;
        let matches: bool = entry
            .secret
            .to_be_bytes()
            .ct_eq(&secret.to_be_bytes())
            .into();
        if matches {
            entry.upstream
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_right_key_maps_to_the_upstream_and_it_expires_with_the_session() {
        let registry = Arc::new(CancelRegistry::default());
        let key = registry.register(Some((4242, 7)));
        assert_eq!(registry.lookup(key.pid, key.secret), Some((4242, 7)));
        assert_eq!(registry.lookup(key.pid, key.secret.wrapping_add(1)), None);
        let (pid, secret) = (key.pid, key.secret);
        drop(key);
        assert_eq!(registry.lookup(pid, secret), None);
    }
}
