//! Transaction pooling end to end: many clients on a small pool with prepared statements
//! moving between connections, transactions kept whole, session state pinning a session to
//! its connection (and reset before anyone else gets it), cancel, exhaustion, and pgbench
//! -M prepared as a real client.

use integration_tests::{text_rows, Harness};
use pgbastion_config::PoolMode;
use std::collections::BTreeSet;
use std::time::Duration;

async fn transaction_harness(max_size: usize) -> Harness {
    Harness::start_with(|c| {
        c.pool.mode = PoolMode::Transaction;
        c.pool.max_size = max_size;
        c.pool.acquire_timeout = Duration::from_millis(500);
    })
    .await
}

async fn one(client: &tokio_postgres::Client, sql: &str) -> String {
    text_rows(client, sql).await[0][0]
        .clone()
        .unwrap_or_else(|| "NULL".into())
}

/// Upstream connections of `role` open now.
fn upstream_sessions(h: &Harness, role: &str) -> usize {
    h.cluster
        .psql(
            "demo",
            &format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}'"),
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_follow_clients_across_the_connections_of_a_small_pool() {
    let h = transaction_harness(2).await;
    let mut clients = Vec::new();
    for i in 0..8i32 {
        let config = h.client_config("bob");
        let tls = h.tls();
        clients.push(tokio::spawn(async move {
            let (mut client, connection) = config.connect(tls).await.unwrap();
            tokio::spawn(connection);
            let statement = client
                .prepare("SELECT $1::int4 * 10 + 1, pg_backend_pid()")
                .await
                .unwrap();
            let mut pids = BTreeSet::new();
            for round in 0..30i32 {
                let value = i * 1000 + round;
                let row = client.query_one(&statement, &[&value]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), value * 10 + 1);
                pids.insert(row.get::<_, i32>(1));
                // A statement prepared and closed per call (tokio-postgres's query with a
                // string) on top.
                let row = client
                    .query_one("SELECT $1::text || '!'", &[&value.to_string()])
                    .await
                    .unwrap();
                assert_eq!(row.get::<_, String>(0), format!("{value}!"));
                tokio::task::yield_now().await;
            }
            // A transaction stays on one connection from BEGIN to COMMIT.
            let transaction = client.transaction().await.unwrap();
            let first: i32 = transaction
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0);
            tokio::time::sleep(Duration::from_millis(20)).await;
            let second: i32 = transaction
                .query_one(&statement, &[&1i32])
                .await
                .unwrap()
                .get(1);
            assert_eq!(first, second, "a transaction moved between connections");
            transaction.commit().await.unwrap();
            pids
        }));
    }
    let mut every = BTreeSet::new();
    let mut moved = 0;
    for client in clients {
        let pids = client.await.unwrap();
        moved += usize::from(pids.len() > 1);
        every.extend(pids);
    }
    assert!(
        every.len() <= 2,
        "{} upstream connections for a pool of 2",
        every.len()
    );
    assert!(moved > 0, "no client ever ran on a second connection");
    assert!(upstream_sessions(&h, "engineer") <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_keeps_a_session_on_its_connection_and_is_reset_after_it() {
    let h = transaction_harness(2).await;
    let carol = h.connect("carol", &h.token("carol")).await.unwrap();
    carol
        .batch_execute("SET work_mem = '7MB'; CREATE TEMP TABLE scratch (x int)")
        .await
        .unwrap();
    let pinned = one(&carol, "SELECT pg_backend_pid()").await;
    // Another client works meanwhile; it never gets carol's connection or settings.
    let dana_token = {
        let claims = h.issuer.claims(
            "dana",
            Duration::from_secs(3600),
            serde_json::json!({ "groups": ["dbadmins"] }),
        );
        h.issuer.sign(&claims).unwrap()
    };
    let dana = h.connect("dana", &dana_token).await.unwrap();
    for _ in 0..10 {
        assert_ne!(one(&dana, "SELECT pg_backend_pid()").await, pinned);
        assert_eq!(one(&dana, "SHOW work_mem").await, "4MB");
        assert_eq!(one(&carol, "SELECT pg_backend_pid()").await, pinned);
        assert_eq!(one(&carol, "SHOW work_mem").await, "7MB");
        assert_eq!(one(&carol, "SELECT count(*) FROM scratch").await, "0");
    }
    // Carol leaves: her connection is reset before it serves anyone. Two transactions held
    // open at once take both connections of the pool, so one of them is hers (the second
    // waits for it while it is being reset).
    drop(carol);
    let mut holds = Vec::new();
    let mut pids = Vec::new();
    for _ in 0..2 {
        let hold = h.connect("dana", &dana_token).await.unwrap();
        hold.batch_execute("BEGIN").await.unwrap();
        pids.push(one(&hold, "SELECT pg_backend_pid()").await);
        holds.push(hold);
    }
    let at = pids
        .iter()
        .position(|pid| *pid == pinned)
        .unwrap_or_else(|| panic!("carol's connection {pinned} did not come back: {pids:?}"));
    let hold = &holds[at];
    assert_eq!(one(hold, "SHOW work_mem").await, "4MB");
    assert_eq!(
        one(
            hold,
            "SELECT count(*) FROM pg_class WHERE relname = 'scratch'"
        )
        .await,
        "0"
    );
    for hold in &holds {
        hold.batch_execute("COMMIT").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_connection_a_transaction_pooled_session_is_using() {
    let h = transaction_harness(2).await;
    let bob = h.connect("bob", &h.token("bob")).await.unwrap();
    let cancel = bob.cancel_token();
    let sleeping = tokio::spawn(async move { bob.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel.cancel_query(h.tls()).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the query was cancelled")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "57014");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_too_long_for_a_connection_gets_53300() {
    let h = transaction_harness(1).await;
    let holder = h.connect("bob", &h.token("bob")).await.unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    one(&holder, "SELECT 1").await;
    // Connecting works (the login's connection goes back at once); the first statement
    // waits for the one connection, held by an open transaction.
    let waiting = h.connect("bob", &h.token("bob")).await.unwrap();
    let err = waiting.simple_query("SELECT 1").await.unwrap_err();
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "53300");
    assert!(
        db.message()
            .starts_with("no upstream connection available: all 1 connections of role 'engineer'"),
        "{}",
        db.message()
    );
    holder.batch_execute("COMMIT").await.unwrap();
    let next = h.connect("bob", &h.token("bob")).await.unwrap();
    assert_eq!(one(&next, "SELECT 1").await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_runs_on_a_transaction_pool() {
    let h = transaction_harness(2).await;
    let script = h.dir.path().join("select.sql");
    std::fs::write(
        &script,
        "\\set id random(1, 4)\nSELECT name FROM customers WHERE id = :id;\nBEGIN;\nSELECT count(*) FROM orders WHERE customer_id = :id;\nEND;\n",
    )
    .unwrap();
    let bin = pgbastion_devkit::cluster::find_bin().unwrap();
    let pgbench = if bin.join("pgbench").exists() {
        bin.join("pgbench")
    } else {
        "pgbench".into()
    };
    let output = tokio::task::block_in_place(|| {
        std::process::Command::new(pgbench)
            // A thread per client: pgbench prepares synchronously, so a thread waiting for a
            // connection would stall its other clients, whose open transactions hold the pool.
            .args([
                "-n", "-M", "prepared", "-c", "6", "-j", "6", "-t", "50", "-f",
            ])
            .arg(&script)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &h.proxy.port().to_string(),
                "-U",
                "carol",
                "demo",
            ])
            .env("PGPASSWORD", h.token("carol"))
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", h.ca_file())
            .output()
            .unwrap()
    });
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "pgbench failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("number of transactions actually processed: 300/300"),
        "{stdout}"
    );
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}"
    );
    assert!(upstream_sessions(&h, "demo_owner") <= 2);
}

/// A pipeline of renamed Binds larger than one write, with Binds too large to hold whole
/// (streamed through) in the middle: every answer comes back to its query, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_pipeline_with_large_binds_keeps_every_answer_in_place() {
    let h = transaction_harness(2).await;
    let client = h.connect("bob", &h.token("bob")).await.unwrap();
    let statement = client
        .prepare("SELECT length($1::text), $2::int4")
        .await
        .unwrap();
    let texts: Vec<String> = (0..400usize)
        .map(|i| match i % 50 {
            // 200 KiB: more than the proxy holds of one message before streaming it.
            7 => "x".repeat(200 * 1024 + i),
            _ => "y".repeat(300 + i),
        })
        .collect();
    let queries = texts.iter().enumerate().map(|(i, text)| {
        let client = &client;
        let statement = &statement;
        async move {
            let n = i as i32;
            let row = client.query_one(statement, &[text, &n]).await.unwrap();
            (row.get::<_, i32>(0), row.get::<_, i32>(1))
        }
    });
    // Polled together, tokio-postgres sends them as one pipeline.
    let answers = futures::future::join_all(queries).await;
    for (i, (length, n)) in answers.into_iter().enumerate() {
        assert_eq!((length as usize, n as usize), (texts[i].len(), i));
    }
}

