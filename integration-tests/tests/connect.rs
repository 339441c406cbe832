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
