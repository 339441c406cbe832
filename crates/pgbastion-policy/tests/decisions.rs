//! Table-driven decisions: (policy, SQL) -> allowed, or denied with the rule that decided.

use pgbastion_config::Policy;
use pgbastion_policy::{
    decide, decide_with_effects, Catalog, CompiledPolicy, Decision, Effects, Fact, PreparedOp,
    Principal, Request,
};

fn policy(name: &str, toml_text: &str) -> CompiledPolicy {
    let policy: Policy = toml::from_str(toml_text).expect("policy TOML");
    CompiledPolicy::new(name, &policy)
}

fn analysts() -> CompiledPolicy {
    policy(
        "analysts",
        r#"
        allow = ["read", "prepared", "session"]
        read_only = true
        deny_read = ["public.secrets"]
        deny_columns = ["public.customers.ssn"]
        "#,
    )
}

fn engineers() -> CompiledPolicy {
    policy(
        "engineers",
        r#"
        allow = ["read", "write", "prepared", "session", "listen"]
        require_where = true
        deny_write = ["audit.*"]
        "#,
    )
}

fn admins() -> CompiledPolicy {
    policy(
        "dbadmins",
        r#"allow = ["read", "write", "ddl", "dcl", "admin", "procedural", "listen", "prepared", "session"]"#,
    )
}

/// The decision for a session of this policy with the search_path `"$user", public`.
fn decision(policy: &CompiledPolicy, request: &Request<'_>) -> Decision {
    let search_path = vec!["someone".to_string(), "public".to_string()];
    let principal = Principal {
        user: "someone",
        role: "someone",
        policy,
        search_path: &search_path,
        catalog: None,
    };
    decide(&principal, request)
}

/// None: allowed; Some(rule): denied by that rule.
fn verdict(policy: &CompiledPolicy, sql: &str) -> Option<String> {
    match decision(policy, &Request::Query(sql)) {
        Decision::Allow => None,
        Decision::Deny(denial) => Some(denial.rule),
    }
}

