//! Property tests: whatever the text, deciding never panics, and text the parser rejects is
//! never allowed (fail closed).

use pgbastion_config::Policy;
use pgbastion_policy::{analyze, decide, CompiledPolicy, Decision, Principal, Request};
use proptest::prelude::*;

const CORPUS: &[&str] = &[
    "SELECT name FROM customers WHERE id = $1",
    "UPDATE orders SET amount = amount + 1 WHERE id = 3 RETURNING *",
    "WITH d AS (DELETE FROM orders WHERE id = 1 RETURNING *) SELECT * FROM d",
    "SELECT set_config('jit', 'off', false)",
    "SELECT E'\\'' || $$a$$ || U&'\\0041'",
    "COPY orders TO STDOUT",
    "BEGIN; SELECT 1; COMMIT",
    "SELECT c.relname FROM pg_catalog.pg_class c WHERE c.relname OPERATOR(pg_catalog.~) '^(orders)$'",
];

fn everything_allowed() -> CompiledPolicy {
    let policy: Policy = toml::from_str(
        r#"allow = ["read", "write", "ddl", "dcl", "admin", "procedural", "listen", "prepared", "session"]"#,
    )
    .unwrap();
    CompiledPolicy::new("all", &policy)
}

fn check(sql: &str) {
    let policy = everything_allowed();
    let search_path = vec!["public".to_string()];
    let principal = Principal {
        user: "u",
        role: "r",
        policy: &policy,
        search_path: &search_path,
        catalog: None,
    };
    let decision = decide(&principal, &Request::Query(sql));
    if analyze(sql).is_err() {
        assert!(
            matches!(decision, Decision::Deny(_)),
            "unparsable text was allowed: {sql:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics_and_unparsable_text_is_denied(sql in "\\PC{0,120}") {
        check(&sql);
    }

    #[test]
    fn sql_like_text_never_panics(sql in "[ a-zA-Z0-9_(),.;'\"$*=<>+\\-\\\\:\\[\\]]{0,80}") {
        check(&sql);
    }

    #[test]
    fn mutated_real_statements_never_panic(index in 0..CORPUS.len(), cut in 0usize..120, insert in "\\PC{0,6}") {
        let base = CORPUS[index];
        let mut cut = cut.min(base.len());
        while !base.is_char_boundary(cut) {
            cut -= 1;
        }
        let sql = format!("{}{}{}", &base[..cut], insert, &base[cut..]);
        check(&sql);
    }
}

#[test]
fn deeply_nested_statements_are_refused_without_exhausting_the_stack() {
    for depth in [10, 1_000, 100_000] {
        let sql = format!("SELECT {}1{}", "(".repeat(depth), ")".repeat(depth));
        check(&sql);
        let sql = format!(
            "SELECT * FROM orders WHERE id IN {}",
            "(SELECT 1 WHERE 1 IN ".repeat(depth)
        );
        check(&sql);
    }
    let deep = format!("SELECT {}1{}", "(".repeat(100_000), ")".repeat(100_000));
    assert!(
        analyze(&deep).is_err(),
        "the parser's depth limit refuses it"
    );
}