/// Applications with different names and time zones share a full pool of one: the
/// connection is switched with SET, not replaced by a new login per transaction. A client
/// whose parameters differ in something that is never switched (here search_path) still
/// makes the idle connection close to make room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_adapts_names_and_time_zones_instead_of_logging_in_again() {
    let h = Harness::start_with(|c| {
        c.pool.mode = PoolMode::Transaction;
        c.pool.max_size = 1;
        // b's session ends (and its connection is reset) while a waits for the connection.
        c.pool.acquire_timeout = Duration::from_secs(10);
    })
    .await;
    let client = |app: &str, options: &str| {
        let mut config = h.client_config("bob");
        config.application_name(app).options(options);
        let tls = h.tls();
        async move {
            let (client, connection) = config.connect(tls).await.unwrap();
            tokio::spawn(connection);
            client
        }
    };
    // A name with a quote and a backslash stays a literal.
    let b_name = r"app_b's \ name";
    let a = client("app_a", "-c TimeZone=UTC").await;
    let b = client(b_name, "-c TimeZone=Asia/Tokyo").await;
    let ask = "SELECT current_setting('application_name'), current_setting('TimeZone'), \
               pg_backend_pid()::text";
    let mut pids = BTreeSet::new();
    for _ in 0..3 {
        for (client, app, zone) in [(&a, "app_a", "UTC"), (&b, b_name, "Asia/Tokyo")] {
            let row = &text_rows(client, ask).await[0];
            assert_eq!(row[0].as_deref(), Some(app));
            assert_eq!(row[1].as_deref(), Some(zone));
            pids.insert(row[2].clone().unwrap());
        }
    }
    assert_eq!(pids.len(), 1, "one connection served both: {pids:?}");
    assert!(h.pool_events("adapted").await >= 5);
    assert_eq!(h.pool_events("opened").await, 1);
    assert_eq!(h.pool_events("closed_to_make_room").await, 0);

    // b pins its session with a SET of its own, then leaves: the reset returns the
    // connection to its login values (a's), and the pool knows it: a client with b's
    // parameters gets the connection adapted again, not as the reset left it.
    b.simple_query("SET work_mem = '8MB'").await.unwrap();
    drop(b);
    let d = client(b_name, "-c TimeZone=Asia/Tokyo").await;
    assert_eq!(one(&d, "SHOW work_mem").await, "4MB");
    let row = &text_rows(&d, ask).await[0];
    assert_eq!(
        (row[0].as_deref(), row[1].as_deref()),
        (Some(b_name), Some("Asia/Tokyo"))
    );
    let row = &text_rows(&a, ask).await[0];
    assert_eq!(
        (row[0].as_deref(), row[1].as_deref()),
        (Some("app_a"), Some("UTC"))
    );

    let c = client("app_a", "-c TimeZone=UTC -c search_path=public").await;
    assert_eq!(one(&c, "SHOW search_path").await, "public");
    assert_eq!(h.pool_events("closed_to_make_room").await, 1);
    drop((a, d));
}

