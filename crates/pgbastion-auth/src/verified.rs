//! Tokens already verified, keyed by the SHA-256 of the token, so a client that reconnects
//! with the same token (a pool-less application, `pgbench -C`) skips the signature check.
//!
//! An entry holds only what the signature proved (the issuer and its claims) and the key set
//! it was verified with. It is used only while that key set is still the issuer's current one
//! (any refetch of the keys retires it) and the token's times still hold; the user claim is
//! compared on every use. The token itself is never stored.

use crate::keys::SigningKey;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Entries at most; when full, expired entries go, then everything (a burst of distinct
/// tokens only costs re-verification).
const MAX_ENTRIES: usize = 10_000;

pub(crate) type TokenHash = [u8; 32];

pub(crate) fn token_hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

#[derive(Clone)]
pub(crate) struct Verified {
    /// Index of the issuer in the verifier's list.
    pub issuer: usize,
    /// The issuer's key set the signature was checked against.
    pub keys: Arc<Vec<SigningKey>>,
    pub claims: Arc<Value>,
    pub expires_at: SystemTime,
}

#[derive(Default)]
pub(crate) struct VerifiedTokens {
    entries: Mutex<HashMap<TokenHash, Verified>>,
}

impl VerifiedTokens {
    pub fn get(&self, hash: &TokenHash) -> Option<Verified> {
        self.entries
            .lock()
            .expect("verified tokens lock")
            .get(hash)
            .cloned()
    }

    pub fn insert(&self, hash: TokenHash, verified: Verified) {
        let mut entries = self.entries.lock().expect("verified tokens lock");
        if entries.len() >= MAX_ENTRIES {
            let now = SystemTime::now();
            entries.retain(|_, v| v.expires_at > now);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(hash, verified);
    }

    pub fn remove(&self, hash: &TokenHash) {
        self.entries
            .lock()
            .expect("verified tokens lock")
            .remove(hash);
    }
}
