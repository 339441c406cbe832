//! The statement policy end to end: denials reach the client as ERROR 42501 with the policy's
//! words, nothing denied reaches PostgreSQL, the session continues, transaction state is
//! PostgreSQL's own, and pipelined extended-protocol traffic stays in order.

use integration_tests::{text_rows, Harness};
use tokio_postgres::{Client, SimpleQueryMessage};

fn denial(err: &tokio_postgres::Error) -> (String, String) {
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("expected a server error, got {err}"));
    (db.code().code().to_string(), db.message().to_string())
}

async fn count_orders(h: &Harness) -> i64 {
    let carol = h.connect("carol", &h.token("carol")).await.unwrap();
    carol
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_query_gets_42501_with_the_policy_and_the_session_continues() {
    let h = Harness::start().await;
    let alice = h.connect("alice", &h.token("alice")).await.unwrap();
    let err = alice
        .simple_query("SELECT * FROM secrets")
        .await
        .unwrap_err();
    assert_eq!(
        denial(&err),
        (
            "42501".into(),
            "policy 'analysts' denies reading public.secrets".into()
        )
    );
    let err = alice
        .query("SELECT ssn FROM customers", &[])
        .await
        .unwrap_err();
    assert_eq!(
        denial(&err),
        (
            "42501".into(),
            "policy 'analysts' denies reading column public.customers.ssn".into()
        )
    );
    let row = alice
        .query_one("SELECT name FROM customers WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "Ada Lovelace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_denied_statement_denies_the_whole_message() {
    let h = Harness::start().await;
    let before = count_orders(&h).await;
    let bob = h.connect("bob", &h.token("bob")).await.unwrap();
    let err = bob
        .simple_query("INSERT INTO orders (customer_id, amount) VALUES (1, 5); DROP TABLE orders")
        .await
        .unwrap_err();
    assert_eq!(
        denial(&err),
        (
            "42501".into(),
            "policy 'engineers' denies ddl statements".into()
        )
    );
    assert_eq!(
        count_orders(&h).await,
        before,
        "the INSERT before the denied statement never ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_inside_a_transaction_fails_it_until_rollback() {
    let h = Harness::start().await;
    let before = count_orders(&h).await;
    let bob = h.connect("bob", &h.token("bob")).await.unwrap();
    bob.simple_query("BEGIN").await.unwrap();
    bob.simple_query("INSERT INTO orders (customer_id, amount) VALUES (1, 5)")
        .await
        .unwrap();
    let err = bob.simple_query("DELETE FROM orders").await.unwrap_err();
    assert_eq!(
        denial(&err),
        (
            "42501".into(),
            "policy 'engineers' denies DELETE without a WHERE clause".into()
        )
    );
    let err = bob.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(
        denial(&err).0,
        "25P02",
        "the transaction is failed, as after any error"
    );
    let err = bob.simple_query("COMMIT").await;
    // COMMIT of a failed transaction rolls back (PostgreSQL answers ROLLBACK).
    let tag = err.unwrap().into_iter().find_map(|m| match m {
        SimpleQueryMessage::CommandComplete(_) => Some(()),
        _ => None,
    });
    assert!(tag.is_some());
    assert_eq!(
        count_orders(&h).await,
        before,
        "nothing of the failed transaction was committed"
    );
    bob.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_extended_queries_keep_their_order_around_a_denial() {
    let h = Harness::start().await;
    let alice = h.connect("alice", &h.token("alice")).await.unwrap();
    // tokio-postgres pipelines concurrent queries on one connection.
    let (first, denied, last) = tokio::join!(
        alice.query_one("SELECT $1::int4 + 1", &[&1i32]),
        alice.query("SELECT label FROM secrets WHERE id = $1", &[&1i32]),
        alice.query_one("SELECT $1::text", &[&"after"]),
    );
    assert_eq!(first.unwrap().get::<_, i32>(0), 2);
    assert_eq!(
        denial(&denied.unwrap_err()).1,
        "policy 'analysts' denies reading public.secrets"
    );
    assert_eq!(last.unwrap().get::<_, &str>(0), "after");
    let statement = alice
        .prepare("SELECT name FROM customers WHERE id = $1")
        .await
        .unwrap();
    let row = alice.query_one(&statement, &[&2i32]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "Alan Turing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_policy_makes_the_upstream_session_read_only_too() {
    let h = Harness::start().await;
    let alice = h.connect("alice", &h.token("alice")).await.unwrap();
    let row = alice
        .query_one("SHOW default_transaction_read_only", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "on");
    let err = alice
        .simple_query("SET default_transaction_read_only = off")
        .await
        .unwrap_err();
    assert_eq!(
        denial(&err).1,
        "policy 'analysts' denies changing the setting default_transaction_read_only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identity_cannot_be_changed_from_sql() {
    let h = Harness::start().await;
    let carol = h.connect("carol", &h.token("carol")).await.unwrap();
    for sql in [
        "SET ROLE postgres",
        "SET SESSION AUTHORIZATION postgres",
        "SELECT set_config('role', 'postgres', false)",
        "RESET ROLE",
    ] {
        let err = carol.simple_query(sql).await.unwrap_err();
        assert_eq!(denial(&err).0, "42501", "{sql}");
    }
    let row = carol.query_one("SELECT current_user", &[]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "demo_owner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_that_cannot_be_analysed_are_not_run() {
    let h = Harness::start().await;
    let carol = h.connect("carol", &h.token("carol")).await.unwrap();
    let err = carol
        .simple_query("DO $$ BEGIN CREATE TABLE made_by_do (id int); END $$")
        .await
        .unwrap_err();
    let (code, message) = denial(&err);
    assert_eq!(code, "42501");
    assert!(
        message.starts_with("pgbastion could not analyse this statement, so it was not run: "),
        "{message}"
    );
    let exists = carol
        .query_one("SELECT to_regclass('made_by_do') IS NOT NULL", &[])
        .await
        .unwrap();
    assert!(!exists.get::<_, bool>(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_shows_the_denial() {
    let h = Harness::start().await;
    let token = h.token("alice");
    let (ok, _, err) =
        tokio::task::block_in_place(|| h.psql("alice", &token, "SELECT * FROM customers"));
    assert!(!ok);
    assert!(
        err.contains("ERROR:  policy 'analysts' denies reading column public.customers.ssn"),
        "{err}"
    );
    assert!(
        err.contains("HINT:  name only the columns you need"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_catalog_commands_pass_a_read_policy() {
    let h = Harness::start().await;
    let token = h.token("alice");
    for command in [
        "\\dt",
        "\\d customers",
        "\\d+ orders",
        "\\l",
        "\\dn",
        "\\df",
        "\\du",
        "\\dv",
        "\\di",
        "\\dx",
        "\\conninfo",
    ] {
        let (ok, out, err) = tokio::task::block_in_place(|| h.psql("alice", &token, command));
        assert!(ok, "{command}: {err}");
        assert!(!err.contains("ERROR"), "{command}: {err}");
        if command == "\\dt" {
            assert!(out.contains("customers"), "{out}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_and_inheritance_are_decided_by_what_they_read_in_the_upstream_catalog() {
    let h = Harness::start().await;
    let alice = h.connect("alice", &h.token("alice")).await.unwrap();
    // Alice's session starts before these exist: a name the catalog snapshot does not know
    // makes the proxy read a newer one.
    let carol = h.connect("carol", &h.token("carol")).await.unwrap();
    carol
        .batch_execute(
            "CREATE VIEW customer_names AS SELECT id, name FROM customers;
             CREATE VIEW customer_contacts AS SELECT id, name FROM customers WHERE ssn IS NOT NULL;
             CREATE VIEW secret_view AS SELECT * FROM secrets;
             CREATE VIEW nested_view AS SELECT count(*) AS n FROM secret_view;
             CREATE VIEW customer_docs AS SELECT c.id, to_jsonb(c) AS doc FROM customers c;
             CREATE TABLE secrets_archive () INHERITS (secrets);
             GRANT SELECT ON customer_names, customer_contacts, secret_view, nested_view,
                 secrets_archive, customer_docs TO analyst;",
        )
        .await
        .unwrap();
    let names = alice
        .query("SELECT name FROM customer_names ORDER BY id", &[])
        .await
        .unwrap();
    assert!(!names.is_empty());
    for (sql, message) in [
        (
            "SELECT * FROM secret_view",
            "policy 'analysts' denies reading public.secrets (through view public.secret_view)",
        ),
        (
            "SELECT n FROM nested_view",
            "policy 'analysts' denies reading public.secrets (through view public.secret_view)",
        ),
        (
            "SELECT * FROM secrets_archive",
            "policy 'analysts' denies reading public.secrets (through child table public.secrets_archive)",
        ),
        (
            // A whole-row reference records no column dependency upstream.
            "SELECT doc FROM customer_docs",
            "policy 'analysts' denies reading column public.customers.ssn (through view public.customer_docs)",
        ),
        (
            "SELECT id FROM customer_contacts",
            "policy 'analysts' denies reading column public.customers.ssn (through view public.customer_contacts)",
        ),
    ] {
        let err = alice.simple_query(sql).await.unwrap_err();
        assert_eq!(denial(&err), ("42501".into(), message.into()), "{sql}");
    }
    // A view replaced later is seen as it is now once the snapshot is refreshed.
    carol
        .batch_execute(
            "CREATE OR REPLACE VIEW customer_names AS SELECT id, name, ssn FROM customers",
        )
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    // A new relation's name makes the proxy look again.
    carol
        .batch_execute("CREATE TABLE fresh_table (id int); GRANT SELECT ON fresh_table TO analyst")
        .await
        .unwrap();
    alice
        .simple_query("SELECT * FROM fresh_table")
        .await
        .unwrap();
    let err = alice
        .simple_query("SELECT name FROM customer_names")
        .await
        .unwrap_err();
    assert_eq!(
        denial(&err).1,
        "policy 'analysts' denies reading column public.customers.ssn (through view public.customer_names)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_path_change_is_tracked_so_unqualified_names_stay_decided() {
    let h = Harness::start_with(|config| {
        let analysts = config.policies.get_mut("analysts").unwrap();
        analysts.deny_read.push("vault.*".into());
    })
    .await;
    let carol = h.connect("carol", &h.token("carol")).await.unwrap();
    carol
        .batch_execute(
            "CREATE SCHEMA vault; CREATE TABLE vault.orders (secret text);
             INSERT INTO vault.orders VALUES ('x');
             GRANT USAGE ON SCHEMA vault TO analyst; GRANT SELECT ON vault.orders TO analyst;",
        )
        .await
        .unwrap();
    let alice = h.connect("alice", &h.token("alice")).await.unwrap();
    let vault_denied = "policy 'analysts' denies reading vault.orders";
    for (sql, denied) in [
        ("SELECT * FROM orders", None),
        ("SET search_path TO vault, public", None),
        // `orders` now means vault.orders upstream.
        ("SELECT * FROM orders", Some(vault_denied)),
        // Setting it back does not forget vault: had the SET failed upstream (in a failed
        // transaction, say), PostgreSQL would still search it.
        ("SET search_path TO public", None),
        ("SELECT * FROM orders", Some(vault_denied)),
        ("SELECT * FROM public.orders", None),
    ] {
        match (alice.simple_query(sql).await, denied) {
            (Ok(_), None) => {}
            (Err(err), Some(message)) => assert_eq!(denial(&err).1, message, "{sql}"),
            (result, _) => panic!("{sql}: {:?}", result.map(|_| ())),
        }
    }
    // Other sessions are unaffected.
    let other = h.connect("alice", &h.token("alice")).await.unwrap();
    other.simple_query("SELECT * FROM orders").await.unwrap();
}

/// A harness whose catalog snapshots last half a second, with a view `customer_names` (id,
/// name) the analysts may read; with carol's and alice's sessions.
async fn with_customer_names_view() -> (Harness, Client, Client) {
    let h = Harness::start_with(|config| {
        config.upstream.catalog_refresh = std::time::Duration::from_millis(500);
    })
    .await;
    let carol = h.connect("carol", &h.token("carol")).await.unwrap();
    carol
        .batch_execute(
            "CREATE VIEW customer_names AS SELECT id, name FROM customers;
             GRANT SELECT ON customer_names TO analyst;",
        )
        .await
        .unwrap();
    let alice = h.connect("alice", &h.token("alice")).await.unwrap();
    (h, carol, alice)
}

/// Redefines `customer_names` to read `ssn` too, and waits until the proxy's snapshot has it.
async fn expose_ssn_through_the_view(carol: &Client) {
    carol
        .batch_execute(
            "CREATE OR REPLACE VIEW customer_names AS SELECT id, name, ssn FROM customers",
        )
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_statement_is_decided_again_when_a_view_it_reads_changes() {
    // `_proxy` keeps the proxy running to the end of the test.
    let (_proxy, carol, alice) = with_customer_names_view().await;
    let statement = alice
        .prepare("SELECT * FROM customer_names WHERE id = $1")
        .await
        .unwrap();
    assert_eq!(alice.query(&statement, &[&1i32]).await.unwrap().len(), 1);
    // PostgreSQL re-plans the prepared statement against the view's new definition.
    expose_ssn_through_the_view(&carol).await;
    let err = alice.query(&statement, &[&1i32]).await.unwrap_err();
    assert_eq!(
        denial(&err),
        (
            "42501".into(),
            "policy 'analysts' denies reading column public.customers.ssn (through view public.customer_names)".into()
        )
    );
    // The session goes on; the statement stays refused.
    alice.simple_query("SELECT 1").await.unwrap();
    assert!(alice.query(&statement, &[&1i32]).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_path_default_from_alter_role_counts_from_the_start() {
    let h = Harness::start_with(|config| {
        let analysts = config.policies.get_mut("analysts").unwrap();
        analysts.deny_read.push("vault.*".into());
    })
    .await;
    let carol = h.connect("carol", &h.token("carol")).await.unwrap();
    carol
        .batch_execute(
            "CREATE SCHEMA vault; CREATE TABLE vault.orders (secret text);
             GRANT USAGE ON SCHEMA vault TO analyst; GRANT SELECT ON vault.orders TO analyst;",
        )
        .await
        .unwrap();
    // Set by a superuser outside the proxy: every new analyst session starts with it.
    h.cluster
        .psql("demo", "ALTER ROLE analyst SET search_path = vault, public")
        .unwrap();
    let alice = h.connect("alice", &h.token("alice")).await.unwrap();
    let err = alice
        .simple_query("SELECT * FROM orders")
        .await
        .unwrap_err();
    assert_eq!(
        denial(&err).1,
        "policy 'analysts' denies reading vault.orders"
    );
    alice
        .simple_query("SELECT * FROM public.orders")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sql_prepared_statement_is_decided_again_when_a_view_it_reads_changes() {
    // `_proxy` keeps the proxy running to the end of the test.
    let (_proxy, carol, alice) = with_customer_names_view().await;
    alice
        .simple_query("PREPARE names AS SELECT * FROM customer_names")
        .await
        .unwrap();
    assert!(!text_rows(&alice, "EXECUTE names").await.is_empty());
    expose_ssn_through_the_view(&carol).await;
    for execute in ["EXECUTE names", "SELECT 1; EXECUTE names"] {
        let err = alice.simple_query(execute).await.unwrap_err();
        assert_eq!(
            denial(&err).1,
            "policy 'analysts' denies reading column public.customers.ssn (through view public.customer_names)",
            "{execute}"
        );
    }
    // Through the extended protocol too: prepared names are one namespace upstream.
    let err = alice.query("EXECUTE names", &[]).await.unwrap_err();
    assert_eq!(denial(&err).0, "42501");
    // Prepared again, it is decided as new.
    alice
        .simple_query("DEALLOCATE names; PREPARE names AS SELECT id, name FROM customers")
        .await
        .unwrap();
    assert!(!text_rows(&alice, "EXECUTE names").await.is_empty());
}
