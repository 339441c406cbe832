//! What one audit record costs the writer thread: its JSON line and the chain's SHA-256 of it,
//! for the commonest record (an allowed statement, as `pgbench -S` sends it).

use criterion::{criterion_group, criterion_main, Criterion};
use pgbastion_audit::{line_hash, Event, Record, StatementRecord, StatementStatus, ZERO_HASH};
use std::hint::black_box;
use std::sync::Arc;
use std::time::SystemTime;

fn statement() -> Record {
    Record {
        time: SystemTime::now(),
        conn: 1234,
        session: Some(
            "{\"user\":\"carol\",\"subject\":\"3f1c6a4e-8a55-4c2b-9d1e-2b7f0c9e5a10\",\
             \"issuer\":\"http://127.0.0.1:41234\",\"groups\":[\"dbadmins\"],\
             \"role\":\"demo_owner\",\"database\":\"demo\",\"application_name\":\"pgbench\"}"
                .into(),
        ),
        event: Event::Statement(StatementRecord {
            kind: "execute",
            text: "SELECT abalance FROM pgbench_accounts WHERE aid = $1;".into(),
            redact: false,
            statement: Some("P_0".into()),
            classes: Arc::from(["read"]),
            relations: Arc::from(["pgbench_accounts".to_string()]),
            decision: "allow",
            policy: "owner".into(),
            policy_version: "3a9f0c2b7d41".into(),
            rule: None,
            message: None,
            status: StatementStatus::Ok,
            duration_us: 87,
            rows: Some(1),
            sqlstate: None,
        }),
    }
}

fn bench(c: &mut Criterion) {
    let record = statement();
    let mut out = Vec::with_capacity(4096);
    record.encode(0, ZERO_HASH, &mut out);
    println!(
        "statement line: {} bytes: {}",
        out.len(),
        String::from_utf8_lossy(&out)
    );
    c.bench_function("statement record: line and hash", |b| {
        b.iter(|| {
            out.clear();
            black_box(&record).encode(41, ZERO_HASH, &mut out);
            black_box(line_hash(&out))
        })
    });
    c.bench_function("statement record: line only", |b| {
        b.iter(|| {
            out.clear();
            black_box(&record).encode(41, ZERO_HASH, &mut out);
            black_box(out.len())
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
