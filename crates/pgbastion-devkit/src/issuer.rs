//! A development OpenID Connect issuer on 127.0.0.1: discovery, JWKS and tokens signed with
//! real RSA and EC keys. Tests use it to mint any token they need (expired, wrong audience,
//! rotated keys); the demo uses its token endpoint for its users.

use anyhow::Result;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;

/// Key types the issuer can sign with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rs256,
    Es256,
}

struct Key {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

#[derive(Default)]
struct Inner {
    /// Published keys; the last is the one `sign` uses.
    keys: Vec<Key>,
    /// Demo users: name -> extra claims (groups, ...).
    users: BTreeMap<String, Value>,
}

struct Shared {
    issuer: String,
    audience: String,
    inner: RwLock<Inner>,
    jwks_fetches: AtomicUsize,
}

/// A running development issuer. Stops serving when dropped.
pub struct DevIssuer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: JoinHandle<()>,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer")
            .field("issuer", &self.shared.issuer)
            .finish()
    }
}

impl Drop for DevIssuer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl DevIssuer {
    /// Starts on a free port of 127.0.0.1 with one RS256 key. Tokens get `aud = audience`.
    pub async fn start(audience: &str) -> Result<DevIssuer> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), audience).await
    }

    pub async fn start_on(addr: SocketAddr, audience: &str) -> Result<DevIssuer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            issuer: format!("http://{addr}"),
            audience: audience.to_string(),
            inner: RwLock::new(Inner::default()),
            jwks_fetches: AtomicUsize::new(0),
        });
        let issuer = DevIssuer {
            server: serve(listener, shared.clone()),
            shared,
            addr,
        };
        issuer.add_key(KeyKind::Rs256)?;
        Ok(issuer)
    }

    pub fn issuer(&self) -> &str {
        &self.shared.issuer
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many times the JWKS was fetched (discovery embeds no keys, so each load counts).
    pub fn jwks_fetches(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Stops answering: connections to the issuer are refused from now on.
    pub fn stop(&self) {
        self.server.abort();
    }

    /// Publishes a new key and signs with it from now on; returns its kid.
    pub fn add_key(&self, kind: KeyKind) -> Result<String> {
        let key = new_key(kind)?;
        let kid = key.kid.clone();
        self.shared
            .inner
            .write()
            .expect("issuer lock")
            .keys
            .push(key);
        Ok(kid)
    }

    /// Publishes a new key and withdraws all others: a key rotation.
    pub fn rotate(&self, kind: KeyKind) -> Result<String> {
        let key = new_key(kind)?;
        let kid = key.kid.clone();
        self.shared.inner.write().expect("issuer lock").keys = vec![key];
        Ok(kid)
    }

    /// Signs a key that is never published (as an attacker's would be), with the kid of the
    /// current key.
    pub fn sign_with_unpublished_key(&self, claims: &Value) -> Result<String> {
        let impostor = new_key(KeyKind::Rs256)?;
        let inner = self.shared.inner.read().expect("issuer lock");
        let current = inner.keys.last().expect("the issuer has a key");
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(current.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &impostor.encoding)?)
    }

    /// Registers a demo user for the token endpoint, with extra claims (e.g. groups).
    pub fn add_user(&self, name: &str, claims: Value) {
        self.shared
            .inner
            .write()
            .expect("issuer lock")
            .users
            .insert(name.to_string(), claims);
    }

    /// Standard claims for `user`, valid for `lifetime`, merged with `extra`.
    pub fn claims(&self, user: &str, lifetime: Duration, extra: Value) -> Value {
        standard_claims(&self.shared, user, lifetime, extra)
    }

    /// Signs arbitrary claims with the current key (typ `at+jwt`, as RFC 9068 access tokens).
    pub fn sign(&self, claims: &Value) -> Result<String> {
        sign(&self.shared, claims)
    }

    /// A valid one-hour token for `user` with `extra` claims.
    pub fn token(&self, user: &str, extra: Value) -> Result<String> {
        self.sign(&self.claims(user, Duration::from_secs(3600), extra))
    }
}

fn standard_claims(shared: &Shared, user: &str, lifetime: Duration, extra: Value) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let mut claims = json!({
        "iss": shared.issuer,
        "sub": format!("sub-{user}"),
        "aud": shared.audience,
        "iat": now,
        "nbf": now,
        "exp": now + lifetime.as_secs(),
        "preferred_username": user,
        "email": format!("{user}@example.com"),
        "scope": "openid postgres",
    });
    if let (Some(base), Value::Object(extra)) = (claims.as_object_mut(), extra) {
        base.extend(extra);
    }
    claims
}

fn sign(shared: &Shared, claims: &Value) -> Result<String> {
    let inner = shared.inner.read().expect("issuer lock");
    let key = inner.keys.last().expect("the issuer has a key");
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    header.typ = Some("at+jwt".into());
    Ok(jsonwebtoken::encode(&header, claims, &key.encoding)?)
}

fn new_key(kind: KeyKind) -> Result<Key> {
    let kid = format!("dev-{:08x}", rand::random::<u32>());
    let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
    match kind {
        KeyKind::Rs256 => {
            let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)?;
            let der = private.to_pkcs1_der()?;
            let public = private.to_public_key();
            Ok(Key {
                jwk: json!({
                    "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                    "n": b64(&public.n().to_bytes_be()),
                    "e": b64(&public.e().to_bytes_be()),
                }),
                kid,
                alg: Algorithm::RS256,
                encoding: EncodingKey::from_rsa_der(der.as_bytes()),
            })
        }
        KeyKind::Es256 => {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            // Uncompressed SEC1 point: 0x04 || X || Y.
            let point = pair.public_key_raw();
            Ok(Key {
                jwk: json!({
                    "kty": "EC", "use": "sig", "alg": "ES256", "kid": kid, "crv": "P-256",
                    "x": b64(&point[1..33]),
                    "y": b64(&point[33..65]),
                }),
                kid,
                alg: Algorithm::ES256,
                encoding: EncodingKey::from_ec_der(&pair.serialize_der()),
            })
        }
    }
}

fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) -> JoinHandle<()> {
    let app = Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/jwks", get(jwks))
        .route("/token/{user}", get(token))
        .with_state(shared);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

async fn discovery(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let issuer = &shared.issuer;
    Json(json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/authorize"),
        "token_endpoint": format!("{issuer}/token"),
        "jwks_uri": format!("{issuer}/jwks"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
    }))
}

async fn jwks(State(shared): State<Arc<Shared>>) -> Json<Value> {
    shared.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let inner = shared.inner.read().expect("issuer lock");
    let keys: Vec<Value> = inner.keys.iter().map(|k| k.jwk.clone()).collect();
    Json(json!({ "keys": keys }))
}

/// Demo only: a fresh one-hour access token for a registered demo user, as plain text.
async fn token(
    State(shared): State<Arc<Shared>>,
    Path(user): Path<String>,
) -> (StatusCode, String) {
    let extra = shared
        .inner
        .read()
        .expect("issuer lock")
        .users
        .get(&user)
        .cloned();
    let Some(extra) = extra else {
        return (StatusCode::NOT_FOUND, format!("no demo user '{user}'\n"));
    };
    let claims = standard_claims(&shared, &user, Duration::from_secs(3600), extra);
    match sign(&shared, &claims) {
        Ok(token) => (StatusCode::OK, token),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")),
    }
}
