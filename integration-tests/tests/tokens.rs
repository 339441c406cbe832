//! Every way a token can be refused, with its SQLSTATE and message; key rotation and an
//! identity provider that goes down.

use integration_tests::{Harness, KeyKind};
use serde_json::json;
use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_failures_get_their_sqlstate_and_an_actionable_message() {
    let h = Harness::start().await;
    let sign = |claims: serde_json::Value| h.issuer.sign(&claims).unwrap();
    let mut expired = h.claims("alice", HOUR);
    expired["exp"] = json!(1_790_000_000);
    let mut wrong_audience = h.claims("alice", HOUR);
    wrong_audience["aud"] = json!("someone-else");
    let mut untrusted = h.claims("alice", HOUR);
    untrusted["iss"] = json!("https://evil.example");
    let mut not_yet = h.claims("alice", HOUR);
    not_yet["nbf"] = json!(4_000_000_000u64);
    let cases = [
        (
            "alice",
            sign(expired),
            "28P01",
            "access token expired at 2026-09-21T14:13:20Z",
        ),
        (
            "alice",
            sign(wrong_audience),
            "28000",
            "token audience does not include 'pgbastion'",
        ),
        (
            "alice",
            sign(untrusted),
            "28000",
            "issuer 'https://evil.example' is not trusted",
        ),
        (
            "alice",
            sign(not_yet),
            "28P01",
            "access token is not valid before 2096-10-02T07:06:40Z",
        ),
        (
            "alice",
            "hunter2".to_string(),
            "28P01",
            "password is not a JWT access token: expected three dot-separated parts",
        ),
        (
            "bob",
            h.token("alice"),
            "28000",
            "user 'bob' does not match the token's preferred_username 'alice'",
        ),
        (
            "alice",
            h.issuer
                .sign_with_unpublished_key(&h.claims("alice", HOUR))
                .unwrap(),
            "28P01",
            "token signature is invalid",
        ),
    ];
    for (user, token, code, message) in cases {
        let (got_code, got_message) = h.connect_error(user, "demo", &token).await;
        assert_eq!((got_code.as_str(), got_message.as_str()), (code, message));
        assert!(
            !got_message.contains(&token),
            "the token must never be echoed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmac_and_unsigned_tokens_are_refused_whatever_their_claims() {
    use base64::Engine;
    let h = Harness::start().await;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let claims = h.claims("alice", HOUR);
    for alg in ["none", "HS256"] {
        let token = format!(
            "{}.{}.c2lnbmF0dXJl",
            b64(json!({"alg": alg, "typ": "JWT"})),
            b64(claims.clone())
        );
        let (code, message) = h.connect_error("alice", "demo", &token).await;
        assert_eq!(
            (code.as_str(), message),
            ("28P01", format!("token algorithm '{alg}' is not accepted"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_scopes_are_enforced() {
    let h = Harness::start_with(|c| c.issuers[0].required_scopes = vec!["db:connect".into()]).await;
    let (code, message) = h.connect_error("alice", "demo", &h.token("alice")).await;
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("28000", "token lacks the required scope 'db:connect'")
    );
    let mut claims = h.claims("alice", HOUR);
    claims["scope"] = json!("openid db:connect");
    h.connect("alice", &h.issuer.sign(&claims).unwrap())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmapped_identities_and_databases_are_refused_by_name() {
    let h = Harness::start().await;
    let stranger = h
        .issuer
        .token("mallory", json!({"groups": ["sales"]}))
        .unwrap();
    let (code, message) = h.connect_error("mallory", "demo", &stranger).await;
    assert_eq!(
        (code.as_str(), message.as_str()),
        (
            "28000",
            "no mapping rule matches user 'mallory' (groups: sales)"
        )
    );
    let (code, message) = h.connect_error("alice", "payroll", &h.token("alice")).await;
    assert_eq!(code, "28000");
    assert!(
        message
            .starts_with("database 'payroll' is not allowed for user 'alice' by rule 'analysts'"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec_keys_verify_too() {
    let h = Harness::start().await;
    h.issuer.add_key(KeyKind::Es256).unwrap();
    let client = h.connect("alice", &h.token("alice")).await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_fetched_when_first_seen() {
    let h = Harness::start().await;
    let fetches = h.issuer.jwks_fetches();
    h.issuer.rotate(KeyKind::Rs256).unwrap();
    let client = h.connect("alice", &h.token("alice")).await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    assert_eq!(
        h.issuer.jwks_fetches(),
        fetches + 1,
        "one refetch for the new kid"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kids_refetch_at_most_once_per_interval() {
    let h =
        Harness::start_with(|c| c.issuers[0].jwks_min_refetch = Duration::from_secs(3600)).await;
    let fetches = h.issuer.jwks_fetches();
    // The keys were fetched at startup, less than an interval ago: a flood of tokens with an
    // unknown kid must not turn into a flood of requests to the identity provider.
    h.issuer.add_key(KeyKind::Rs256).unwrap();
    for _ in 0..5 {
        let (code, message) = h.connect_error("alice", "demo", &h.token("alice")).await;
        assert_eq!(code, "28P01");
        assert!(
            message.ends_with(&format!(
                "is not published by issuer '{}' (keys were refreshed moments ago)",
                h.issuer.issuer()
            )),
            "{message}"
        );
    }
    assert_eq!(h.issuer.jwks_fetches(), fetches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_keys_keep_working_while_the_identity_provider_is_down() {
    let h = Harness::start().await;
    h.issuer.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let client = h.connect("alice", &h.token("alice")).await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kid_while_the_identity_provider_is_down_is_refused_clearly() {
    let h = Harness::start().await;
    h.issuer.stop();
    h.issuer.rotate(KeyKind::Rs256).unwrap();
    let (code, message) = h.connect_error("alice", "demo", &h.token("alice")).await;
    assert_eq!(code, "28P01");
    assert!(
        message.ends_with("(and its keys could not be refetched)"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_its_token_expires_after_a_warning() {
    let h = Harness::start_with(|c| {
        c.issuers[0].leeway = Duration::ZERO;
        c.session.expiry_warning = Duration::from_secs(4);
    })
    .await;
    let token = h
        .issuer
        .sign(&h.claims("alice", Duration::from_secs(3)))
        .unwrap();
    let mut config: tokio_postgres::Config = h.connection_string("alice", "demo").parse().unwrap();
    config.password(&token);
    let (client, mut connection) = config.connect(h.tls()).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match futures::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notice(notice))) => {
                    let _ = tx.send(format!("notice: {}", notice.message()));
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => {
                    let text = err
                        .as_db_error()
                        .map(|e| format!("{}: {}", e.code().code(), e.message()));
                    let _ = tx.send(format!("error: {}", text.unwrap_or(err.to_string())));
                    break;
                }
                None => break,
            }
        }
    });
    client.simple_query("SELECT 1").await.unwrap();
    let notice = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        notice.starts_with("notice: the access token of this session expires at"),
        "{notice}"
    );
    let end = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        end,
        "error: 28000: the access token of this session has expired"
    );
    assert!(client.simple_query("SELECT 1").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_token_is_remembered_only_while_it_and_its_key_are_valid() {
    let h = Harness::start_with(|c| c.issuers[0].leeway = Duration::ZERO).await;
    // Expires in two seconds (times are whole seconds, so at least one second from now).
    let short = {
        let mut claims = h.claims("alice", HOUR);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        claims["exp"] = json!(now + 2);
        h.issuer.sign(&claims).unwrap()
    };
    let long = h.token("alice");
    for _ in 0..2 {
        h.connect("alice", &short).await.unwrap();
        h.connect("alice", &long).await.unwrap();
    }
    // The remembered token still names its own user only.
    let (code, message) = h.connect_error("bob", "demo", &long).await;
    assert_eq!(code, "28000");
    assert_eq!(
        message,
        "user 'bob' does not match the token's preferred_username 'alice'"
    );
    // Its expiry still holds.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (code, message) = h.connect_error("alice", "demo", &short).await;
    assert_eq!(code, "28P01");
    assert!(message.starts_with("access token expired at "), "{message}");
    // A key rotation retires it: once the new key set is fetched (here for a token of the new
    // key), a token of the withdrawn key is verified again, and refused.
    h.issuer.rotate(KeyKind::Rs256).unwrap();
    h.connect("alice", &h.token("alice")).await.unwrap();
    let (code, _) = h.connect_error("alice", "demo", &long).await;
    assert_eq!(code, "28P01");
}

/// The kid of a token header is read before any signature is checked: a hostile one (control
/// characters, tens of kilobytes) reaches the client's message escaped and cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_kid_is_escaped_and_cut_short_in_the_refusal() {
    use base64::Engine;
    let h = Harness::start().await;
    let encode = |value: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
    };
    let kid = format!("evil\r\nline{}", "k".repeat(30_000));
    let header = serde_json::json!({"alg": "RS256", "typ": "at+jwt", "kid": kid});
    let token = format!(
        "{}.{}.c2lnbmF0dXJl",
        encode(&header),
        encode(&h.claims("alice", Duration::from_secs(3600)))
    );
    let (code, message) = h.connect_error("alice", "demo", &token).await;
    assert_eq!(code, "28P01");
    assert!(message.contains("evil\\r\\nline"), "{message}");
    assert!(
        !message.contains('\n') && message.len() < 1_000,
        "{message}"
    );
}