fn check(policy: &CompiledPolicy, cases: &[(&str, Option<&str>)]) {
    let mut failures = Vec::new();
    for (sql, expected) in cases {
        let got = verdict(policy, sql);
        if got.as_deref() != *expected {
            failures.push(format!("{sql:?}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "policy '{}':\n{}",
        policy.name,
        failures.join("\n")
    );
}

#[test]
fn analysts_may_read_but_not_secrets_nor_ssn() {
    check(
        &analysts(),
        &[
            ("SELECT 1", None),
            ("", None),
            ("-- just a comment", None),
            ("SELECT name, email FROM customers", None),
            (
                "SELECT o.amount FROM orders o JOIN customers c ON c.id = o.customer_id",
                None,
            ),
            ("SELECT count(*) FROM customers", None),
            ("SHOW search_path", None),
            ("EXPLAIN SELECT * FROM orders", None),
            ("BEGIN; SELECT 1; COMMIT", None),
            ("BEGIN READ ONLY", None),
            ("SET statement_timeout = '5s'", None),
            ("SELECT * FROM secrets", Some("deny_read")),
            ("SELECT * FROM public.secrets", Some("deny_read")),
            ("SELECT * FROM PUBLIC.SECRETS", Some("deny_read")),
            ("SELECT * FROM \"public\".\"secrets\"", Some("deny_read")),
            ("SELECT * FROM \"SECRETS\"", None),
            (
                "SELECT label FROM orders WHERE id IN (SELECT id FROM secrets)",
                Some("deny_read"),
            ),
            (
                "WITH s AS (SELECT * FROM secrets) SELECT 1",
                Some("deny_read"),
            ),
            ("SELECT ssn FROM customers", Some("deny_columns")),
            ("SELECT SSN FROM customers", Some("deny_columns")),
            ("SELECT c.ssn FROM customers c", Some("deny_columns")),
            ("SELECT * FROM customers", Some("deny_columns")),
            ("SELECT c.* FROM customers c", Some("deny_columns")),
            (
                "SELECT o.* FROM orders o JOIN customers c ON c.id = o.customer_id",
                None,
            ),
            ("SELECT c FROM customers c", Some("deny_columns")),
            (
                "SELECT row_to_json(c) FROM customers c",
                Some("deny_columns"),
            ),
            ("SELECT customers FROM customers", Some("deny_columns")),
            (
                "SELECT name FROM customers WHERE ssn LIKE '078%'",
                Some("deny_columns"),
            ),
            (
                "SELECT name FROM customers ORDER BY ssn",
                Some("deny_columns"),
            ),
            (
                "SELECT name FROM (SELECT * FROM customers) sub",
                Some("deny_columns"),
            ),
            (
                "INSERT INTO orders (customer_id, amount) VALUES (1, 2)",
                Some("read_only"),
            ),
            (
                "UPDATE orders SET amount = 0 WHERE id = 1",
                Some("read_only"),
            ),
            (
                "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
                Some("read_only"),
            ),
            (
                "SELECT * INTO copy_of_orders FROM orders",
                Some("read_only"),
            ),
            ("EXPLAIN ANALYZE DELETE FROM orders", Some("read_only")),
            ("CREATE TABLE t (id int)", Some("read_only")),
            ("BEGIN READ WRITE", Some("read_only")),
            (
                "SET default_transaction_read_only = off",
                Some("guarded_setting"),
            ),
            ("SET transaction_read_only = off", Some("guarded_setting")),
            ("LISTEN jobs", Some("class:listen")),
            ("COPY orders TO STDOUT", None),
            ("COPY orders FROM STDIN", Some("read_only")),
            ("COPY orders TO '/tmp/orders.csv'", Some("read_only")),
            ("COPY secrets TO STDOUT", Some("deny_read")),
            // Statements inside other statements are decided too.
            ("COPY (SELECT * FROM secrets) TO STDOUT", Some("deny_read")),
            ("PREPARE q AS SELECT * FROM secrets", Some("deny_read")),
            (
                "DECLARE c CURSOR FOR SELECT * FROM secrets",
                Some("deny_read"),
            ),
            ("EXPLAIN SELECT * FROM secrets", Some("deny_read")),
            ("SELECT * FROM ONLY secrets", Some("deny_read")),
            (
                "SELECT (SELECT label FROM secrets LIMIT 1)",
                Some("deny_read"),
            ),
            ("SELECT 1 UNION SELECT id FROM secrets", Some("deny_read")),
            (
                "SELECT * FROM orders o, LATERAL (SELECT * FROM secrets) s",
                Some("deny_read"),
            ),
            ("LOCK TABLE orders", Some("read_only")),
        ],
    );
}

#[test]
fn identity_changing_settings_are_always_denied() {
    for policy in [analysts(), engineers(), admins()] {
        check(
            &policy,
            &[
                ("SET role = 'postgres'", Some("guarded_setting")),
                ("SET ROLE postgres", Some("guarded_setting")),
                (
                    "SET SESSION AUTHORIZATION postgres",
                    Some("guarded_setting"),
                ),
                ("RESET ROLE", Some("guarded_setting")),
                ("RESET SESSION AUTHORIZATION", Some("guarded_setting")),
                (
                    "SELECT set_config('role', 'postgres', false)",
                    Some("guarded_setting"),
                ),
                (
                    "SELECT set_config('ROLE', 'postgres', false)",
                    Some("guarded_setting"),
                ),
                (
                    "SELECT pg_catalog.set_config('pgbastion.claims', '{}', false)",
                    Some("guarded_setting"),
                ),
                (
                    "SELECT set_config(current_user, 'x', false)",
                    Some("guarded_setting"),
                ),
                ("SET pgbastion.claims = '{}'", Some("guarded_setting")),
                // The parser and PostgreSQL must read string literals the same way.
                (
                    "SET standard_conforming_strings = off",
                    Some("guarded_setting"),
                ),
                (
                    "SELECT set_config('standard_conforming_strings', 'off', false)",
                    Some("guarded_setting"),
                ),
                ("SET backslash_quote = on", Some("guarded_setting")),
                // asyncpg does this on every connect: it must keep working.
                ("SELECT pg_catalog.set_config('jit', 'off', false)", None),
                ("SELECT set_config('statement_timeout', '5s', true)", None),
            ],
        );
    }
}

#[test]
fn dangerous_functions_are_denied_by_default() {
    check(
        &admins(),
        &[
            (
                "SELECT pg_read_file('/etc/passwd')",
                Some("dangerous_function"),
            ),
            (
                "SELECT pg_catalog.pg_read_file('/etc/passwd')",
                Some("dangerous_function"),
            ),
            (
                "SELECT PG_READ_FILE('/etc/passwd')",
                Some("dangerous_function"),
            ),
            ("SELECT * FROM pg_ls_dir('.')", Some("dangerous_function")),
            (
                "SELECT lo_import('/etc/passwd')",
                Some("dangerous_function"),
            ),
            (
                "SELECT query_to_xml('select * from secrets', true, false, '')",
                Some("dangerous_function"),
            ),
            (
                "SELECT table_to_xml('secrets', true, false, '')",
                Some("dangerous_function"),
            ),
            (
                "SELECT * FROM dblink('host=x', 'select 1') AS t(a int)",
                Some("dangerous_function"),
            ),
            (
                "SELECT pg_terminate_backend(1234)",
                Some("dangerous_function"),
            ),
            ("SELECT pg_reload_conf()", Some("dangerous_function")),
            (
                "SELECT 1 WHERE pg_read_file('x') IS NOT NULL",
                Some("dangerous_function"),
            ),
            // A user-defined function of the same name in another schema is not the built-in.
            ("SELECT app.pg_read_file('x')", None),
            ("SELECT now(), pg_sleep(0), generate_series(1, 3)", None),
            ("SELECT * FROM generate_series(1, 3)", None),
        ],
    );
}

#[test]
fn engineers_may_write_with_where_but_no_ddl() {
    check(
        &engineers(),
        &[
            (
                "INSERT INTO orders (customer_id, amount) VALUES (1, 2) RETURNING id",
                None,
            ),
            ("UPDATE orders SET amount = 1 WHERE id = 3", None),
            ("DELETE FROM orders WHERE id = 3", None),
            ("UPDATE orders SET amount = 1", Some("require_where")),
            ("DELETE FROM orders", Some("require_where")),
            ("DELETE FROM orders WHERE true", Some("require_where")),
            ("DELETE FROM orders WHERE 1 = 1", Some("require_where")),
            (
                "UPDATE orders SET amount = 0 WHERE 'a' = 'a'",
                Some("require_where"),
            ),
            (
                "WITH gone AS (DELETE FROM orders RETURNING id) SELECT count(*) FROM gone",
                Some("require_where"),
            ),
            ("DELETE FROM audit.log WHERE id = 1", Some("deny_write")),
            ("DELETE FROM AUDIT.LOG WHERE id = 1", Some("deny_write")),
            ("INSERT INTO audit.log VALUES (1)", Some("deny_write")),
            ("SELECT * FROM audit.log", None),
            ("SELECT * FROM \"audit\".\"log\"", None),
            ("TRUNCATE orders", None),
            ("CREATE TABLE t (id int)", Some("class:ddl")),
            ("DROP TABLE orders", Some("class:ddl")),
            ("ALTER TABLE orders ADD COLUMN x int", Some("class:ddl")),
            ("CREATE INDEX ON orders (amount)", Some("class:ddl")),
            ("GRANT SELECT ON orders TO public", Some("class:dcl")),
            ("CREATE ROLE mallory", Some("class:dcl")),
            ("VACUUM orders", Some("class:admin")),
            ("CALL do_things()", Some("class:procedural")),
            ("PREPARE q AS SELECT * FROM orders WHERE id = $1", None),
            ("PREPARE q AS DELETE FROM orders", Some("require_where")),
            ("EXECUTE q(1)", None),
            ("DEALLOCATE q", None),
            ("DECLARE c CURSOR FOR SELECT * FROM orders", None),
            ("LISTEN jobs", None),
            ("NOTIFY jobs, 'x'", None),
            ("COPY orders FROM STDIN", None),
            ("COPY orders FROM PROGRAM 'id'", Some("class:admin")),
            ("SELECT 1; DROP TABLE orders", Some("class:ddl")),
        ],
    );
}

#[test]
fn unparsable_statements_are_denied_and_never_forwarded() {
    for sql in [
        "DO $$ BEGIN PERFORM 1; END $$",
        "SELEC 1",
        "SELECT 'unterminated",
    ] {
        let policy = admins();
        let Decision::Deny(denial) = decision(&policy, &Request::Query(sql)) else {
            panic!("{sql} must be denied");
        };
        assert!(
            denial
                .message
                .starts_with("pgbastion could not analyse this statement, so it was not run: "),
            "{}",
            denial.message
        );
    }
}

#[test]
fn a_parse_message_holds_one_statement() {
    let policy = admins();
    let request = Request::Parse {
        statement: "",
        query: "SELECT 1; SELECT 2",
    };
    assert!(matches!(decision(&policy, &request), Decision::Deny(_)));
    let request = Request::Parse {
        statement: "s1",
        query: "SELECT $1::int",
    };
    assert_eq!(decision(&policy, &request), Decision::Allow);
}

#[test]
fn denials_name_the_policy_and_what_was_denied() {
    let policy = engineers();
    let Decision::Deny(denial) = decision(
        &policy,
        &Request::Query("DELETE FROM audit.log WHERE id = 1"),
    ) else {
        panic!("denied");
    };
    assert_eq!(
        denial.message,
        "policy 'engineers' denies writing to audit.log"
    );
    let Decision::Deny(denial) = decision(&policy, &Request::Query("DROP TABLE orders")) else {
        panic!("denied");
    };
    assert_eq!(denial.message, "policy 'engineers' denies ddl statements");
    assert_eq!(
        denial.hint.as_deref(),
        Some("this policy allows read, write, listen, prepared, session statements")
    );
}

#[test]
fn allow_lists_admit_only_what_they_name() {
    let policy = policy(
        "reporting",
        r#"
        allow = ["read", "write"]
        allow_read = ["reporting.*", "public.orders"]
        allow_write = ["reporting.scratch"]
        "#,
    );
    check(
        &policy,
        &[
            ("SELECT * FROM reporting.daily", None),
            ("SELECT * FROM orders", None),
            ("SELECT * FROM public.customers", Some("allow_read")),
            (
                "SELECT * FROM orders JOIN public.customers c ON true",
                Some("allow_read"),
            ),
            (
                "INSERT INTO reporting.scratch SELECT * FROM reporting.daily",
                None,
            ),
            (
                "INSERT INTO reporting.daily VALUES (1)",
                Some("allow_write"),
            ),
        ],
    );
}

/// A session: decides requests in order, tracking the search_path as the proxy does.
struct Session<'a> {
    policy: &'a CompiledPolicy,
    search_path: Vec<String>,
    catalog: Option<&'a Catalog>,
}

impl Session<'_> {
    fn run(&mut self, sql: &str) -> Option<String> {
        let principal = Principal {
            user: "someone",
            role: "someone",
            policy: self.policy,
            search_path: &self.search_path,
            catalog: self.catalog,
        };
        let (decision, effects) = decide_with_effects(&principal, &Request::Query(sql));
        for schema in effects.search_path {
            if !self.search_path.contains(&schema) {
                self.search_path.push(schema);
            }
        }
        match decision {
            Decision::Allow => None,
            Decision::Deny(denial) => Some(denial.rule),
        }
    }
}

#[test]
fn search_path_changes_are_tracked_and_every_schema_it_held_counts() {
    let policy = policy(
        "loose",
        r#"
        allow = ["read", "session"]
        deny_read = ["hr.salaries"]
        "#,
    );
    let mut session = Session {
        policy: &policy,
        search_path: vec!["someone".into(), "public".into()],
        catalog: None,
    };
    assert_eq!(session.run("SELECT * FROM salaries"), None);
    assert_eq!(session.run("SET search_path = hr"), None);
    assert_eq!(
        session.run("SELECT * FROM salaries"),
        Some("deny_read".into())
    );
    // Even after setting it back: the SET may have failed upstream, so hr still counts.
    assert_eq!(session.run("SET search_path TO public"), None);
    assert_eq!(
        session.run("SELECT * FROM salaries"),
        Some("deny_read".into())
    );
    assert_eq!(session.run("SELECT * FROM public.orders"), None);

    for (sql, schemas) in [
        ("SET search_path = \"Hr\", app", vec!["Hr", "app"]),
        (
            "SELECT set_config('search_path', 'a, \"B\"', false)",
            vec!["a", "B"],
        ),
        ("SET LOCAL search_path TO x", vec!["x"]),
    ] {
        let mut session = Session {
            policy: &policy,
            search_path: vec![],
            catalog: None,
        };
        assert_eq!(session.run(sql), None, "{sql}");
        let mut got = session.search_path.clone();
        got.sort();
        got.dedup();
        let mut want: Vec<String> = schemas.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(got, want, "{sql}");
    }
    // A value the proxy cannot read is refused.
    assert_eq!(
        verdict(
            &policy,
            "SELECT set_config('search_path', current_user, false)"
        ),
        Some("guarded_setting".into())
    );
    // Pinned: no change at all.
    let pinned = self::policy(
        "pinned",
        r#"
        allow = ["read", "session"]
        guard_search_path = true
        "#,
    );
    assert_eq!(
        verdict(&pinned, "SET search_path = hr"),
        Some("guarded_setting".into())
    );
}

fn demo_catalog() -> Catalog {
    let relation = |name: &str| Fact::Relation(name.into());
    let view = |view: &str, base: &str, column: Option<&str>| Fact::ViewReads {
        view: view.into(),
        base: base.into(),
        column: column.map(Into::into),
    };
    Catalog::new(
        7,
        [
            relation("public.customers"),
            relation("public.orders"),
            relation("public.secrets"),
            relation("public.customer_names"),
            relation("public.customer_ids"),
            relation("public.customer_rows"),
            relation("public.secret_summary"),
            relation("public.nested"),
            relation("public.events"),
            relation("public.events_2026"),
            relation("reporting.daily"),
            relation("pg_catalog.pg_class"),
            view("public.customer_names", "public.customers", Some("id")),
            view("public.customer_names", "public.customers", Some("name")),
            view("public.customer_ids", "public.customers", Some("ssn")),
            view("public.customer_rows", "public.customers", None),
            view("public.secret_summary", "public.secrets", None),
            view("public.nested", "public.secret_summary", None),
            Fact::Inherits {
                parent: "public.events".into(),
                child: "public.events_2026".into(),
            },
        ],
    )
}

#[test]
fn the_catalog_makes_views_and_inheritance_count_as_what_they_read() {
    let catalog = demo_catalog();
    let analysts = policy(
        "analysts",
        r#"
        allow = ["read", "prepared", "session"]
        read_only = true
        deny_read = ["public.secrets", "public.events"]
        deny_columns = ["public.customers.ssn"]
        "#,
    );
    let mut session = Session {
        policy: &analysts,
        search_path: vec!["analyst".into(), "public".into()],
        catalog: Some(&catalog),
    };
    for (sql, expected) in [
        ("SELECT * FROM customer_names", None),
        ("SELECT name FROM public.customer_names", None),
        // The view reads ssn (in its WHERE or its columns): reading it reads ssn.
        ("SELECT id FROM customer_ids", Some("deny_columns")),
        ("SELECT 1 FROM customer_rows", Some("deny_columns")),
        ("SELECT * FROM secret_summary", Some("deny_read")),
        ("SELECT * FROM nested", Some("deny_read")),
        // A partition's rows are its parent's.
        ("SELECT * FROM events_2026", Some("deny_read")),
        ("SELECT * FROM orders", None),
    ] {
        assert_eq!(session.run(sql).as_deref(), expected, "{sql}");
    }
    let principal = Principal {
        user: "alice",
        role: "analyst",
        policy: &analysts,
        search_path: &session.search_path,
        catalog: Some(&catalog),
    };
    match decide(&principal, &Request::Query("SELECT * FROM nested")) {
        Decision::Deny(denial) => assert_eq!(
            denial.message,
            "policy 'analysts' denies reading public.secrets (through view public.secret_summary)"
        ),
        other => panic!("{other:?}"),
    }
    let (_, effects) = decide_with_effects(&principal, &Request::Query("SELECT * FROM nowhere"));
    assert!(effects.unknown_relations);
    let (_, effects) = decide_with_effects(&principal, &Request::Query("SELECT * FROM orders"));
    assert!(!effects.unknown_relations);
}

#[test]
fn with_the_catalog_an_allow_list_applies_to_the_relation_a_name_resolves_to() {
    let catalog = demo_catalog();
    let reporting = policy(
        "reporting",
        r#"
        allow = ["read", "session"]
        allow_read = ["reporting.*", "pg_catalog.*"]
        "#,
    );
    let mut session = Session {
        policy: &reporting,
        search_path: vec!["reporting".into(), "public".into()],
        catalog: Some(&catalog),
    };
    for (sql, expected) in [
        ("SELECT * FROM daily", None),
        ("SELECT * FROM pg_class", None),
        // Resolves to public.orders, which exists: not on the list.
        ("SELECT * FROM orders", Some("allow_read")),
        // Unknown to the catalog: every schema it could be in must be allowed.
        ("SELECT * FROM scratch", Some("allow_read")),
    ] {
        assert_eq!(session.run(sql).as_deref(), expected, "{sql}");
    }
}

#[test]
fn forms_beyond_sqlparser_that_clients_send_are_recognised_and_decided() {
    check(
        &analysts(),
        &[
            ("TABLE public.orders", None),
            ("TABLE orders *", None),
            ("TABLE ONLY \"orders\"", None),
            ("TABLE secrets", Some("deny_read")),
            ("TABLE public.customers", Some("deny_columns")),
            ("TABLE orders; SELECT 1", None),
            ("SELECT 1; TABLE secrets", Some("deny_read")),
            (
                "BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE",
                None,
            ),
            ("START TRANSACTION READ ONLY NOT DEFERRABLE", None),
            (
                "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ DEFERRABLE",
                None,
            ),
            ("BEGIN READ WRITE, DEFERRABLE", Some("read_only")),
            ("MOVE ABSOLUTE 0 IN c1", None),
            ("MOVE FORWARD ALL FROM c1", None),
            ("UNLISTEN *", None),
            // Anything else that does not parse stays denied.
            ("MOVE (SELECT 1)", Some("unparsed")),
            ("TABLE orders WHERE true", Some("unparsed")),
            ("BEGIN DEFERRABLE; DROP TABLE orders", Some("read_only")),
            ("BEGIN DEFERRABLE; VACUUM FULL orders (", Some("unparsed")),
        ],
    );
}

#[test]
fn client_encodings_that_could_be_read_differently_are_refused() {
    check(
        &analysts(),
        &[
            ("SET client_encoding = 'UTF8'", None),
            ("SET client_encoding TO latin1", None),
            ("SET NAMES 'UTF8'", None),
            ("SET client_encoding = 'SJIS'", Some("guarded_setting")),
            ("SET client_encoding TO big5", Some("guarded_setting")),
            ("SET NAMES 'GBK'", Some("guarded_setting")),
            (
                "SELECT set_config('client_encoding', 'Shift_JIS', false)",
                Some("guarded_setting"),
            ),
            (
                "SELECT set_config('client_encoding', current_setting('x'), false)",
                Some("guarded_setting"),
            ),
        ],
    );
}

#[test]
fn unicode_escaped_identifiers_are_decoded_as_postgresql_does() {
    check(
        &analysts(),
        &[
            (r#"SELECT * FROM U&"secr\0065ts""#, Some("deny_read")),
            (
                r#"SELECT * FROM public.u&"\+000073ecrets""#,
                Some("deny_read"),
            ),
            (
                r#"SELECT * FROM U&"secr!0065ts" UESCAPE '!'"#,
                Some("deny_read"),
            ),
            (r#"SELECT U&"\0073sn" FROM customers"#, Some("deny_columns")),
            (r#"SELECT * FROM U&"orders""#, None),
            (r#"SELECT * FROM U&"Secrets""#, None),
            (r#"SELECT 'U&"secrets"' FROM orders"#, None),
            // Malformed escapes are refused, as PostgreSQL refuses them.
            (r#"SELECT * FROM U&"secr\00zzts""#, Some("unparsed")),
            (r#"SELECT * FROM U&"x\D800""#, Some("unparsed")),
        ],
    );
}

#[test]
fn what_the_analyser_corpus_found_is_denied() {
    check(
        &analysts(),
        &[
            // A CTE is not visible everywhere its name appears: deny rules apply to the name.
            (
                "WITH secrets AS (SELECT * FROM secrets) SELECT * FROM secrets",
                Some("deny_read"),
            ),
            (
                "WITH a AS (SELECT * FROM secrets), secrets AS (SELECT 1) SELECT * FROM a",
                Some("deny_read"),
            ),
            ("WITH x AS (SELECT 1) SELECT * FROM x", None),
            // TABLE nested in a query.
            ("SELECT * FROM (TABLE secrets) x", Some("deny_read")),
            ("SELECT 1 UNION TABLE secrets", Some("deny_read")),
            ("COPY (TABLE secrets) TO STDOUT", Some("deny_read")),
            // EXPLAIN with the British spelling runs the statement.
            (
                "EXPLAIN (ANALYSE) DELETE FROM orders WHERE id = 1",
                Some("read_only"),
            ),
            // Setting names are case-insensitive, quoted or not.
            ("SET \"Role\" = 'postgres'", Some("guarded_setting")),
            ("SET \"Pgbastion.Claims\" = '{}'", Some("guarded_setting")),
            (
                "SET \"Standard_Conforming_Strings\" TO off",
                Some("guarded_setting"),
            ),
        ],
    );
    check(
        &engineers(),
        &[
            (
                "UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'",
                Some("guarded_setting"),
            ),
            ("COPY orders FROM '/tmp/x'", Some("class:admin")),
            (
                "INSERT INTO audit.log VALUES (1) ON CONFLICT DO NOTHING",
                Some("deny_write"),
            ),
        ],
    );
}

#[test]
fn merge_without_a_real_condition_notify_by_function_and_created_tables_are_decided() {
    check(
        &engineers(),
        &[
            (
                "MERGE INTO orders o USING orders s ON true WHEN MATCHED THEN DELETE",
                Some("require_where"),
            ),
            (
                "MERGE INTO orders o USING items s ON s.id = o.id WHEN MATCHED THEN DELETE",
                None,
            ),
            ("SELECT pg_notify('ch', 'x')", None),
            // PostgreSQL 14 reads `$1abc$` as a parameter with an alias.
            (
                "SELECT $1abc$, (SELECT ssn FROM customers) s, $1abc$",
                Some("unparsed"),
            ),
            ("SELECT $tag$x$tag$, $1", None),
        ],
    );
    check(
        &analysts(),
        &[("SELECT pg_notify('ch', 'x')", Some("class:listen"))],
    );
    let writer = policy(
        "writer",
        r#"
        allow = ["read", "write", "ddl"]
        deny_write = ["audit.*"]
        "#,
    );
    check(
        &writer,
        &[
            ("CREATE TABLE audit.copy AS SELECT 1", Some("deny_write")),
            ("SELECT 1 INTO audit.copy", Some("deny_write")),
            ("CREATE TABLE public.copy AS SELECT 1", None),
        ],
    );
}

/// The effects of a Query that the admins' policy allows.
fn admin_effects(sql: &str) -> Effects {
    let admins = admins();
    let search_path = vec!["public".to_string()];
    let principal = Principal {
        user: "someone",
        role: "someone",
        policy: &admins,
        search_path: &search_path,
        catalog: None,
    };
    let (decision, effects) = decide_with_effects(&principal, &Request::Query(sql));
    assert_eq!(decision, Decision::Allow, "{sql}");
    effects
}

#[test]
fn statements_that_may_leave_session_state_are_told_apart() {
    let leaves = |sql: &str| admin_effects(sql).session_state;
    for sql in [
        "SELECT 1",
        "SELECT * FROM orders WHERE id = 1",
        "INSERT INTO orders (id) VALUES (1)",
        "BEGIN; UPDATE orders SET amount = 1 WHERE id = 2; COMMIT",
        "END",
        "SELECT pg_advisory_xact_lock(1)",
        "COPY orders TO STDOUT",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    ] {
        assert!(!leaves(sql), "{sql} leaves no session state");
    }
    for sql in [
        "SET work_mem = '8MB'",
        "SET LOCAL work_mem = '8MB'",
        "RESET ALL",
        "SELECT set_config('search_path', 'x', false)",
        "SELECT pg_advisory_lock(1)",
        "SELECT pg_catalog.pg_try_advisory_lock(1)",
        "CREATE TEMP TABLE t (x int)",
        "PREPARE p AS SELECT 1",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "LISTEN channel",
        "CALL refresh_everything()",
        "SELECT 1; SET search_path = public",
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    ] {
        assert!(leaves(sql), "{sql} may leave session state");
    }
}

#[test]
fn reading_sequence_values_before_setting_them_is_told_apart() {
    let reads_earlier = |sql: &str| {
        let effects = admin_effects(sql);
        assert!(!effects.session_state, "{sql} pins nothing");
        effects.reads_earlier_sequence_values
    };
    for sql in [
        "SELECT lastval()",
        "SELECT currval('ids')",
        "SELECT pg_catalog.lastval()",
        "BEGIN; SELECT lastval()",
        "SELECT 1; SELECT currval('ids')",
        "SELECT nextval('ids'), lastval()",
        "INSERT INTO orders (id) VALUES (currval('ids'))",
    ] {
        assert!(reads_earlier(sql), "{sql} reads values it did not set");
    }
    for sql in [
        "SELECT 1",
        "SELECT nextval('ids'); SELECT lastval()",
        "INSERT INTO orders (amount) VALUES (1); INSERT INTO orders (id) VALUES (currval('ids'))",
        "INSERT INTO orders (amount) VALUES (1); SELECT lastval()",
        "SELECT setval('ids', 10); SELECT currval('ids')",
    ] {
        assert!(!reads_earlier(sql), "{sql} sets before it reads");
    }
    for (sql, sets) in [
        ("SELECT 1", false),
        ("SELECT lastval()", false),
        ("SELECT nextval('ids')", true),
        ("SELECT pg_catalog.setval('ids', 3)", true),
        ("INSERT INTO orders (amount) VALUES (1)", true),
        ("UPDATE orders SET amount = 2 WHERE id = 1", true),
    ] {
        assert_eq!(admin_effects(sql).sets_sequence_values, sets, "{sql}");
    }
}

#[test]
fn explain_execute_names_the_statement_it_plans() {
    for sql in ["EXPLAIN EXECUTE q(1)", "EXPLAIN (ANALYZE) EXECUTE q(1)"] {
        assert_eq!(
            admin_effects(sql).prepared,
            [PreparedOp::Execute("q".into())],
            "{sql}"
        );
    }
}
