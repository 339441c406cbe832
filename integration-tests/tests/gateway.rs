//! Gateway mode: one NOINHERIT login role upstream; each session runs as its mapped role with
//! the verified identity in `pgbastion.*` settings, which row-level security can use.

use integration_tests::{text_rows, Harness};
use pgbastion_config::{Gateway, SecretSource};
use tempfile::TempPath;

const GATEWAY: &str = "pgbastion_gateway";

/// A harness in gateway mode; the gateway role, an RLS-protected table and its rows exist.
/// The returned path is the gateway's password file, removed when dropped.
async fn gateway_harness() -> (Harness, TempPath) {
    let password = format!("gw-{:016x}", rand::random::<u64>());
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &password).unwrap();
    let file = file.into_temp_path();
    let path = file.to_path_buf();
    let harness = Harness::start_with(|config| {
        config.upstream.gateway = Some(Gateway {
            role: GATEWAY.into(),
        });
        config.upstream.roles.insert(
            GATEWAY.into(),
            SecretSource {
                password_file: Some(path),
                password_env: None,
            },
        );
    })
    .await;
    harness
        .cluster
        .psql(
            "demo",
            &format!(
                "CREATE ROLE {GATEWAY} LOGIN NOINHERIT PASSWORD '{password}';
                 GRANT analyst, engineer, demo_owner TO {GATEWAY};
                 CREATE TABLE notes (owner text NOT NULL, body text NOT NULL);
                 INSERT INTO notes VALUES ('alice', 'alice 1'), ('alice', 'alice 2'), ('bob', 'bob 1');
                 ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
                 CREATE POLICY own_notes ON notes USING (owner = current_setting('pgbastion.user'));
                 ALTER TABLE notes OWNER TO demo_owner;
                 GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO analyst, engineer;"
            ),
        )
        .expect("gateway setup");
    (harness, file)
}