/// A value the server refuses when the pool switches a connection to it fails that client
/// (with the server's error, as a login with it would) and costs the pool nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_switch_fails_the_client_and_keeps_the_connection() {
    let h = Harness::start_with(|c| {
        c.pool.mode = PoolMode::Transaction;
        c.pool.max_size = 1;
    })
    .await;
    let mut config = h.client_config("bob");
    config.options("-c TimeZone=UTC");
    let (a, connection) = config.connect(h.tls()).await.unwrap();
    tokio::spawn(connection);
    let pid = one(&a, "SELECT pg_backend_pid()::text").await;

    let mut config = h.client_config("bob");
    config.options("-c TimeZone=Mars/Olympus_Mons");
    let Err(err) = config.connect(h.tls()).await else {
        panic!("a time zone PostgreSQL does not know was accepted");
    };
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
    assert_eq!(db.code().code(), "22023", "{db}");
    assert!(db.message().contains("TimeZone"), "{db}");

    assert_eq!(h.pool_events("adapt_refused").await, 1);
    assert_eq!(h.pool_events("closed_adapt_failed").await, 0);
    assert_eq!(one(&a, "SELECT pg_backend_pid()::text").await, pid);
    assert_eq!(one(&a, "SHOW TimeZone").await, "UTC");
}

