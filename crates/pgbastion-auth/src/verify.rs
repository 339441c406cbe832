//! Access-token verification. Every check that decides trust is made here, explicitly:
//! algorithm allow-list, issuer, key, signature, expiry, not-before, audience, scopes, user.

use crate::claims;
use crate::error::AuthError;
use crate::keys::IssuerKeys;
use crate::verified::{token_hash, Verified, VerifiedTokens};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, Validation};
use pgbastion_config::Issuer;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;

/// Who a verified token says the client is.
#[derive(Debug, Clone)]
pub struct Identity {
    pub issuer: String,
    /// The `sub` claim (empty if absent).
    pub subject: String,
    /// The startup `user`, proven equal to the issuer's user claim.
    pub user: String,
    pub groups: Vec<String>,
    /// Every claim of the token, for mapping rules and, later, policies.
    pub claims: Value,
    pub expires_at: SystemTime,
}

impl Identity {
    /// An identity from claims taken as they are: no signature, time or audience checks. Only
    /// for `pgbastion policy explain` and `policy test`, which decide hypothetical sessions;
    /// the proxy never builds an identity this way. The issuer is the claims' `iss` if it is
    /// configured, else the first configured issuer.
    pub fn from_unverified_claims(issuers: &[Issuer], claims: Value) -> Result<Identity, String> {
        let issuer = claims
            .get("iss")
            .and_then(Value::as_str)
            .and_then(|iss| issuers.iter().find(|i| i.issuer == iss))
            .or_else(|| issuers.first())
            .ok_or("the configuration has no issuer")?;
        let user = claims::lookup(&claims, &issuer.user_claim)
            .and_then(Value::as_str)
            .ok_or_else(|| {
                format!(
                    "the claims have no '{}' (the issuer's user claim)",
                    issuer.user_claim
                )
            })?
            .to_string();
        Ok(Identity {
            issuer: issuer.issuer.clone(),
            subject: claims
                .get("sub")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            user,
            groups: claims::strings(claims::lookup(&claims, &issuer.groups_claim)),
            expires_at: SystemTime::now() + Duration::from_secs(3600),
            claims,
        })
    }
}

/// Verifies tokens of the configured issuers. Background key refresh stops when dropped.
pub struct Verifier {
    issuers: Vec<Arc<IssuerKeys>>,
    verified: VerifiedTokens,
    refreshers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.issuers.iter().map(|i| i.issuer()).collect();
        f.debug_struct("Verifier").field("issuers", &names).finish()
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        for task in &self.refreshers {
            task.abort();
        }
    }
}

/// An issuer's signing keys, for health and metrics.
#[derive(Debug, Clone)]
pub struct KeyStatus {
    pub issuer: String,
    pub loaded: bool,
    pub fetches: u64,
    pub failures: u64,
}