/// Rows as `a|b|c` lines, NULL shown as NULL.
async fn rows(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    text_rows(client, sql)
        .await
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|v| v.unwrap_or_else(|| "NULL".into()))
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_run_as_the_mapped_role_with_the_identity_for_row_level_security() {
    let (harness, _password) = gateway_harness().await;
    let alice = harness
        .connect("alice", &harness.token("alice"))
        .await
        .unwrap();
    assert_eq!(
        rows(&alice, "SELECT current_user, session_user").await,
        ["analyst|pgbastion_gateway"]
    );
    // Row-level security filters by the token's user: alice sees only her notes.
    assert_eq!(
        rows(&alice, "SELECT body FROM notes ORDER BY body").await,
        ["alice 1", "alice 2"]
    );
    let identity = rows(
        &alice,
        "SELECT current_setting('pgbastion.subject') <> '', current_setting('pgbastion.groups'),
                current_setting('pgbastion.claims')::jsonb ->> 'preferred_username'",
    )
    .await;
    assert_eq!(identity, [r#"t|["analysts"]|alice"#]);

    let bob = harness.connect("bob", &harness.token("bob")).await.unwrap();
    assert_eq!(rows(&bob, "SELECT current_user").await, ["engineer"]);
    assert_eq!(rows(&bob, "SELECT body FROM notes").await, ["bob 1"]);
    // Writes run as the mapped role too, within what row-level security lets through.
    rows(
        &bob,
        "UPDATE notes SET body = 'bob 2' WHERE owner = 'alice'",
    )
    .await;
    assert_eq!(
        rows(&alice, "SELECT body FROM notes ORDER BY body").await,
        ["alice 1", "alice 2"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_the_client_sends_undoes_the_identity() {
    let (harness, _password) = gateway_harness().await;
    let bob = harness.connect("bob", &harness.token("bob")).await.unwrap();
    // The identity is the session's default: resetting everything returns to it.
    for reset in ["RESET ALL", "DISCARD ALL"] {
        bob.simple_query(reset)
            .await
            .unwrap_or_else(|err| panic!("{reset}: {err}"));
        assert_eq!(
            rows(
                &bob,
                "SELECT current_user, current_setting('pgbastion.user')"
            )
            .await,
            ["engineer|bob"],
            "after {reset}"
        );
    }
    // Changing or resetting it is denied before it reaches PostgreSQL.
    for change in [
        "RESET ROLE",
        "RESET pgbastion.user",
        "SET SESSION AUTHORIZATION DEFAULT",
        "SET ROLE demo_owner",
        "SET ROLE NONE",
        "SET LOCAL ROLE demo_owner",
        "SET SESSION AUTHORIZATION pgbastion_gateway",
        "SET pgbastion.user = 'alice'",
        "SELECT set_config('role', 'demo_owner', false)",
        "SELECT set_config('pgbastion.user', 'alice', false)",
        "SELECT set_config('ROLE', 'demo_owner', false)",
    ] {
        let err = bob.simple_query(change).await.expect_err(change);
        let db = err.as_db_error().expect("a server error");
        assert_eq!(db.code().code(), "42501", "{change}: {}", db.message());
        assert!(
            db.message().starts_with("policy 'engineers' denies"),
            "{change}: {}",
            db.message()
        );
    }
    assert_eq!(
        rows(
            &bob,
            "SELECT current_user, current_setting('pgbastion.user'), count(*) FROM notes"
        )
        .await,
        ["engineer|bob|1"]
    );
    // Startup options cannot set them either.
    let mut config = harness.client_config("bob");
    config.options("-c role=demo_owner");
    let Err(err) = config.connect(harness.tls()).await else {
        panic!("role in options was accepted");
    };
    assert_eq!(err.as_db_error().unwrap().code().code(), "42501");
    let mut config = harness.client_config("bob");
    config.options("-c pgbastion.user=alice");
    let Err(err) = config.connect(harness.tls()).await else {
        panic!("a reserved setting in options was accepted");
    };
    assert_eq!(err.as_db_error().unwrap().code().code(), "42501");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mapped_role_the_gateway_cannot_become_is_a_clear_refusal() {
    let (harness, _password) = gateway_harness().await;
    harness
        .cluster
        .psql("demo", &format!("REVOKE engineer FROM {GATEWAY}"))
        .unwrap();
    let (code, message) = harness
        .connect_error("bob", "demo", &harness.token("bob"))
        .await;
    assert_eq!(code, "08006");
    assert_eq!(
        message,
        "pgbastion's gateway role 'pgbastion_gateway' may not become role 'engineer' upstream"
    );
    // Others are unaffected.
    let alice = harness
        .connect("alice", &harness.token("alice"))
        .await
        .unwrap();
    assert_eq!(rows(&alice, "SELECT current_user").await, ["analyst"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pooled_gateway_connection_serves_only_the_identity_it_was_opened_for() {
    let (harness, _password) = gateway_harness().await;
    let pid = |client: tokio_postgres::Client| async move {
        rows(&client, "SELECT pg_backend_pid()").await[0].clone()
    };
    let token = harness.token("alice");
    let first = pid(harness.connect("alice", &token).await.unwrap()).await;
    // The pool takes the connection back once its reset has run.
    let idle =
        "pgbastion_pool_connections{role=\"pgbastion_gateway\",database=\"demo\",state=\"idle\"} 1";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !harness
        .admin_get("/metrics")
        .await
        .1
        .lines()
        .any(|l| l == idle)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the connection never went back idle"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Another identity of the same mapped role: its own connection, its own identity.
    let claims = harness.issuer.claims(
        "alicia",
        std::time::Duration::from_secs(3600),
        serde_json::json!({ "groups": ["analysts"] }),
    );
    let alicia = harness
        .connect("alicia", &harness.issuer.sign(&claims).unwrap())
        .await
        .unwrap();
    assert_ne!(rows(&alicia, "SELECT pg_backend_pid()").await[0], first);
    assert_eq!(
        rows(
            &alicia,
            "SELECT current_setting('pgbastion.user'), count(*) FROM notes GROUP BY 1"
        )
        .await,
        Vec::<String>::new()
    );
    assert_eq!(
        rows(&alicia, "SELECT current_setting('pgbastion.user')").await,
        ["alicia"]
    );
    // The same token again: the connection it had, with its identity intact.
    let again = harness.connect("alice", &token).await.unwrap();
    assert_eq!(rows(&again, "SELECT pg_backend_pid()").await[0], first);
    assert_eq!(
        rows(
            &again,
            "SELECT current_setting('pgbastion.user'), count(*) FROM notes GROUP BY 1"
        )
        .await,
        ["alice|2"]
    );
}
