//! A bounded cache of policy decisions keyed by the statement's decision key (its tokens, numbers
//! aside: `pgbastion_policy::decision_key`), so a statement a client repeats — with other
//! numbers, reconnecting, or from another session — is analysed once. The key also holds
//! the message kind (a Parse may hold one statement only), the policy and the search_path: the
//! only other inputs of a decision.

use pgbastion_policy::Decision;
use std::collections::HashMap;
use std::sync::Mutex;

/// Statement keys longer than this are not cached: they are rarely repeated and would crowd out
/// the rest.
const MAX_CACHED_TEXT: usize = 8 * 1024;

#[derive(Debug)]
pub struct DecisionCache {
    entries: Mutex<HashMap<String, Vec<Entry>>>,
    capacity: usize,
}

#[derive(Debug)]
struct Entry {
    /// The message tag: b'Q' or b'P'.
    kind: u8,
    policy: String,
    search_path: Vec<String>,
    decision: Decision,
}

impl DecisionCache {
    pub fn new(capacity: usize) -> Self {
        DecisionCache {
            entries: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    pub fn get(
        &self,
        kind: u8,
        policy: &str,
        search_path: &[String],
        sql: &str,
    ) -> Option<Decision> {
        let entries = self.entries.lock().expect("decision cache lock");
        entries
            .get(sql)?
            .iter()
            .find(|e| e.kind == kind && e.policy == policy && e.search_path == search_path)
            .map(|e| e.decision.clone())
    }

    pub fn insert(
        &self,
        kind: u8,
        policy: &str,
        search_path: &[String],
        sql: &str,
        decision: Decision,
    ) {
        if sql.len() > MAX_CACHED_TEXT {
            return;
        }
        let mut entries = self.entries.lock().expect("decision cache lock");
        if entries.len() >= self.capacity {
            // Bounded without bookkeeping: start over. Hot statements come back at once.
            entries.clear();
        }
        entries.entry(sql.to_string()).or_default().push(Entry {
            kind,
            policy: policy.to_string(),
            search_path: search_path.to_vec(),
            decision,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_kept_per_policy_and_search_path() {
        let cache = DecisionCache::new(10);
        let path = vec!["public".to_string()];
        cache.insert(b'Q', "analysts", &path, "SELECT 1", Decision::Allow);
        assert_eq!(
            cache.get(b'Q', "analysts", &path, "SELECT 1"),
            Some(Decision::Allow)
        );
        assert_eq!(cache.get(b'P', "analysts", &path, "SELECT 1"), None);
        assert_eq!(cache.get(b'Q', "engineers", &path, "SELECT 1"), None);
        assert_eq!(
            cache.get(b'Q', "analysts", &["app".to_string()], "SELECT 1"),
            None
        );
        assert_eq!(cache.get(b'Q', "analysts", &path, "SELECT 2"), None);
    }

    #[test]
    fn the_cache_stays_within_its_capacity() {
        let cache = DecisionCache::new(3);
        let path = vec!["public".to_string()];
        for i in 0..10 {
            cache.insert(b'Q', "p", &path, &format!("SELECT {i}"), Decision::Allow);
        }
        assert!(cache.entries.lock().unwrap().len() <= 3);
        assert_eq!(
            cache.get(b'Q', "p", &path, "SELECT 9"),
            Some(Decision::Allow)
        );
    }
}
