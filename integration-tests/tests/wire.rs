//! The first bytes on the wire: TLS negotiation, plaintext refusal, injected plaintext,
//! GSSENC then SSL, direct SSL, protocol negotiation and startup parameters.

use integration_tests::raw::{message, read_message};
use integration_tests::{client_tls, Harness};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

fn startup(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = vec![0, 3];
    body.extend_from_slice(&minor.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend(body);
    packet
}

async fn tls_connect(
    h: &Harness,
    tcp: TcpStream,
    alpn: bool,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut config = client_tls(&h.cert_pem);
    if alpn {
        config.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

fn field(body: &[u8], code: u8) -> String {
    body.split(|b| *b == 0)
        .find(|f| f.first() == Some(&code))
        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_clients_are_told_that_ssl_is_required() {
    let h = Harness::start().await;
    let mut config = h.client_config("alice");
    config.ssl_mode(tokio_postgres::config::SslMode::Disable);
    let Err(err) = config.connect(tokio_postgres::NoTls).await else {
        panic!("plaintext must be refused")
    };
    let db = err.as_db_error().expect("a FATAL from the proxy");
    assert_eq!(db.code().code(), "28000");
    assert_eq!(
        db.message(),
        "pgbastion requires SSL; connect with sslmode=require or stronger"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_sent_after_an_ssl_request_aborts_the_connection() {
    let h = Harness::start().await;
    let mut tcp = TcpStream::connect(h.proxy).await.unwrap();
    // An attacker in the middle appends a plaintext startup to the client's SSLRequest.
    let mut bytes = SSL_REQUEST.to_vec();
    bytes.extend(startup(0, &[("user", "alice"), ("database", "demo")]));
    tcp.write_all(&bytes).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the proxy must close the connection");
    assert!(
        answer.is_empty(),
        "no 'S' and nothing else may be answered, got {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_is_declined_and_ssl_follows_on_the_same_socket() {
    let h = Harness::start().await;
    let mut tcp = TcpStream::connect(h.proxy).await.unwrap();
    tcp.write_all(&GSSENC_REQUEST).await.unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    tcp.write_all(&SSL_REQUEST).await.unwrap();
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
    let mut tls = tls_connect(&h, tcp, false).await.unwrap();
    tls.write_all(&startup(0, &[("user", "alice"), ("database", "demo")]))
        .await
        .unwrap();
    let (tag, body) = read_message(&mut tls).await;
    assert_eq!(
        (tag, body),
        (b'R', vec![0, 0, 0, 3]),
        "AuthenticationCleartextPassword"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_ssl_needs_the_postgresql_alpn() {
    let h = Harness::start().await;
    let tcp = TcpStream::connect(h.proxy).await.unwrap();
    let mut tls = tls_connect(&h, tcp, true).await.unwrap();
    tls.write_all(&startup(0, &[("user", "alice")]))
        .await
        .unwrap();
    let (tag, _) = read_message(&mut tls).await;
    assert_eq!(tag, b'R');

    let tcp = TcpStream::connect(h.proxy).await.unwrap();
    let closed = match tls_connect(&h, tcp, false).await {
        Err(_) => true,
        Ok(mut tls) => {
            let _ = tls.write_all(&startup(0, &[("user", "alice")])).await;
            let mut buf = Vec::new();
            matches!(tls.read_to_end(&mut buf).await, Ok(0) | Err(_)) && buf.is_empty()
        }
    };
    assert!(closed, "direct SSL without ALPN must be refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_protocol_minor_version_is_negotiated_down() {
    let h = Harness::start().await;
    let mut tcp = TcpStream::connect(h.proxy).await.unwrap();
    tcp.write_all(&SSL_REQUEST).await.unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    let mut tls = tls_connect(&h, tcp, false).await.unwrap();
    tls.write_all(&startup(2, &[("user", "alice"), ("_pq_.test_option", "1")]))
        .await
        .unwrap();
    let (tag, body) = read_message(&mut tls).await;
    assert_eq!(tag, b'v');
    assert_eq!(
        &body[..8],
        &[0, 3, 0, 0, 0, 0, 0, 1],
        "version 3.0 and one unknown option"
    );
    assert_eq!(&body[8..], b"_pq_.test_option\0");
    let (tag, _) = read_message(&mut tls).await;
    assert_eq!(tag, b'R');
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_changing_startup_settings_are_refused() {
    let h = Harness::start().await;
    for options in [
        "-c role=postgres",
        "-c session_authorization=postgres",
        "-c work_mem=1GB",
    ] {
        let mut config = h.client_config("alice");
        config.options(options);
        let Err(err) = config.connect(h.tls()).await else {
            panic!("{options} must be refused")
        };
        let db = err.as_db_error().expect("a FATAL from the proxy");
        assert_eq!(db.code().code(), "42501", "{options}");
        assert!(
            db.message().starts_with("setting in options"),
            "{}",
            db.message()
        );
    }
    let mut config = h.client_config("alice");
    config.options("-c search_path=public -c statement_timeout=5s");
    let (client, connection) = config.connect(h.tls()).await.unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "5s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_connections_are_refused() {
    let h = Harness::start().await;
    let tcp = TcpStream::connect(h.proxy).await.unwrap();
    let mut tcp = tcp;
    tcp.write_all(&SSL_REQUEST).await.unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    let mut tls = tls_connect(&h, tcp, false).await.unwrap();
    tls.write_all(&startup(
        0,
        &[("user", "alice"), ("replication", "database")],
    ))
    .await
    .unwrap();
    let (tag, body) = read_message(&mut tls).await;
    assert_eq!(tag, b'E');
    assert_eq!(field(&body, b'C'), "42501");
    assert_eq!(
        field(&body, b'M'),
        "replication connections are not allowed through pgbastion"
    );
}

/// An authenticated raw session of `user`, read up to its first ReadyForQuery.
async fn raw_session(h: &Harness, user: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tcp = TcpStream::connect(h.proxy).await.unwrap();
    tcp.write_all(&SSL_REQUEST).await.unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    let mut tls = tls_connect(h, tcp, false).await.unwrap();
    tls.write_all(&startup(0, &[("user", user), ("database", "demo")]))
        .await
        .unwrap();
    assert_eq!(read_message(&mut tls).await.0, b'R');
    let mut token = h.token(user).into_bytes();
    token.push(0);
    tls.write_all(&message(b'p', &token)).await.unwrap();
    while read_message(&mut tls).await.0 != b'Z' {}
    tls
}

/// The tags of the messages up to ReadyForQuery, and the SQLSTATEs of the errors among them.
async fn replies(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) -> (String, Vec<String>) {
    let (mut tags, mut codes) = (String::new(), Vec::new());
    loop {
        let (tag, body) = read_message(tls).await;
        tags.push(tag as char);
        if tag == b'E' {
            codes.push(field(&body, b'C'));
        }
        if tag == b'Z' {
            return (tags, codes);
        }
    }
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    message(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
}

fn bind_execute(name: &str) -> Vec<u8> {
    let mut out = message(b'B', format!("\0{name}\0\0\0\0\0\0\0").as_bytes());
    out.extend(message(b'E', b"\0\0\0\0\0"));
    out
}

fn bind_execute_sync(name: &str) -> Vec<u8> {
    let mut out = bind_execute(name);
    out.extend(message(b'S', b""));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binds_run_only_statements_the_upstream_holds_as_approved() {
    let h = Harness::start().await;
    let mut tls = raw_session(&h, "alice").await;
    let sync = message(b'S', b"");
    // s1 prepared; a second Parse of s1 fails upstream (42P05) and must not replace it.
    let mut out = parse("s1", "SELECT 1");
    out.extend(&sync);
    out.extend(parse("s1", "SELECT 2"));
    out.extend(&sync);
    out.extend(bind_execute_sync("s1"));
    tls.write_all(&out).await.unwrap();
    assert_eq!(replies(&mut tls).await, ("1Z".into(), vec![]));
    assert_eq!(replies(&mut tls).await, ("EZ".into(), vec!["42P05".into()]));
    assert_eq!(replies(&mut tls).await, ("2DCZ".into(), vec![]));
    // Closed, s1 is gone for the proxy too; never prepared, s2 was never there.
    let mut out = message(b'C', b"Ss1\0");
    out.extend(&sync);
    out.extend(bind_execute_sync("s1"));
    out.extend(bind_execute_sync("s2"));
    tls.write_all(&out).await.unwrap();
    assert_eq!(replies(&mut tls).await, ("3Z".into(), vec![]));
    for _ in 0..2 {
        let (tags, codes) = replies(&mut tls).await;
        assert_eq!((tags.as_str(), codes), ("EZ", vec!["26000".to_string()]));
    }
    // A Close skipped after an error leaves the statement usable.
    let mut out = parse("s3", "SELECT 3");
    out.extend(&sync);
    out.extend(parse("", "SELECT 1/0"));
    out.extend(bind_execute(""));
    out.extend(message(b'C', b"Ss3\0"));
    out.extend(&sync);
    out.extend(bind_execute_sync("s3"));
    tls.write_all(&out).await.unwrap();
    assert_eq!(replies(&mut tls).await, ("1Z".into(), vec![]));
    assert_eq!(
        replies(&mut tls).await,
        ("1EZ".into(), vec!["22012".into()])
    );
    assert_eq!(replies(&mut tls).await, ("2DCZ".into(), vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_executing_each_other_are_decided_again_without_looping() {
    let h = Harness::start().await;
    let mut tls = raw_session(&h, "alice").await;
    let sync = message(b'S', b"");
    let mut out = parse("a", "EXECUTE b");
    out.extend(parse("b", "EXECUTE a"));
    out.extend(&sync);
    tls.write_all(&out).await.unwrap();
    assert_eq!(replies(&mut tls).await, ("11Z".into(), vec![]));
    // A reload makes both stale: re-deciding a reaches b, which reaches a again.
    let mut config = h.config.clone();
    let analysts = config.policies.get_mut("analysts").unwrap();
    analysts.deny_read.push("public.nothing".into());
    h.handle.reload(config).await.unwrap();
    tls.write_all(&bind_execute_sync("a")).await.unwrap();
    let (tags, codes) = replies(&mut tls).await;
    assert!(tags.ends_with('Z'), "{tags} {codes:?}");
    // The session is still usable.
    tls.write_all(&message(b'Q', b"SELECT 1\0")).await.unwrap();
    assert_eq!(replies(&mut tls).await.0, "TDCZ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_are_not_ascii_and_queries_inside_pipelines_are_refused() {
    let h = Harness::start().await;
    let mut tls = raw_session(&h, "alice").await;
    let mut out = parse("caf\u{e9}", "SELECT 1");
    out.extend(message(b'S', b""));
    tls.write_all(&out).await.unwrap();
    assert_eq!(replies(&mut tls).await, ("EZ".into(), vec!["26000".into()]));
    // A simple Query before the pipeline's Sync would be skipped upstream after an error and
    // never answered: the session ends instead.
    let mut out = parse("", "SELECT 1");
    out.extend(message(b'Q', b"SELECT 2\0"));
    tls.write_all(&out).await.unwrap();
    let (tag, body) = read_message(&mut tls).await;
    assert_eq!((tag, field(&body, b'C')), (b'E', "08P01".to_string()));
}

/// The rows' first values of the messages up to ReadyForQuery, and the SQLSTATEs of errors.
async fn first_values(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
) -> (Vec<String>, Vec<String>) {
    let (mut values, mut codes) = (Vec::new(), Vec::new());
    loop {
        let (tag, body) = read_message(tls).await;
        match tag {
            b'D' => {
                let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
                values.push(String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned());
            }
            b'E' => codes.push(field(&body, b'C')),
            b'Z' => return (values, codes),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_pooled_session_never_runs_a_statement_another_session_left() {
    let h = Harness::start_with(|c| {
        c.pool.mode = pgbastion_config::PoolMode::Transaction;
        c.pool.max_size = 1;
    })
    .await;
    let sync = message(b'S', b"");
    let mut bob = raw_session(&h, "bob").await;
    let mut other = raw_session(&h, "bob").await;
    bob.write_all(&[parse("", "SELECT 'bob'"), sync.clone()].concat())
        .await
        .unwrap();
    assert_eq!(replies(&mut bob).await, ("1Z".into(), vec![]));
    // The other session leaves its unnamed and a named statement on the one connection.
    other
        .write_all(
            &[
                parse("", "SELECT 'other unnamed'"),
                parse("s1", "SELECT 'other named'"),
                sync.clone(),
            ]
            .concat(),
        )
        .await
        .unwrap();
    assert_eq!(replies(&mut other).await, ("11Z".into(), vec![]));
    // Bob's Bind of the unnamed statement runs bob's, prepared again for him.
    bob.write_all(&bind_execute_sync("")).await.unwrap();
    assert_eq!(first_values(&mut bob).await, (vec!["bob".into()], vec![]));
    // After bob's Close, a Bind of the unnamed statement is 26000, never the other's.
    bob.write_all(&[message(b'C', b"S\0"), bind_execute_sync("")].concat())
        .await
        .unwrap();
    assert_eq!(first_values(&mut bob).await, (vec![], vec!["26000".into()]));
    // Nor can bob run the other's named statement by its name upstream.
    bob.write_all(&message(
        b'Q',
        b"SELECT name FROM pg_prepared_statements WHERE name LIKE 'pgbastion%'\0",
    ))
    .await
    .unwrap();
    let (names, codes) = first_values(&mut bob).await;
    assert!(codes.is_empty(), "{codes:?}");
    assert_eq!(
        names.len(),
        1,
        "the other session's statement is on the connection"
    );
    bob.write_all(&[bind_execute_sync(&names[0])].concat())
        .await
        .unwrap();
    assert_eq!(first_values(&mut bob).await, (vec![], vec!["26000".into()]));
    bob.write_all(&message(b'Q', format!("EXECUTE {}\0", names[0]).as_bytes()))
        .await
        .unwrap();
    assert_eq!(first_values(&mut bob).await, (vec![], vec!["26000".into()]));
    // The other session's own statements still work for it.
    other
        .write_all(&[bind_execute_sync("s1"), bind_execute_sync("")].concat())
        .await
        .unwrap();
    assert_eq!(
        first_values(&mut other).await,
        (vec!["other named".into()], vec![])
    );
    assert_eq!(
        first_values(&mut other).await,
        (vec!["other unnamed".into()], vec![])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_arriving_in_pieces_to_a_transaction_pooled_session_is_waited_for() {
    let h = Harness::start_with(|c| {
        c.pool.mode = pgbastion_config::PoolMode::Transaction;
        c.pool.max_size = 1;
    })
    .await;
    let mut bob = raw_session(&h, "bob").await;
    let query = message(b'Q', b"SELECT 'in pieces'\0");
    for piece in query.chunks(3) {
        bob.write_all(piece).await.unwrap();
        bob.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let answer = tokio::time::timeout(Duration::from_secs(10), first_values(&mut bob))
        .await
        .expect("an answer");
    assert_eq!(answer, (vec!["in pieces".into()], vec![]));
}
