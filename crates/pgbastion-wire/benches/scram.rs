//! What an upstream SCRAM-SHA-256 login costs the proxy's thread (PostgreSQL's default 4,096
//! rounds): postgres-protocol's client, pgbastion's on a role's first login, and pgbastion's
//! once the salted password is remembered.

use criterion::{criterion_group, criterion_main, Criterion};
use pgbastion_wire::scram::Exchange;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use std::hint::black_box;

const PASSWORD: &str = "correct horse battery staple";

/// The server's first message for a client nonce, with a fresh salt when asked.
fn server_first(client_first: &[u8], salt: &str) -> String {
    let text = std::str::from_utf8(client_first).unwrap();
    let (_, nonce) = text.split_once(",r=").unwrap();
    format!("r={nonce}serverpart,s={salt},i=4096")
}

fn bench(c: &mut Criterion) {
    c.bench_function("scram/postgres-protocol", |b| {
        b.iter(|| {
            let mut exchange = ScramSha256::new(PASSWORD.as_bytes(), ChannelBinding::unsupported());
            let first = server_first(exchange.message(), "W22ZaJ0SNY7soEsUEjb6gQ==");
            exchange.update(black_box(first.as_bytes())).unwrap();
            black_box(exchange.message().len())
        })
    });
    let mut salt = 0u64;
    c.bench_function("scram/pgbastion, first login of a salt", |b| {
        b.iter(|| {
            salt += 1;
            let mut exchange = Exchange::new(PASSWORD);
            let first = server_first(
                exchange.client_first().as_bytes(),
                &format!("{:016x}AAAAAAAA==", salt)[..24],
            );
            black_box(exchange.client_final(first.as_bytes()).unwrap())
        })
    });
    c.bench_function("scram/pgbastion, salted password remembered", |b| {
        b.iter(|| {
            let mut exchange = Exchange::new(PASSWORD);
            let first = server_first(
                exchange.client_first().as_bytes(),
                "W22ZaJ0SNY7soEsUEjb6gQ==",
            );
            black_box(exchange.client_final(first.as_bytes()).unwrap())
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
