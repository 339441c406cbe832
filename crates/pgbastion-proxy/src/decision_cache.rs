//! A bounded cache of policy decisions, so a statement a client repeats — with other numbers,
//! reconnecting, or from another session — is analysed once. Two keys lead to a decision: the
//! exact text (a hash lookup, for statements repeated verbatim) and, when that misses, the
//! decision key (its tokens, numbers aside: `pgbastion_policy::decision_key`), which costs a
//! tokenizer pass. The scope holds every other input of a decision: the message kind (a Parse
//! may hold one statement only), the policy, the search_path and the catalog snapshot.

use pgbastion_policy::{Decision, Effects};
use std::collections::HashMap;
use std::sync::Mutex;

/// Statement keys longer than this are not cached: they are rarely repeated and would crowd out
/// the rest.
const MAX_CACHED_TEXT: usize = 8 * 1024;

/// Everything besides the statement that a decision depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope<'a> {
    /// The message tag: b'Q' or b'P'.
    pub kind: u8,
    /// The policy's name and version.
    pub policy: &'a str,
    pub search_path: &'a [String],
    /// The catalog snapshot's version; 0 without one.
    pub catalog: u64,
}

pub type Verdict = std::sync::Arc<(Decision, Effects)>;

/// Which of the two keys an entry is filed under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// The statement's text as sent.
    Text = 0,
    /// `pgbastion_policy::decision_key` of the text.
    Tokens = 1,
}

#[derive(Debug)]
pub struct DecisionCache {
    /// Indexed by `KeyKind`.
    entries: Mutex<[HashMap<String, Vec<Entry>>; 2]>,
    capacity: usize,
}

#[derive(Debug)]
struct Entry {
    kind: u8,
    policy: String,
    search_path: Vec<String>,
    catalog: u64,
    verdict: Verdict,
}

impl Entry {
    fn matches(&self, scope: &Scope<'_>) -> bool {
        self.kind == scope.kind
            && self.catalog == scope.catalog
            && self.policy == scope.policy
            && self.search_path == scope.search_path
    }
}

impl DecisionCache {
    pub fn new(capacity: usize) -> Self {
        DecisionCache {
            entries: Mutex::new([HashMap::new(), HashMap::new()]),
            capacity,
        }
    }

    pub fn get(&self, scope: &Scope<'_>, kind: KeyKind, key: &str) -> Option<Verdict> {
        let entries = self.entries.lock().expect("decision cache lock");
        entries[kind as usize]
            .get(key)?
            .iter()
            .find(|e| e.matches(scope))
            .map(|e| e.verdict.clone())
    }

    pub fn insert(&self, scope: &Scope<'_>, kind: KeyKind, key: &str, verdict: Verdict) {
        if key.len() > MAX_CACHED_TEXT {
            return;
        }
        let mut entries = self.entries.lock().expect("decision cache lock");
        let entries = &mut entries[kind as usize];
        if entries.len() >= self.capacity {
            // Bounded without bookkeeping: start over. Hot statements come back at once.
            entries.clear();
        }
        let list = entries.entry(key.to_string()).or_default();
        // Superseded catalog snapshots are never asked for again.
        list.retain(|e| {
            !(e.kind == scope.kind && e.policy == scope.policy && e.catalog < scope.catalog)
        });
        list.push(Entry {
            kind: scope.kind,
            policy: scope.policy.to_string(),
            search_path: scope.search_path.to_vec(),
            catalog: scope.catalog,
            verdict,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow() -> Verdict {
        std::sync::Arc::new((Decision::Allow, Effects::default()))
    }

    #[test]
    fn decisions_are_kept_per_kind_policy_search_path_and_catalog() {
        let cache = DecisionCache::new(10);
        let path = vec!["public".to_string()];
        let other_path = ["app".to_string()];
        let scope = Scope {
            kind: b'Q',
            policy: "analysts",
            search_path: &path,
            catalog: 3,
        };
        cache.insert(&scope, KeyKind::Tokens, "SELECT 1", allow());
        let get = |scope: Scope<'_>, kind, key| cache.get(&scope, kind, key);
        assert_eq!(get(scope, KeyKind::Tokens, "SELECT 1"), Some(allow()));
        let others = [
            Scope {
                kind: b'P',
                ..scope
            },
            Scope {
                policy: "engineers",
                ..scope
            },
            Scope {
                search_path: &other_path,
                ..scope
            },
            Scope {
                catalog: 4,
                ..scope
            },
        ];
        for other in others {
            assert_eq!(get(other, KeyKind::Tokens, "SELECT 1"), None, "{other:?}");
        }
        assert_eq!(get(scope, KeyKind::Tokens, "SELECT 2"), None);
        assert_eq!(get(scope, KeyKind::Text, "SELECT 1"), None);
    }

    #[test]
    fn the_cache_stays_within_its_capacity() {
        let cache = DecisionCache::new(3);
        let path = vec!["public".to_string()];
        let scope = Scope {
            kind: b'Q',
            policy: "p",
            search_path: &path,
            catalog: 0,
        };
        for i in 0..10 {
            cache.insert(&scope, KeyKind::Text, &format!("SELECT {i}"), allow());
        }
        assert!(cache.entries.lock().unwrap()[KeyKind::Text as usize].len() <= 3);
        assert_eq!(cache.get(&scope, KeyKind::Text, "SELECT 9"), Some(allow()));
    }
}
