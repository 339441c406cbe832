//! Operations end to end: the audit log (records, redaction, chain, no secrets in any log),
//! metrics and health, limits, configuration reload and draining shutdown.

use integration_tests::Harness;
use serde_json::Value;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Everything the proxy logs in this test process, at debug level.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_writer(move || Capture(sink.clone()))
            .try_init()
            .ok();
        logs
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn code(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map(|e| e.code().code().to_string())
        .unwrap_or_else(|| panic!("expected a server error, got {err}"))
}

fn statements<'a>(records: &'a [Value], user: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["event"] == "statement" && r["session"]["user"] == user)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_is_audited_redacted_and_chained_and_no_secret_is_logged() {
    let logs = captured_logs();
    let h = Harness::start().await;
    let token = h.token("alice");
    let alice = h.connect("alice", &token).await.unwrap();
    alice
        .simple_query("SELECT name FROM customers WHERE id = 1")
        .await
        .unwrap();
    let statement = alice
        .prepare("SELECT name FROM customers WHERE id = $1")
        .await
        .unwrap();
    alice.query(&statement, &[&2i32]).await.unwrap();
    let denied = alice
        .simple_query("SELECT ssn FROM customers WHERE name = 'Ada'")
        .await
        .unwrap_err();
    assert_eq!(code(&denied), "42501");
    let failed = alice.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(code(&failed), "22012");
    // A forged token: refused and audited, never recorded.
    let forged = format!("{}x", &token[..token.len() - 1]);
    assert!(h.connect("alice", &forged).await.is_err());
    drop(alice);

    let records = h
        .audit_records(|r| r.iter().any(|r| r["event"] == "disconnect"))
        .await;
    let auths: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"] == "authentication")
        .collect();
    assert!(auths.iter().any(|a| a["outcome"] == "success"
        && a["user"] == "alice"
        && a["role"] == "analyst"
        && a["policy"] == "analysts"
        && a["tls"].as_str().is_some_and(|t| t.starts_with("TLS"))));
    assert!(auths.iter().any(|a| a["outcome"] == "failure"
        && a["sqlstate"] == "28P01"
        && a["reason"] == "token signature is invalid"));
    let alice_statements = statements(&records, "alice");
    let find = |pred: &dyn Fn(&Value) -> bool| {
        *alice_statements
            .iter()
            .find(|r| pred(r))
            .unwrap_or_else(|| panic!("no such record in {alice_statements:#?}"))
    };
    let simple = find(&|r| r["kind"] == "query" && r["status"] == "ok");
    assert_eq!(simple["text"], "SELECT name FROM customers WHERE id = $0");
    assert_eq!(simple["rows"], 1);
    assert_eq!(simple["decision"], "allow");
    assert_eq!(simple["classes"], serde_json::json!(["read"]));
    assert_eq!(simple["relations"], serde_json::json!(["customers"]));
    assert_eq!(simple["session"]["role"], "analyst");
    assert!(simple["policy_version"].as_str().unwrap().len() == 12);
    let execute = find(&|r| r["kind"] == "execute");
    assert_eq!(execute["text"], "SELECT name FROM customers WHERE id = $1");
    assert_eq!(
        (execute["status"].clone(), execute["rows"].clone()),
        ("ok".into(), 1.into())
    );
    let denial = find(&|r| r["decision"] == "deny");
    assert_eq!(denial["text"], "SELECT ssn FROM customers WHERE name = $0");
    assert_eq!(denial["rule"], "deny_columns");
    assert_eq!(denial["sqlstate"], "42501");
    assert_eq!(denial["status"], "denied");
    let error = find(&|r| r["status"] == "error");
    assert_eq!(error["sqlstate"], "22012");
    let disconnect = records
        .iter()
        .find(|r| r["event"] == "disconnect" && r["session"]["user"] == "alice")
        .unwrap();
    assert!(disconnect["bytes_from_client"].as_u64().unwrap() > 100);
    assert!(disconnect["bytes_to_client"].as_u64().unwrap() > 100);

    let verified = pgbastion_audit::verify_files(&[h.audit_log()]).unwrap();
    assert_eq!(verified.records as usize, records.len());
    // Neither the token nor any upstream password appears in the audit log or the logs.
    let audit = std::fs::read_to_string(h.audit_log()).unwrap();
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(logged.contains("session started"), "logs are captured");
    let signature = token.rsplit('.').next().unwrap();
    for text in [&audit, &logged] {
        assert!(!text.contains(signature) && !text.contains(&forged[forged.len() - 40..]));
        for role in ["analyst", "engineer", "demo_owner"] {
            assert!(
                !text.contains(h.cluster.password(role)),
                "{role}'s password"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_tell_what_the_proxy_does() {
    let h = Harness::start().await;
    let alice = h.connect("alice", &h.token("alice")).await.unwrap();
    alice.simple_query("SELECT 1").await.unwrap();
    assert!(alice.simple_query("DELETE FROM orders").await.is_err());
    assert!(h.connect("alice", "not-a-token").await.is_err());
    let (status, metrics) = h.admin_get("/metrics").await;
    assert_eq!(status, 200);
    for expected in [
        "pgbastion_client_connections 1",
        "pgbastion_statements_total{decision=\"allow\",class=\"read\"} 1",
        "pgbastion_statements_total{decision=\"deny\",class=\"write\"} 1",
        "pgbastion_auth_failures_total{reason=\"not_jwt\"} 1",
        "pgbastion_config_generation 1",
        "pgbastion_audit_dropped_total 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == expected),
            "{expected} in\n{metrics}"
        );
    }
    for family in [
        "pgbastion_decision_seconds_count",
        "pgbastion_statement_seconds_bucket{le=\"+Inf\"}",
        "pgbastion_upstream_connect_seconds_count",
        "pgbastion_jwks_fetches_total{issuer=",
        "pgbastion_audit_queue_depth",
    ] {
        assert!(metrics.contains(family), "{family} in\n{metrics}");
    }
    assert_eq!(h.admin_get("/healthz").await, (200, "ok\n".into()));
    assert_eq!(h.admin_get("/readyz").await, (200, "ready\n".into()));
    assert_eq!(h.admin_get("/nothing").await.0, 404);

    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = Harness::start_with(|c| c.upstream.port = closed_port).await;
    let (status, body) = down.admin_get("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("is not reachable"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_with_what_was_hit_and_when_to_retry() {
    let h = Harness::start_with(|config| {
        let analysts = config.policies.get_mut("analysts").unwrap();
        analysts.limits.statements_per_second = 1;
        analysts.limits.statement_burst = 3;
        analysts.limits.max_connections = 1;
        config.limits.auth_attempts_per_minute = 2;
    })
    .await;
    let alice = h.connect("alice", &h.token("alice")).await.unwrap();
    for _ in 0..3 {
        alice.simple_query("SELECT 1").await.unwrap();
    }
    let err = alice.simple_query("SELECT 1").await.unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "53400");
    assert!(
        db.message()
            .starts_with("statement rate limit exceeded (1 per second); retry in "),
        "{}",
        db.message()
    );
    // The session goes on once the budget refills.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    alice.simple_query("SELECT 1").await.unwrap();

    let (code, message) = h.connect_error("alice", "demo", &h.token("alice")).await;
    assert_eq!(code, "53300");
    assert_eq!(
        message,
        "too many sessions for alice (limit 1); close one and retry"
    );
    // Bob's policy has no limits.
    let _bob = h.connect("bob", &h.token("bob")).await.unwrap();
    let _bob2 = h.connect("bob", &h.token("bob")).await.unwrap();

    // Token guessing: after the failures allowed, even a good token waits.
    for _ in 0..3 {
        assert!(h.connect("bob", "guess").await.is_err());
    }
    let (code, message) = h.connect_error("bob", "demo", &h.token("bob")).await;
    assert_eq!(code, "53300");
    assert!(
        message.starts_with("too many failed authentications from 127.0.0.1; retry in "),
        "{message}"
    );
    let (_, metrics) = h.admin_get("/metrics").await;
    for limit in [
        "statement_rate",
        "identity_connections",
        "auth_attempts_per_minute",
    ] {
        assert!(
            metrics.contains(&format!(
                "pgbastion_rate_limited_total{{limit=\"{limit}\"}}"
            )),
            "{limit}"
        );
    }
    let records = h
        .audit_records(|r| {
            r.iter()
                .any(|r| r["event"] == "statement" && r["sqlstate"] == "53400")
        })
        .await;
    assert!(records
        .iter()
        .any(|r| r["event"] == "statement" && r["rule"] == "statement_rate"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_to_running_sessions_and_a_bad_one_changes_nothing() {
    let h = Harness::start().await;
    let alice = h.connect("alice", &h.token("alice")).await.unwrap();
    let prepared = alice.prepare("SELECT count(*) FROM orders").await.unwrap();
    alice.query(&prepared, &[]).await.unwrap();
    alice.simple_query("SELECT * FROM orders").await.unwrap();

    let mut stricter = h.config.clone();
    stricter
        .policies
        .get_mut("analysts")
        .unwrap()
        .deny_read
        .push("public.orders".into());
    h.handle.reload(stricter.clone()).await.unwrap();
    let denied = "policy 'analysts' denies reading public.orders";
    let err = alice
        .simple_query("SELECT * FROM orders")
        .await
        .unwrap_err();
    assert_eq!(err.as_db_error().unwrap().message(), denied);
    // A statement prepared before the reload is decided again at its next Bind.
    let err = alice.query(&prepared, &[]).await.unwrap_err();
    assert_eq!(err.as_db_error().unwrap().message(), denied);
    alice
        .simple_query("SELECT name FROM customers WHERE id = 1")
        .await
        .unwrap();

    // Keys read only at start: refused, and the running configuration stays.
    let mut moved = stricter.clone();
    moved.listen.address = "127.0.0.1:1".parse().unwrap();
    moved
        .policies
        .get_mut("analysts")
        .unwrap()
        .deny_read
        .clear();
    let err = h.handle.reload(moved).await.unwrap_err();
    assert!(err.contains("[listen] changed"), "{err}");
    assert!(alice.simple_query("SELECT * FROM orders").await.is_err());
    let (_, metrics) = h.admin_get("/metrics").await;
    assert!(metrics.contains("pgbastion_config_reloads_total{outcome=\"success\"} 1"));
    assert!(metrics.contains("pgbastion_config_reloads_total{outcome=\"failure\"} 1"));
    assert!(metrics.contains("pgbastion_config_generation 2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_then_ends_sessions_with_57p01() {
    let mut h = Harness::start_with(|config| {
        config.shutdown.drain_timeout = Duration::from_millis(800);
    })
    .await;
    let alice = h.connect("alice", &h.token("alice")).await.unwrap();
    let bob = h.connect("bob", &h.token("bob")).await.unwrap();
    // Bob finishes during the drain; alice stays until she is ended.
    let bob_done = tokio::spawn(async move {
        bob.simple_query("SELECT pg_sleep(0.3)").await.unwrap();
    });
    let started = Instant::now();
    let proxy = h.proxy;
    let stopping = tokio::spawn(async move {
        h.shutdown().await;
        h
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(proxy).await.is_err(),
        "no new connections while draining"
    );
    bob_done.await.unwrap();
    let h = stopping.await.unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(800), "{elapsed:?}");
    let err = alice.simple_query("SELECT 1").await.unwrap_err();
    assert!(err.is_closed() || code(&err) == "57P01", "{err}");
    let records = h.audit_records(|_| true).await;
    assert!(records
        .iter()
        .any(|r| r["event"] == "disconnect" && r["reason"] == "shutdown"));
    assert!(pgbastion_audit::verify_files(&[h.audit_log()]).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rotates_the_tls_certificate_without_a_restart() {
    let h = Harness::start().await;
    let old = h.connect("alice", &h.token("alice")).await.unwrap();
    let dir = h.dir.path().join("rotated");
    std::fs::create_dir(&dir).unwrap();
    let (cert, key) = pgbastion_devkit::SelfSigned::localhost()
        .unwrap()
        .write_to(&dir)
        .unwrap();
    let new_pem = std::fs::read_to_string(&cert).unwrap();
    let mut rotated = h.config.clone();
    let tls = rotated.tls.as_mut().unwrap();
    tls.cert_file = cert;
    tls.key_file = key;
    h.handle.reload(rotated).await.unwrap();

    let connect = |pem: String| {
        let mut config: tokio_postgres::Config =
            h.connection_string("alice", "demo").parse().unwrap();
        config.password(h.token("alice"));
        async move {
            let tls =
                tokio_postgres_rustls::MakeRustlsConnect::new(integration_tests::client_tls(&pem));
            config.connect(tls).await.map(|(client, connection)| {
                tokio::spawn(connection);
                client
            })
        }
    };
    let new = connect(new_pem)
        .await
        .expect("the new certificate is served");
    new.simple_query("SELECT 1").await.unwrap();
    assert!(
        connect(h.cert_pem.clone()).await.is_err(),
        "the old certificate is no longer served"
    );
    // Sessions opened before the rotation carry on.
    old.simple_query("SELECT 1").await.unwrap();
}
