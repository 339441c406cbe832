//! The policy decision against the bare sqlparser parse of the same text (same run), for a
//! short statement and a ~200-character SELECT (target: decide <= 1.3x parse), and the cost of
//! the decision-cache key that spares a repeated statement both.

use criterion::{criterion_group, criterion_main, Criterion};
use pgbastion_config::Policy;
use pgbastion_policy::{decide, decision_key, Catalog, CompiledPolicy, Fact, Principal, Request};
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

/// A catalog of the size a small application database has: its tables and views, and
/// PostgreSQL's own relations.
fn catalog() -> Catalog {
    let mut facts: Vec<Fact> = ["customers", "orders", "secrets", "customer_names"]
        .iter()
        .map(|t| Fact::Relation(format!("public.{t}")))
        .collect();
    facts.extend((0..300).map(|i| Fact::Relation(format!("pg_catalog.pg_relation_{i}"))));
    facts.extend((0..50).map(|i| Fact::Relation(format!("app.table_{i}"))));
    for column in ["id", "name"] {
        facts.push(Fact::ViewReads {
            view: "public.customer_names".into(),
            base: "public.customers".into(),
            column: Some(column.into()),
        });
    }
    Catalog::new(1, facts)
}

fn bench(c: &mut Criterion) {
    let policy = analysts();
    let catalog = catalog();
    let search_path = vec!["analyst".to_string(), "public".to_string()];
    let principal = Principal {
        user: "alice",
        role: "analyst",
        policy: &policy,
        search_path: &search_path,
        catalog: Some(&catalog),
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

fn tokenize_only(c: &mut Criterion) {
    c.bench_function("select_200_chars/tokenize_only", |b| {
        b.iter(|| {
            sqlparser::tokenizer::Tokenizer::new(&PostgreSqlDialect {}, black_box(SELECT_200))
                .tokenize()
                .unwrap()
        })
    });
}
criterion_group!(tokens, tokenize_only);
criterion_main!(benches, tokens);
