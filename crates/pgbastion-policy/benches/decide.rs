//! The policy decision against the bare sqlparser parse of the same text (same run), for a
//! short statement and a ~200-character SELECT (target: decide <= 1.3x parse), and the cost of
//! the decision-cache key that spares a repeated statement both.

use criterion::{criterion_group, criterion_main, Criterion};
use pgbastion_config::Policy;
use pgbastion_policy::{decide, decision_key, CompiledPolicy, Principal, Request};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::hint::black_box;

const SHORT: &str = "SELECT 1";
const SELECT_200: &str = "SELECT c.id, c.name, c.email, sum(o.amount) AS total \
    FROM public.customers c JOIN public.orders o ON o.customer_id = c.id \
    WHERE o.created_at > now() - interval '30 days' AND c.id = $1 \
    GROUP BY c.id, c.name, c.email ORDER BY total DESC LIMIT 10";

fn analysts() -> CompiledPolicy {
    let policy: Policy = toml::from_str(
        r#"
        allow = ["read", "prepared", "session"]
        read_only = true
        deny_read = ["public.secrets"]
        deny_columns = ["public.customers.ssn"]
        "#,
    )
    .unwrap();
    CompiledPolicy::new("analysts", &policy)
}

fn bench(c: &mut Criterion) {
    let policy = analysts();
    let search_path = vec!["analyst".to_string(), "public".to_string()];
    let principal = Principal {
        user: "alice",
        role: "analyst",
        policy: &policy,
        search_path: &search_path,
        catalog: None,
    };
    for (name, sql) in [("select_1", SHORT), ("select_200_chars", SELECT_200)] {
        c.bench_function(&format!("{name}/sqlparser_parse"), |b| {
            b.iter(|| Parser::parse_sql(&PostgreSqlDialect {}, black_box(sql)).unwrap())
        });
        c.bench_function(&format!("{name}/policy_decide"), |b| {
            b.iter(|| decide(&principal, &Request::Query(black_box(sql))))
        });
        // What a decision-cache hit costs: computing the key (the lookup is a hash probe).
        c.bench_function(&format!("{name}/decision_key"), |b| {
            b.iter(|| decision_key(black_box(sql)))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
