//! Upstream pools end to end: reuse with a reset between clients (nothing of one identity's
//! session reaches the next), exhaustion (53300 after the wait), waiting for a connection,
//! replacement of a connection killed upstream, and connections closed after an unclean end.

use integration_tests::{text_rows, Harness};
use serde_json::json;
use std::time::{Duration, Instant};

/// A token for `user` in `group` (users beyond the demo's own).
fn token_in_group(h: &Harness, user: &str, group: &str) -> String {
    let claims = h.issuer.claims(
        user,
        Duration::from_secs(3600),
        json!({ "groups": [group] }),
    );
    h.issuer.sign(&claims).unwrap()
}

async fn one(client: &tokio_postgres::Client, sql: &str) -> String {
    text_rows(client, sql).await[0][0]
        .clone()
        .unwrap_or_else(|| "NULL".into())
}

async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    one(client, "SELECT pg_backend_pid()")
        .await
        .parse()
        .unwrap()
}

/// Waits until the metrics show `n` idle connections in the pool of (role, demo).
async fn wait_idle(h: &Harness, role: &str, n: usize) {
    let line = format!(
        "pgbastion_pool_connections{{role=\"{role}\",database=\"demo\",state=\"idle\"}} {n}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = h.admin_get("/metrics").await;
        if metrics.lines().any(|l| l == line) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the pool never had {n} idle connections of {role}:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn code(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map(|e| e.code().code().to_string())
        .unwrap_or_else(|| panic!("expected a server error, got {err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_carries_nothing_from_one_identity_to_the_next() {
    let h = Harness::start().await;
    let carol = h.connect("carol", &h.token("carol")).await.unwrap();
    let pid = backend_pid(&carol).await;
    carol
        .batch_execute(
            "SET work_mem = '7MB';
             SET search_path = pg_catalog;
             CREATE TEMP TABLE carols_scratch (x int);
             PREPARE carols_statement AS SELECT 1;
             LISTEN carols_channel;
             SELECT pg_advisory_lock(4242);
             DECLARE carols_cursor CURSOR WITH HOLD FOR SELECT 1;",
        )
        .await
        .unwrap();
    drop(carol);
    wait_idle(&h, "demo_owner", 1).await;

    // Another identity mapped to the same role gets the same upstream connection, reset.
    let dana = h
        .connect("dana", &token_in_group(&h, "dana", "dbadmins"))
        .await
        .unwrap();
    assert_eq!(backend_pid(&dana).await, pid, "the connection is reused");
    assert_eq!(one(&dana, "SHOW work_mem").await, "4MB");
    assert_eq!(one(&dana, "SHOW search_path").await, "\"$user\", public");
    assert_eq!(
        one(
            &dana,
            "SELECT count(*) FROM pg_class WHERE relname = 'carols_scratch'"
        )
        .await,
        "0"
    );
    assert_eq!(
        one(&dana, "SELECT count(*) FROM pg_prepared_statements").await,
        "0"
    );
    assert_eq!(
        one(&dana, "SELECT count(*) FROM pg_listening_channels()").await,
        "0"
    );
    assert_eq!(one(&dana, "SELECT count(*) FROM pg_cursors").await, "0");
    assert_eq!(
        one(
            &dana,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        )
        .await,
        "0"
    );
    assert_eq!(one(&dana, "SELECT current_user").await, "demo_owner");
    drop(dana);

    // A client of another role never gets that connection.
    let bob = h.connect("bob", &h.token("bob")).await.unwrap();
    assert_ne!(backend_pid(&bob).await, pid);
    assert_eq!(one(&bob, "SELECT current_user").await, "engineer");
    assert!(h.pool_events("reused").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_reused_only_with_the_same_startup_parameters() {
    let h = Harness::start().await;
    let connect = |name: &'static str| {
        let mut config = h.client_config("carol");
        config.application_name(name);
        let tls = h.tls();
        async move {
            let (client, connection) = config.connect(tls).await.unwrap();
            tokio::spawn(connection);
            client
        }
    };
    let first = connect("reporting").await;
    let pid = backend_pid(&first).await;
    drop(first);
    wait_idle(&h, "demo_owner", 1).await;
    let other = connect("etl").await;
    assert_ne!(
        backend_pid(&other).await,
        pid,
        "another application_name: a new connection"
    );
    assert_eq!(one(&other, "SHOW application_name").await, "etl");
    drop(other);
    wait_idle(&h, "demo_owner", 2).await;
    let again = connect("reporting").await;
    assert_eq!(backend_pid(&again).await, pid);
    assert_eq!(one(&again, "SHOW application_name").await, "reporting");
    // RESET returns to the client's own startup value, as on a fresh connection.
    again
        .batch_execute("SET application_name = 'changed'; RESET application_name")
        .await
        .unwrap();
    assert_eq!(one(&again, "SHOW application_name").await, "reporting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_makes_clients_wait_then_refuses_with_53300() {
    let h = Harness::start_with(|c| {
        c.pool.max_size = 2;
        c.pool.acquire_timeout = Duration::from_millis(500);
    })
    .await;
    let token = h.token("carol");
    let first = h.connect("carol", &token).await.unwrap();
    let second = h.connect("carol", &token).await.unwrap();
    let started = Instant::now();
    let refused = h.connect("carol", &token).await.unwrap_err();
    assert_eq!(code(&refused), "53300");
    let message = refused.as_db_error().unwrap().message().to_string();
    assert!(
        message.starts_with("no upstream connection available: all 2 connections of role 'demo_owner' to database 'demo' are in use"),
        "{message}"
    );
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(h.pool_events("exhausted").await, 1);

    // A client waiting when a connection comes back gets it.
    let pid = backend_pid(&first).await;
    let waiting = tokio::spawn({
        let config = h.client_config("carol");
        let tls = h.tls();
        async move {
            let (client, connection) = config.connect(tls).await.unwrap();
            tokio::spawn(connection);
            client
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(first);
    let third = waiting.await.unwrap();
    assert_eq!(backend_pid(&third).await, pid);
    drop(second);
    drop(third);

    // Many clients on the small pool: every one is served, never more than 2 upstream.
    let mut clients = Vec::new();
    for _ in 0..12 {
        let config = h.client_config("carol");
        let tls = h.tls();
        clients.push(tokio::spawn(async move {
            for _ in 0..3 {
                let (client, connection) = config.connect(tls.clone()).await.unwrap();
                tokio::spawn(connection);
                client.simple_query("SELECT pg_sleep(0.01)").await.unwrap();
            }
        }));
    }
    let count = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'demo_owner'";
    let mut most = 0;
    while !clients.iter().all(|c| c.is_finished()) {
        let n: usize = h
            .cluster
            .psql("demo", count)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        most = most.max(n);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for client in clients {
        client.await.unwrap();
    }
    assert!(most <= 2, "{most} upstream connections of a pool of 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_killed_upstream_is_replaced() {
    let h = Harness::start().await;
    let token = h.token("carol");
    let carol = h.connect("carol", &token).await.unwrap();
    let pid = backend_pid(&carol).await;
    drop(carol);
    wait_idle(&h, "demo_owner", 1).await;
    h.cluster
        .psql("demo", &format!("SELECT pg_terminate_backend({pid})"))
        .unwrap();
    let gone = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.cluster.psql("demo", &gone).unwrap().trim() != "0" {
        assert!(Instant::now() < deadline, "the backend did not end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = h.connect("carol", &token).await.unwrap();
    let replacement = backend_pid(&again).await;
    assert_ne!(replacement, pid);
    assert_eq!(one(&again, "SELECT 1").await, "1");
    assert_eq!(h.pool_events("closed_health_check").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_ends_inside_a_transaction_does_not_return_its_connection() {
    let h = Harness::start().await;
    let token = h.token("carol");
    let carol = h.connect("carol", &token).await.unwrap();
    let pid = backend_pid(&carol).await;
    carol
        .batch_execute("CREATE TABLE pool_probe (x int)")
        .await
        .unwrap();
    carol
        .batch_execute("BEGIN; INSERT INTO pool_probe VALUES (1)")
        .await
        .unwrap();
    drop(carol);
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.pool_events("closed_unclean_end").await == 0 {
        assert!(Instant::now() < deadline, "the connection was not closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = h.connect("carol", &token).await.unwrap();
    assert_ne!(backend_pid(&again).await, pid);
    assert_eq!(one(&again, "SELECT count(*) FROM pool_probe").await, "0");
    assert_eq!(
        one(&again, "SELECT now() = statement_timestamp()").await,
        "t"
    );
}
