//! Signing keys of one issuer: OIDC discovery, the JWKS, a cache that keeps working while
//! the identity provider is down, and a bounded refetch for unknown key ids.

use crate::error::AuthError;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use openidconnect::core::{CoreJsonWebKeySet, CoreProviderMetadata};
use openidconnect::reqwest;
use openidconnect::{IssuerUrl, JsonWebKeySetUrl};
use pgbastion_config::Issuer;
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// A public key usable for verification, with what it may verify.
#[derive(Clone)]
pub(crate) struct SigningKey {
    pub kid: Option<String>,
    pub family: Family,
    /// The JWK's `alg`, when it pins one.
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
}

/// The kind of key, which decides the algorithms it can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl Family {
    pub fn verifies(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        matches!(
            (self, alg),
            (Family::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
                | (Family::P256, ES256)
                | (Family::P384, ES384)
                | (Family::Ed25519, EdDSA)
        )
    }
}

#[derive(Default)]
struct Cache {
    jwks_uri: Option<JsonWebKeySetUrl>,
    keys: Arc<Vec<SigningKey>>,
    /// Whether keys were ever fetched successfully.
    loaded: bool,
}

pub(crate) struct IssuerKeys {
    pub config: Issuer,
    http: reqwest::Client,
    cache: RwLock<Cache>,
    /// Serialises fetches (one at a time per issuer) and remembers when the last one started.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    /// Fetch attempts and failures, for metrics.
    pub fetches: std::sync::atomic::AtomicU64,
    pub failures: std::sync::atomic::AtomicU64,
}

impl IssuerKeys {
    pub fn new(config: Issuer) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            // Following redirects would let a compromised discovery document point us anywhere.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.http_timeout)
            .connect_timeout(config.http_timeout);
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path)
                .map_err(|err| format!("cannot read CA file {}: {err}", path.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|err| format!("CA file {}: {err}", path.display()))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|err| format!("HTTP client: {err}"))?;
        Ok(IssuerKeys {
            config,
            http,
            cache: RwLock::new(Cache::default()),
            last_fetch: tokio::sync::Mutex::new(None),
            fetches: Default::default(),
            failures: Default::default(),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    pub fn loaded(&self) -> bool {
        self.cache.read().expect("key cache lock").loaded
    }

    /// The current key set; a refetch replaces it (a new `Arc`, even with the same keys).
    pub fn key_set(&self) -> Arc<Vec<SigningKey>> {
        self.cache.read().expect("key cache lock").keys.clone()
    }

    /// Keys that may verify a token with this `kid` and algorithm.
    pub fn candidates(&self, kid: Option<&str>, alg: Algorithm) -> Vec<SigningKey> {
        let keys = self.cache.read().expect("key cache lock").keys.clone();
        keys.iter()
            .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
            .filter(|k| k.family.verifies(alg) && k.alg.is_none_or(|a| a == alg))
            .cloned()
            .collect()
    }

    /// Like `candidates`, but a miss triggers one refetch unless one started less than
    /// `jwks_min_refetch` ago, so unknown key ids cannot make us hammer the provider.
    pub async fn candidates_or_refetch(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Vec<SigningKey>, AuthError> {
        let found = self.candidates(kid, alg);
        if !found.is_empty() {
            return Ok(found);
        }
        let mut last = self.last_fetch.lock().await;
        // Another connection may have refetched while we waited for the lock.
        let found = self.candidates(kid, alg);
        if !found.is_empty() {
            return Ok(found);
        }
        let due = last.is_none_or(|t| t.elapsed() >= self.config.jwks_min_refetch);
        let mut note = " (keys were refreshed moments ago)";
        if due {
            *last = Some(Instant::now());
            match self.fetch().await {
                Ok(_) => {
                    let found = self.candidates(kid, alg);
                    if !found.is_empty() {
                        return Ok(found);
                    }
                    note = "";
                }
                Err(err) => {
                    tracing::warn!(issuer = %self.config.issuer, error = %err, "refetching signing keys failed");
                    note = crate::error::REFETCH_FAILED;
                }
            }
        }
        if !self.loaded() {
            return Err(AuthError::KeysUnavailable {
                issuer: self.config.issuer.clone(),
            });
        }
        Err(AuthError::UnknownKey {
            // The kid comes from an unverified token header.
            kid: crate::verify::printable(kid.unwrap_or("(none)")),
            issuer: self.config.issuer.clone(),
            note,
        })
    }

    /// Periodic refresh: fetches unconditionally and records the time.
    pub async fn refresh(&self) -> Result<usize, String> {
        let mut last = self.last_fetch.lock().await;
        *last = Some(Instant::now());
        self.fetch().await
    }

    /// Discovery (until it has succeeded once), then the JWKS. On failure the cache is kept.
    async fn fetch(&self) -> Result<usize, String> {
        use std::sync::atomic::Ordering;
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let fetched = self.fetch_once().await;
        if fetched.is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        fetched
    }

    async fn fetch_once(&self) -> Result<usize, String> {
        let jwks_uri = self.cache.read().expect("key cache lock").jwks_uri.clone();
        let set = match jwks_uri {
            Some(uri) => CoreJsonWebKeySet::fetch_async(&uri, &self.http)
                .await
                .map_err(|err| format!("fetching JWKS {}: {}", uri.as_str(), error_chain(&err)))?,
            None => {
                let url = IssuerUrl::new(self.config.issuer.clone())
                    .map_err(|err| format!("issuer URL: {err}"))?;
                let metadata = CoreProviderMetadata::discover_async(url, &self.http)
                    .await
                    .map_err(|err| format!("OIDC discovery: {}", error_chain(&err)))?;
                self.cache.write().expect("key cache lock").jwks_uri =
                    Some(metadata.jwks_uri().clone());
                metadata.jwks().clone()
            }
        };
        let keys: Vec<SigningKey> = set.keys().iter().filter_map(convert).collect();
        if keys.is_empty() {
            return Err("the JWKS holds no usable signing key".into());
        }
        let count = keys.len();
        let mut cache = self.cache.write().expect("key cache lock");
        cache.keys = Arc::new(keys);
        cache.loaded = true;
        tracing::debug!(issuer = %self.config.issuer, keys = count, "signing keys loaded");
        Ok(count)
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Turns a published JWK into a verification key; skips encryption keys, HMAC secrets and
/// curves we do not verify.
fn convert<K: serde::Serialize>(jwk: &K) -> Option<SigningKey> {
    let jwk: Jwk = serde_json::to_value(jwk)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Family::Rsa,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Family::P256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => Family::P384,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Family::Ed25519
        }
        _ => return None,
    };
    let alg = jwk
        .common
        .key_algorithm
        .and_then(|a| a.to_string().parse::<Algorithm>().ok());
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    Some(SigningKey {
        kid: jwk.common.key_id.clone(),
        family,
        alg,
        key,
    })
}
