//! The relay: cancel, COPY, notifications, large values, upstream failures, vanishing clients,
//! and the FunctionCall refusal.

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use integration_tests::raw::{message, read_message};
use integration_tests::Harness;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_stops_the_running_query() {
    let h = Harness::start().await;
    let client = h.connect("alice", &h.token("alice")).await.unwrap();
    let cancel = client.cancel_token();
    let started = Instant::now();
    let query = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel.cancel_query(h.tls()).await.unwrap();
    let err = query.await.unwrap().unwrap_err();
    assert_eq!(err.code().unwrap().code(), "57014", "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_with_a_wrong_key_does_nothing() {
    let h = Harness::start().await;
    let client = h.connect("alice", &h.token("alice")).await.unwrap();
    let query = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(1.5)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Every proxy pid with a wrong secret: whatever the real key, none of these matches it.
    let mut tcp = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    let mut packet = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    packet.extend_from_slice(&1i32.to_be_bytes());
    packet.extend_from_slice(&12345i32.to_be_bytes());
    tcp.write_all(&packet).await.unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    assert!(answer.is_empty(), "a cancel request gets no answer");
    assert!(
        query.await.unwrap().is_ok(),
        "the query must not be cancelled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_works_both_ways() {
    let h = Harness::start().await;
    // carol: creating the table is DDL, which only the dbadmins policy allows.
    let client = h.connect("carol", &h.token("carol")).await.unwrap();
    client
        .batch_execute("CREATE TEMP TABLE items (id int, name text)")
        .await
        .unwrap();
    let sink = client.copy_in("COPY items FROM STDIN").await.unwrap();
    futures::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..10_000 {
        data.push_str(&format!("{i}\titem {i}\n"));
    }
    sink.send(Bytes::from(data.clone())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 10_000);
    let stream = client.copy_out("COPY items TO STDOUT").await.unwrap();
    let chunks: Vec<Bytes> = stream.map(|c| c.unwrap()).collect().await;
    let out: Vec<u8> = chunks.concat();
    assert_eq!(String::from_utf8(out).unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_an_idle_client() {
    let h = Harness::start().await;
    let config = h.client_config("bob");
    let (listener, mut connection) = config.connect(h.tls()).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) =
            futures::future::poll_fn(|cx| connection.poll_message(cx)).await
        {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener.batch_execute("LISTEN jobs").await.unwrap();
    let sender = h.connect("carol", &h.token("carol")).await.unwrap();
    sender.batch_execute("NOTIFY jobs, 'ready'").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, ("jobs".to_string(), "ready".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_megabyte_value_round_trips() {
    let h = Harness::start().await;
    let client = h.connect("bob", &h.token("bob")).await.unwrap();
    let value: Vec<u8> = (0..100 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let row = client
        .query_one("SELECT $1::bytea AS v, length($1::bytea) AS n", &[&value])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>("n") as usize, value.len());
    assert!(
        row.get::<_, &[u8]>("v") == value.as_slice(),
        "the value comes back intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_gets_a_clear_fatal_and_the_proxy_keeps_running() {
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let h = Harness::start_with(|c| c.upstream.port = closed_port).await;
    for _ in 0..2 {
        let (code, message) = h.connect_error("alice", "demo", &h.token("alice")).await;
        assert_eq!(
            (code.as_str(), message.as_str()),
            ("08001", "the upstream PostgreSQL is unreachable")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_upstream_credential_is_reported_as_the_proxys_problem() {
    let h = Harness::start().await;
    h.cluster
        .psql(
            "postgres",
            "ALTER ROLE analyst PASSWORD 'changed-behind-our-back'",
        )
        .unwrap();
    let (code, message) = h.connect_error("alice", "demo", &h.token("alice")).await;
    assert_eq!(code, "08006");
    assert_eq!(
        message,
        "pgbastion could not log in to the upstream PostgreSQL as role 'analyst'"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanishing_client_does_not_leave_its_query_running() {
    let h = Harness::start().await;
    let mut config = h.client_config("alice");
    config.application_name("vanishing");
    let (client, connection) = config.connect(h.tls()).await.unwrap();
    let driver = tokio::spawn(connection);
    let query = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    let active = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'vanishing'";
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.cluster.psql("postgres", active).unwrap().trim() != "1" {
        assert!(Instant::now() < deadline, "the query never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The client process dies: its socket closes without a Terminate.
    driver.abort();
    query.abort();
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.cluster.psql("postgres", active).unwrap().trim() != "0" {
        assert!(Instant::now() < deadline, "the upstream query kept running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_call_message_is_refused_and_the_session_continues() {
    let h = Harness::start_with(|c| c.listen.allow_plaintext = true).await;
    let mut tcp = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    let mut startup = vec![0, 3, 0, 0];
    for part in ["user", "alice", "database", "demo", ""] {
        startup.extend_from_slice(part.as_bytes());
        startup.push(0);
    }
    let mut packet = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend(startup);
    tcp.write_all(&packet).await.unwrap();
    let (tag, _) = read_message(&mut tcp).await;
    assert_eq!(tag, b'R');
    tcp.write_all(&message(b'p', format!("{}\0", h.token("alice")).as_bytes()))
        .await
        .unwrap();
    while read_message(&mut tcp).await.0 != b'Z' {}
    // FunctionCall of pg_backend_pid (OID 2026), no arguments, text result.
    tcp.write_all(&message(b'F', &[0, 0, 0x07, 0xea, 0, 0, 0, 0, 0, 0]))
        .await
        .unwrap();
    let (tag, body) = read_message(&mut tcp).await;
    assert_eq!(tag, b'E');
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("C42501"), "{text}");
    assert!(
        text.contains("denies the fast-path function call of function OID 2026"),
        "{text}"
    );
    assert_eq!(read_message(&mut tcp).await, (b'Z', vec![b'I']));
    tcp.write_all(&message(b'Q', b"SELECT 41 + 1\0"))
        .await
        .unwrap();
    let mut tags = Vec::new();
    loop {
        let (tag, body) = read_message(&mut tcp).await;
        tags.push(tag);
        if tag == b'D' {
            assert!(body.ends_with(b"42"), "{body:?}");
        }
        if tag == b'Z' {
            break;
        }
    }
    assert_eq!(tags, b"TDCZ");
}

async fn busy_poll_rounds(h: &Harness) -> u64 {
    h.metric("pgbastion_busy_poll_rounds_total")
        .await
        .expect("the busy polling counter")
}

/// `[runtime] busy_poll` on the single-threaded runtime (as `serve` runs with worker_threads
/// = 1): sessions relay as ever; while one client keeps the thread polling, a cancel request
/// (its own connection and task) still gets through; polling stops when the traffic does and
/// resumes with it; the proxy shuts down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_polling_relays_and_stops_with_the_traffic() {
    let mut h = Harness::start_with(|c| {
        c.runtime.worker_threads = 1;
        c.runtime.busy_poll = Duration::from_micros(200);
        c.shutdown.drain_timeout = Duration::from_secs(2);
    })
    .await;
    let before = busy_poll_rounds(&h).await;
    let client = h.connect("carol", &h.token("carol")).await.unwrap();
    for i in 0..200i32 {
        let row = client.query_one("SELECT $1::int + 1", &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i + 1);
    }
    let rows: Vec<String> = client
        .simple_query("SELECT 1; SELECT 'two'")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(rows, ["1", "two"]);
    assert!(
        busy_poll_rounds(&h).await > before,
        "no polling while queries ran"
    );

    // A second session runs queries back to back, so the thread keeps polling.
    let busy = h.connect("carol", &h.token("carol")).await.unwrap();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let looping = tokio::spawn(async move {
        let mut queries = 0u64;
        while stopped.try_recv().is_err() {
            busy.query_one("SELECT 1", &[]).await.unwrap();
            queries += 1;
        }
        (busy, queries)
    });
    let cancel = client.cancel_token();
    let started = Instant::now();
    let query = tokio::spawn(async move {
        let result = client.simple_query("SELECT pg_sleep(30)").await;
        (client, result)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel.cancel_query(h.tls()).await.unwrap();
    let (client, result) = query.await.unwrap();
    assert_eq!(result.unwrap_err().code().unwrap().code(), "57014");
    assert!(started.elapsed() < Duration::from_secs(10));
    stop.send(()).unwrap();
    let (busy, queries) = looping.await.unwrap();
    assert!(queries > 10, "the looping session ran {queries} queries");

    // Nothing forwarded: the thread sleeps rather than polls.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let idle = busy_poll_rounds(&h).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        busy_poll_rounds(&h).await,
        idle,
        "polling went on while idle"
    );
    // Traffic again: polling resumes (a loaded machine may run the poller only after a
    // window has passed, so a few tries).
    let mut resumed = false;
    for _ in 0..50 {
        client.simple_query("SELECT 1").await.unwrap();
        if busy_poll_rounds(&h).await > idle {
            resumed = true;
            break;
        }
    }
    assert!(resumed, "polling did not resume");

    drop((client, busy));
    tokio::time::timeout(Duration::from_secs(20), h.shutdown())
        .await
        .expect("the proxy stops");
}
