//! What a repeated statement costs the relay: a decision-cache hit on its exact text (target
//! <= 2 us), against a hit on its decision key (a statement repeated with other numbers), and
//! the key through the tokenizer.

use criterion::{criterion_group, criterion_main, Criterion};
use pgbastion_policy::{decision_key, tokenizer_key, Decision, Effects};
use pgbastion_proxy::decision_cache::{DecisionCache, KeyKind, Scope};
use std::hint::black_box;

const SELECT_200: &str = "SELECT c.id, c.name, c.email, sum(o.amount) AS total \
    FROM public.customers c JOIN public.orders o ON o.customer_id = c.id \
    WHERE o.created_at > now() - interval '30 days' AND c.id = $1 \
    GROUP BY c.id, c.name, c.email ORDER BY total DESC LIMIT 10";

fn bench(c: &mut Criterion) {
    let cache = DecisionCache::new(10_000);
    let path = vec!["analyst".to_string(), "public".to_string()];
    let scope = Scope {
        kind: b'Q',
        policy: "analysts",
        search_path: &path,
        catalog: 1,
    };
    // A cache as full as a busy proxy's.
    for i in 0..5_000 {
        let sql = format!("SELECT * FROM t WHERE id = {i}");
        cache.insert(
            &scope,
            KeyKind::Text,
            &sql,
            std::sync::Arc::new((Decision::Allow, Effects::default())),
        );
    }
    let key = decision_key(SELECT_200).unwrap();
    let verdict = std::sync::Arc::new((Decision::Allow, Effects::default()));
    cache.insert(&scope, KeyKind::Text, SELECT_200, verdict.clone());
    cache.insert(&scope, KeyKind::Tokens, &key, verdict);
    c.bench_function("select_200_chars/cache_hit_exact_text", |b| {
        b.iter(|| {
            cache
                .get(&scope, KeyKind::Text, black_box(SELECT_200))
                .unwrap()
        })
    });
    c.bench_function("select_200_chars/cache_hit_decision_key", |b| {
        b.iter(|| {
            let key = decision_key(black_box(SELECT_200)).unwrap();
            cache.get(&scope, KeyKind::Tokens, &key).unwrap()
        })
    });
    // What the key costs through the tokenizer, which statements that are not plain take.
    c.bench_function("select_200_chars/tokenizer_key", |b| {
        b.iter(|| tokenizer_key(black_box(SELECT_200)).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