/// `lastval()` and `currval()` read what the upstream session last saw. At the start of a
/// transaction on a shared connection that is another client's nextval(): refused (0A000,
/// with what to do instead); inside the transaction or query that ran nextval() they work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn earlier_sequence_values_are_refused_at_the_start_of_a_transaction() {
    let h = transaction_harness(1).await;
    h.cluster
        .psql(
            "demo",
            "CREATE SEQUENCE ids; GRANT USAGE ON SEQUENCE ids TO engineer",
        )
        .unwrap();
    let other = h.connect("bob", &h.token("bob")).await.unwrap();
    let client = h.connect("bob", &h.token("bob")).await.unwrap();
    // Another session's nextval() runs on the pool's one connection.
    assert_eq!(one(&other, "SELECT nextval('ids')").await, "1");

    for sql in [
        "SELECT lastval()",
        "SELECT currval('ids')",
        "BEGIN; SELECT lastval()",
    ] {
        let err = match client.simple_query(sql).await {
            Ok(rows) => panic!("{sql} was not refused: {rows:?}"),
            Err(err) => err,
        };
        let db = err.as_db_error().unwrap();
        assert_eq!(db.code().code(), "0A000", "{sql}: {db}");
        assert!(db.message().contains("another client set"), "{db}");
        assert!(db.hint().unwrap().contains("RETURNING"), "{db}");
    }

    // The same query, or the same transaction, as the nextval(): the session's own value.
    let rows = text_rows(&client, "SELECT nextval('ids'); SELECT lastval()").await;
    assert_eq!(
        rows,
        [vec![Some("2".to_string())], vec![Some("2".to_string())]]
    );
    let rows = text_rows(&client, "SELECT nextval('ids'); SELECT currval('ids')").await;
    assert_eq!(
        rows,
        [vec![Some("3".to_string())], vec![Some("3".to_string())]]
    );
    // A statement prepared ahead (asyncpg, pgx, Npgsql do) is checked when bound, not when
    // prepared.
    let ahead = client.prepare("SELECT lastval()").await.unwrap();
    let err = client.query_one(&ahead, &[]).await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "0A000", "{err}");
    let mut client = client;
    let transaction = client.transaction().await.unwrap();
    let next: i64 = transaction
        .query_one("SELECT nextval('ids')", &[])
        .await
        .unwrap()
        .get(0);
    let last: i64 = transaction
        .query_one("SELECT lastval()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((next, last), (4, 4));
    transaction.commit().await.unwrap();
    // Neither the refusals nor the calls pinned the session: the other session still gets
    // the pool's one connection.
    assert_eq!(one(&other, "SELECT nextval('ids')").await, "5");
}

/// DISCARD ALL (or DEALLOCATE ALL) drops the connection's prepared statements: a statement
/// prepared again afterwards is prepared upstream again, not taken as still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_prepared_again_after_discard_all_run() {
    let h = transaction_harness(2).await;
    let client = h.connect("carol", &h.token("carol")).await.unwrap();
    for reset in ["DISCARD ALL", "DEALLOCATE ALL"] {
        let statement = client.prepare("SELECT $1::int4 + 1").await.unwrap();
        let row = client.query_one(&statement, &[&1i32]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 2);
        drop(statement);
        client.batch_execute(reset).await.unwrap();
        let statement = client.prepare("SELECT $1::int4 + 1").await.unwrap();
        let row = client
            .query_one(&statement, &[&2i32])
            .await
            .unwrap_or_else(|err| {
                panic!("after {reset}: {err:?}");
            });
        assert_eq!(row.get::<_, i32>(0), 3);
    }
}

/// A session only runs its own statements: SQL EXECUTE, and EXPLAIN EXECUTE (which shows a
/// plan without running it), of a statement another session prepared on the shared
/// connection are refused with 26000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_sessions_statement_cannot_be_executed_or_explained() {
    let h = transaction_harness(1).await;
    let owner = h.connect("carol", &h.token("carol")).await.unwrap();
    let statement = owner
        .prepare("SELECT $1::int4 * 2 FROM orders")
        .await
        .unwrap();
    owner.query(&statement, &[&1i32]).await.unwrap();
    let name = one(
        &owner,
        "SELECT name FROM pg_prepared_statements WHERE statement LIKE '%* 2 FROM orders%'",
    )
    .await;
    assert!(name.starts_with("pgbastion_"), "{name}");
    let other = h.connect("carol", &h.token("carol")).await.unwrap();
    for sql in [
        format!("EXECUTE {name}(1)"),
        format!("EXPLAIN EXECUTE {name}(1)"),
    ] {
        let err = other.simple_query(&sql).await.unwrap_err();
        assert_eq!(err.code().unwrap().code(), "26000", "{sql}: {err:?}");
    }
    // The owner's statement still works.
    owner.query(&statement, &[&2i32]).await.unwrap();
}