impl Verifier {
    /// Builds the verifier and starts fetching keys in the background (first fetch at once).
    /// Must be called inside a Tokio runtime.
    pub fn start(issuers: &[Issuer]) -> Result<Self, String> {
        let issuers = issuers
            .iter()
            .map(|config| IssuerKeys::new(config.clone()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let refreshers = issuers
            .iter()
            .map(|keys| tokio::spawn(refresh_forever(keys.clone())))
            .collect();
        Ok(Verifier {
            issuers,
            verified: VerifiedTokens::default(),
            refreshers,
        })
    }

    /// Waits until every issuer's keys are loaded or `timeout` passes; returns the issuers
    /// still without keys.
    pub async fn wait_for_keys(&self, timeout: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let missing: Vec<String> = self
                .issuers
                .iter()
                .filter(|i| !i.loaded())
                .map(|i| i.issuer().to_string())
                .collect();
            if missing.is_empty() || tokio::time::Instant::now() >= deadline {
                return missing;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Per issuer: whether its keys are loaded, JWKS fetch attempts and failures.
    pub fn key_status(&self) -> Vec<KeyStatus> {
        use std::sync::atomic::Ordering;
        self.issuers
            .iter()
            .map(|i| KeyStatus {
                issuer: i.issuer().to_string(),
                loaded: i.loaded(),
                fetches: i.fetches.load(Ordering::Relaxed),
                failures: i.failures.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Verifies `token` and that it names `user`. Never logs or returns the token.
    pub async fn verify(&self, token: &str, user: &str) -> Result<Identity, AuthError> {
        let hash = token_hash(token);
        if let Some(hit) = self.verified.get(&hash) {
            let keys = &self.issuers[hit.issuer];
            if Arc::ptr_eq(&hit.keys, &keys.key_set()) {
                if let Err(err) = check_times(&hit.claims, keys.config.leeway) {
                    self.verified.remove(&hash);
                    return Err(err);
                }
                return identity(&keys.config, &hit.claims, user);
            }
            // The issuer's keys were refetched since: verify again.
            self.verified.remove(&hash);
        }
        let (header, claims) = decode_unverified(token)?;
        let alg = algorithm(&header)?;
        let iss = claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| AuthError::MissingClaim("iss".into()))?;
        let (index, keys) = self
            .issuers
            .iter()
            .enumerate()
            .find(|(_, i)| i.issuer() == iss)
            .ok_or_else(|| AuthError::UntrustedIssuer(printable(iss)))?;
        let config = &keys.config;
        if !config.algorithms.iter().any(|a| a == alg_name(alg)) {
            return Err(AuthError::Algorithm(alg_name(alg).to_string()));
        }
        // Taken before the lookup: if the lookup refetches, the entry below is simply never
        // used, rather than tied to a key set the signature was not checked against.
        let key_set = keys.key_set();
        let kid = header.get("kid").and_then(Value::as_str);
        let candidates = keys.candidates_or_refetch(kid, alg).await?;
        check_signature(token, alg, &candidates)?;
        // From here on the claims are the issuer's own words.
        check_times(&claims, config.leeway)?;
        check_audience(&claims, config)?;
        check_scopes(&claims, config)?;
        let expires_at = timestamp(&claims, "exp")?.expect("checked by check_times");
        let claims = Arc::new(claims);
        self.verified.insert(
            hash,
            Verified {
                issuer: index,
                keys: key_set,
                claims: claims.clone(),
                expires_at,
            },
        );
        identity(config, &claims, user)
    }
}

/// The identity verified `claims` give, if they name `user`.
fn identity(config: &Issuer, claims: &Value, user: &str) -> Result<Identity, AuthError> {
    let expires_at =
        timestamp(claims, "exp")?.ok_or_else(|| AuthError::MissingClaim("exp".into()))?;
    let value = claims::lookup(claims, &config.user_claim)
        .and_then(Value::as_str)
        .ok_or_else(|| AuthError::MissingClaim(config.user_claim.clone()))?;
    if value != user {
        return Err(AuthError::UserMismatch {
            user: printable(user),
            claim: config.user_claim.clone(),
            value: printable(value),
        });
    }
    Ok(Identity {
        issuer: config.issuer.clone(),
        subject: claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        user: user.to_string(),
        groups: claims::strings(claims::lookup(claims, &config.groups_claim)),
        expires_at,
        claims: claims.clone(),
    })
}

async fn refresh_forever(keys: Arc<IssuerKeys>) {
    let mut failures = 0u32;
    loop {
        let wait = match keys.refresh().await {
            Ok(count) => {
                failures = 0;
                tracing::info!(issuer = %keys.issuer(), keys = count, "signing keys refreshed");
                keys.config.jwks_refresh
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                tracing::warn!(issuer = %keys.issuer(), error = %err, "signing keys could not be fetched; cached keys stay in use");
                // Retry sooner while no key was ever loaded, backing off to the refresh interval.
                let backoff = Duration::from_millis(250) * 2u32.saturating_pow(failures.min(10));
                backoff.min(keys.config.jwks_refresh)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Splits a compact JWS and decodes header and payload, without trusting either yet.
fn decode_unverified(token: &str) -> Result<(Value, Value), AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::NotJwt("expected three dot-separated parts"));
    };
    if signature.is_empty() {
        return Err(AuthError::NotJwt("the signature part is empty"));
    }
    let decode = |part: &str| -> Option<Value> {
        let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
        let value: Value = serde_json::from_slice(&bytes).ok()?;
        value.is_object().then_some(value)
    };
    let header = decode(header).ok_or(AuthError::NotJwt("the header is not base64url JSON"))?;
    let payload = decode(payload).ok_or(AuthError::NotJwt("the payload is not base64url JSON"))?;
    Ok((header, payload))
}

/// The header's algorithm. `none` and HMAC are refused whatever the configuration says.
fn algorithm(header: &Value) -> Result<Algorithm, AuthError> {
    let name = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| AuthError::Malformed("the header has no 'alg'".into()))?;
    let alg: Algorithm = name
        .parse()
        .map_err(|_| AuthError::Algorithm(printable(name)))?;
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            Err(AuthError::Algorithm(name.to_string()))
        }
        _ => Ok(alg),
    }
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
        // A newer algorithm matches no configured name, so it is refused.
        _ => "unsupported",
    }
}

fn check_signature(
    token: &str,
    alg: Algorithm,
    candidates: &[crate::keys::SigningKey],
) -> Result<(), AuthError> {
    // Signature and algorithm only: the claims are checked by us, with precise messages.
    let mut validation = Validation::new(alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    for candidate in candidates {
        match jsonwebtoken::decode::<Value>(token, &candidate.key, &validation) {
            Ok(_) => return Ok(()),
            Err(err) => {
                if !matches!(
                    err.kind(),
                    jsonwebtoken::errors::ErrorKind::InvalidSignature
                ) {
                    tracing::debug!(error = %err, "token rejected by a candidate key");
                }
            }
        }
    }
    Err(AuthError::Signature)
}

fn timestamp(claims: &Value, name: &str) -> Result<Option<SystemTime>, AuthError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => {
            let seconds = value
                .as_f64()
                .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e12)
                .ok_or_else(|| AuthError::Malformed(format!("'{name}' is not a timestamp")))?;
            Ok(Some(UNIX_EPOCH + Duration::from_secs(seconds as u64)))
        }
    }
}

fn check_times(claims: &Value, leeway: Duration) -> Result<(), AuthError> {
    let now = SystemTime::now();
    let exp = timestamp(claims, "exp")?.ok_or_else(|| AuthError::MissingClaim("exp".into()))?;
    if now > exp + leeway {
        return Err(AuthError::Expired(exp));
    }
    if let Some(nbf) = timestamp(claims, "nbf")? {
        if now + leeway < nbf {
            return Err(AuthError::NotYetValid(nbf));
        }
    }
    Ok(())
}

fn check_audience(claims: &Value, config: &Issuer) -> Result<(), AuthError> {
    let audiences = claims::strings(claims.get("aud"));
    if audiences.iter().any(|a| config.audiences.contains(a)) {
        Ok(())
    } else {
        Err(AuthError::Audience(config.audiences.join("' or '")))
    }
}

fn check_scopes(claims: &Value, config: &Issuer) -> Result<(), AuthError> {
    let scopes = claims::scopes(claims);
    match config.required_scopes.iter().find(|s| !scopes.contains(s)) {
        Some(missing) => Err(AuthError::Scope(missing.clone())),
        None => Ok(()),
    }
}

/// Client-supplied text in an error message: control characters escaped, length capped.
pub(crate) fn printable(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(200)
        .flat_map(char::escape_default)
        .collect();
    if text.chars().count() > 200 {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_jwt_passwords_are_named_as_such() {
        for password in ["hunter2", "a.b", "a.b.c.d", "e30.e30.", "!!.e30.sig"] {
            let err = decode_unverified(password).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("password is not a JWT access token"),
                "{err}"
            );
        }
    }

    #[test]
    fn none_and_hmac_are_never_accepted() {
        for alg in ["none", "HS256", "HS512"] {
            let err = algorithm(&serde_json::json!({ "alg": alg })).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("token algorithm '{alg}' is not accepted")
            );
        }
        assert_eq!(
            algorithm(&serde_json::json!({"alg": "RS256"})).unwrap(),
            Algorithm::RS256
        );
    }

    #[test]
    fn expiry_is_reported_with_its_time() {
        let claims = serde_json::json!({"exp": 1_790_000_000});
        let err = check_times(&claims, Duration::from_secs(60)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "access token expired at 2026-09-21T14:13:20Z"
        );
    }

    #[test]
    fn client_text_in_messages_is_escaped_and_capped() {
        assert_eq!(printable("a\nb"), "a\\nb");
        assert_eq!(printable(&"x".repeat(300)).len(), 203);
    }
}
