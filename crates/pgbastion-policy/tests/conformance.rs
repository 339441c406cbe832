//! What real clients send on connect and for introspection (tests/corpus/clients.toml: psql's
//! \d family, pgjdbc, psycopg, asyncpg, SQLAlchemy, node-postgres, BI catalog calls, pgbench)
//! must all be allowed by a read policy: the demo's `analysts`, as config/demo.toml defines it.

use pgbastion_policy::{decide, CompiledPolicy, Decision, Principal, Request};
use serde::Deserialize;
use std::path::Path;

#[derive(Deserialize)]
struct Corpus {
    query: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    client: String,
    what: String,
    sql: String,
}

#[test]
fn a_read_policy_allows_everything_real_clients_send() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let demo = std::fs::read_to_string(root.join("../../config/demo.toml")).unwrap();
    let config = pgbastion_config::parse(&demo).expect("config/demo.toml");
    let policy = CompiledPolicy::new("analysts", &config.policies["analysts"]);
    let search_path = ["analyst".to_string(), "public".to_string()];
    let principal = Principal {
        user: "alice",
        role: "analyst",
        policy: &policy,
        search_path: &search_path,
        catalog: None,
    };
    let corpus: Corpus =
        toml::from_str(&std::fs::read_to_string(root.join("tests/corpus/clients.toml")).unwrap())
            .expect("clients.toml");
    let mut denied = Vec::new();
    for entry in &corpus.query {
        if let Decision::Deny(denial) = decide(&principal, &Request::Query(&entry.sql)) {
            denied.push(format!(
                "{} / {}: {} [{}]",
                entry.client, entry.what, denial.message, denial.rule
            ));
        }
    }
    let total = corpus.query.len();
    println!(
        "false denials: {} of {total} ({:.1}%)",
        denied.len(),
        100.0 * denied.len() as f64 / total as f64
    );
    assert!(total >= 150, "the corpus shrank to {total} entries");
    assert!(denied.is_empty(), "denied:\n{}", denied.join("\n"));
}
