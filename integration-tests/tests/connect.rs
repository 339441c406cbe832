//! Connecting through the proxy with real clients: queries run as the mapped role.

use integration_tests::Harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries_run_as_the_mapped_role() {
    let h = Harness::start().await;
    let client = h.connect("alice", &h.token("alice")).await.unwrap();
    let rows = client
        .simple_query("SELECT current_user; SELECT 1 + 1")
        .await
        .unwrap();
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["analyst", "2"]);
    let row = client
        .query_one("SELECT count(*) FROM customers WHERE id > $1", &[&0i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 3);
    let statement = client
        .prepare("SELECT name FROM customers WHERE id = $1")
        .await
        .unwrap();
    for (id, name) in [(1, "Ada Lovelace"), (2, "Alan Turing")] {
        let row = client.query_one(&statement, &[&id]).await.unwrap();
        assert_eq!(row.get::<_, &str>(0), name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_privileges_of_the_mapped_role_still_apply() {
    let h = Harness::start().await;
    let alice = h.connect("alice", &h.token("alice")).await.unwrap();
    let err = alice.execute("DELETE FROM orders", &[]).await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "42501", "{err}");
    let bob = h.connect("bob", &h.token("bob")).await.unwrap();
    let deleted = bob
        .execute("DELETE FROM orders WHERE id = 4", &[])
        .await
        .unwrap();
    assert_eq!(deleted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_parameter_status_is_relayed() {
    let h = Harness::start().await;
    let client = h.connect("carol", &h.token("carol")).await.unwrap();
    let row = client
        .query_one("SHOW server_version_num", &[])
        .await
        .unwrap();
    let version: i32 = row.get::<_, &str>(0).parse().unwrap();
    assert!(version >= 150000, "{version}");
    let row = client.query_one("SELECT session_user", &[]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "demo_owner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_connects_with_the_token_as_password() {
    let h = Harness::start().await;
    let token = h.token("alice");
    let (ok, out, err) = tokio::task::block_in_place(|| {
        h.psql("alice", &token, "SELECT current_user, count(*) FROM orders")
    });
    assert!(ok, "psql failed: {err}");
    assert_eq!(out.trim(), "analyst|4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_sessions_each_get_their_answer() {
    let h = Harness::start().await;
    let token = h.token("bob");
    let mut tasks = Vec::new();
    for i in 0..100i32 {
        let client = h.connect("bob", &token).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let row = client
                .query_one("SELECT $1::int4 * 2, pg_backend_pid()", &[&i])
                .await
                .unwrap();
            // Kept open until every answer is in: a session that ended would hand its
            // upstream connection on to the next.
            (row.get::<_, i32>(0), row.get::<_, i32>(1), client)
        }));
    }
    let mut pids = std::collections::BTreeSet::new();
    let mut open = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let (doubled, pid, client) = task.await.unwrap();
        assert_eq!(doubled, 2 * i as i32);
        pids.insert(pid);
        open.push(client);
    }
    assert_eq!(
        pids.len(),
        100,
        "each session has its own upstream connection"
    );
}

/// engineer's password is stored as md5 and asked for by md5; analyst's is asked for in clear.
fn legacy_upstream_methods(h: &Harness) {
    let sql = format!(
        "SET password_encryption = 'md5'; ALTER ROLE engineer PASSWORD '{}';",
        h.cluster.password("engineer")
    );
    h.cluster.psql("postgres", &sql).unwrap();
    let stored = h
        .cluster
        .psql(
            "postgres",
            "SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'engineer'",
        )
        .unwrap();
    assert!(stored.contains("md5"), "{stored}");
    // Each login's method goes to the server log.
    h.cluster
        .psql("postgres", "ALTER SYSTEM SET log_connections = on")
        .unwrap();
    h.cluster
        .prepend_hba("host all engineer 127.0.0.1/32 md5\nhost all analyst 127.0.0.1/32 password")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_and_password_upstream_logins_work_once_allowed() {
    let h = Harness::start_with(|config| {
        config.upstream.auth_methods = vec![
            pgbastion_config::UpstreamAuthMethod::ScramSha256,
            pgbastion_config::UpstreamAuthMethod::Md5,
            pgbastion_config::UpstreamAuthMethod::Password,
        ];
    })
    .await;
    legacy_upstream_methods(&h);
    for (user, role) in [
        ("bob", "engineer"),
        ("alice", "analyst"),
        ("carol", "demo_owner"),
    ] {
        let client = h.connect(user, &h.token(user)).await.unwrap();
        let row = client.query_one("SELECT current_user", &[]).await.unwrap();
        assert_eq!(row.get::<_, &str>(0), role);
    }
    let log = h.cluster.log();
    for login in [
        "identity=\"engineer\" method=md5",
        "identity=\"analyst\" method=password",
        "identity=\"demo_owner\" method=scram-sha-256",
    ] {
        assert!(log.contains(login), "{login} not in the server log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_only_scram_upstream_logins_are_answered() {
    let h = Harness::start().await;
    legacy_upstream_methods(&h);
    for user in ["bob", "alice"] {
        let (code, message) = h.connect_error(user, "demo", &h.token(user)).await;
        assert_eq!(code, "08006", "{user}: {message}");
        assert!(
            message.contains("by an authentication method it does not answer"),
            "{user}: {message}"
        );
    }
    // SCRAM roles are unaffected.
    let carol = h.connect("carol", &h.token("carol")).await.unwrap();
    carol.simple_query("SELECT 1").await.unwrap();
}
