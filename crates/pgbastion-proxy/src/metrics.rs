//! Counters and histograms, rendered as Prometheus text at the admin listener's /metrics.
//! Plain atomics: sessions update them on the hot path without locks, except for rare
//! labelled events (authentication failures, limits, reloads), counted under a mutex.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Statement classes as labels; the order indexes `Metrics::statements`.
const CLASSES: &[&str] = &[
    "read",
    "write",
    "ddl",
    "dcl",
    "admin",
    "procedural",
    "listen",
    "prepared",
    "session",
    "transaction",
    "none",
];

/// Upper bounds (seconds) of histogram buckets: 10 µs to 10 s.
const BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

#[derive(Debug)]
pub struct Metrics {
    pub connections_active: AtomicI64,
    pub connections_total: AtomicU64,
    auth_failures: Mutex<BTreeMap<&'static str, u64>>,
    /// [allowed, denied] x class.
    statements: [[AtomicU64; CLASSES.len()]; 2],
    /// Time the proxy spends deciding a Query, Parse or Bind before forwarding it.
    pub overhead: Histogram,
    /// From forwarding a statement to the upstream's answer.
    pub statement_latency: Histogram,
    pub upstream_connect: Histogram,
    pub upstream_connect_failures: AtomicU64,
    limited: Mutex<BTreeMap<&'static str, u64>>,
    reloads: Mutex<BTreeMap<&'static str, u64>>,
    pool_events: Mutex<BTreeMap<&'static str, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            connections_active: AtomicI64::new(0),
            connections_total: AtomicU64::new(0),
            auth_failures: Mutex::default(),
            statements: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            overhead: Histogram::default(),
            statement_latency: Histogram::default(),
            upstream_connect: Histogram::default(),
            upstream_connect_failures: AtomicU64::new(0),
            limited: Mutex::default(),
            reloads: Mutex::default(),
            pool_events: Mutex::default(),
        }
    }
}

/// Gauges owned elsewhere, read when rendering.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub audit_queue_depth: usize,
    pub audit_written: u64,
    pub audit_dropped: u64,
    pub audit_failures: u64,
    pub keys: Vec<pgbastion_auth::KeyStatus>,
    pub config_generation: u64,
    pub pools: Vec<crate::pool::PoolStatus>,
    /// Rounds of busy polling, when `[runtime] busy_poll` is on.
    pub busy_poll_rounds: Option<u64>,
}

impl Metrics {
    pub fn auth_failure(&self, reason: &'static str) {
        *self
            .auth_failures
            .lock()
            .expect("metrics lock")
            .entry(reason)
            .or_default() += 1;
    }

    /// A statement decided: counted once, under its first class.
    pub fn statement(&self, allowed: bool, classes: &[&str]) {
        let class = classes.first().copied().unwrap_or("none");
        let index = CLASSES
            .iter()
            .position(|c| *c == class)
            .unwrap_or(CLASSES.len() - 1);
        self.statements[usize::from(!allowed)][index].fetch_add(1, Ordering::Relaxed);
    }

    pub fn limited(&self, limit: &'static str) {
        *self
            .limited
            .lock()
            .expect("metrics lock")
            .entry(limit)
            .or_default() += 1;
    }

    pub fn reload(&self, outcome: &'static str) {
        *self
            .reloads
            .lock()
            .expect("metrics lock")
            .entry(outcome)
            .or_default() += 1;
    }

    /// A pool acquisition (reused, opened, exhausted) or a connection closed, by reason.
    pub fn pool_event(&self, event: &'static str) {
        *self
            .pool_events
            .lock()
            .expect("metrics lock")
            .entry(event)
            .or_default() += 1;
    }

    pub fn render(&self, snapshot: &Snapshot) -> String {
        let mut out = String::with_capacity(8192);
        let counter = |out: &mut String, name: &str, help: &str, kind: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        counter(
            &mut out,
            "pgbastion_client_connections",
            "Client connections open now.",
            "gauge",
        );
        let _ = writeln!(
            out,
            "pgbastion_client_connections {}",
            self.connections_active.load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            "pgbastion_client_connections_total",
            "Client connections accepted.",
            "counter",
        );
        let _ = writeln!(
            out,
            "pgbastion_client_connections_total {}",
            self.connections_total.load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            "pgbastion_auth_failures_total",
            "Refused authentications, by reason.",
            "counter",
        );
        for (reason, n) in self.auth_failures.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "pgbastion_auth_failures_total{{reason=\"{reason}\"}} {n}"
            );
        }
        counter(
            &mut out,
            "pgbastion_statements_total",
            "Statements decided, by decision and (first) class.",
            "counter",
        );
        for (d, decision) in ["allow", "deny"].iter().enumerate() {
            for (c, class) in CLASSES.iter().enumerate() {
                let n = self.statements[d][c].load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "pgbastion_statements_total{{decision=\"{decision}\",class=\"{class}\"}} {n}"
                    );
                }
            }
        }
        self.overhead.render(
            &mut out,
            "pgbastion_decision_seconds",
            "Time spent deciding a statement before forwarding it (proxy overhead).",
        );
        self.statement_latency.render(
            &mut out,
            "pgbastion_statement_seconds",
            "From forwarding a statement upstream to its completion.",
        );
        self.upstream_connect.render(
            &mut out,
            "pgbastion_upstream_connect_seconds",
            "Connecting and logging in upstream.",
        );
        counter(
            &mut out,
            "pgbastion_upstream_connect_failures_total",
            "Upstream connections that failed.",
            "counter",
        );
        let _ = writeln!(
            out,
            "pgbastion_upstream_connect_failures_total {}",
            self.upstream_connect_failures.load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            "pgbastion_pool_connections",
            "Upstream connections of each pool, by state.",
            "gauge",
        );
        for pool in &snapshot.pools {
            for (state, n) in [("idle", pool.idle), ("busy", pool.open - pool.idle)] {
                let _ = writeln!(
                    out,
                    "pgbastion_pool_connections{{role=\"{}\",database=\"{}\",state=\"{state}\"}} {n}",
                    label(&pool.role),
                    label(&pool.database)
                );
            }
        }
        counter(
            &mut out,
            "pgbastion_pool_events_total",
            "Pool acquisitions (reused, opened, exhausted) and connections closed, by reason.",
            "counter",
        );
        for (event, n) in self.pool_events.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "pgbastion_pool_events_total{{event=\"{event}\"}} {n}");
        }
        counter(
            &mut out,
            "pgbastion_jwks_fetches_total",
            "Discovery/JWKS fetches, by issuer.",
            "counter",
        );
        for key in &snapshot.keys {
            let _ = writeln!(
                out,
                "pgbastion_jwks_fetches_total{{issuer=\"{}\"}} {}",
                label(&key.issuer),
                key.fetches
            );
        }
        counter(
            &mut out,
            "pgbastion_jwks_fetch_failures_total",
            "Discovery/JWKS fetches that failed, by issuer.",
            "counter",
        );
        for key in &snapshot.keys {
            let _ = writeln!(
                out,
                "pgbastion_jwks_fetch_failures_total{{issuer=\"{}\"}} {}",
                label(&key.issuer),
                key.failures
            );
        }
        counter(
            &mut out,
            "pgbastion_rate_limited_total",
            "Connections, statements and authentications refused by a limit, by limit.",
            "counter",
        );
        for (limit, n) in self.limited.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "pgbastion_rate_limited_total{{limit=\"{limit}\"}} {n}");
        }
        counter(
            &mut out,
            "pgbastion_audit_queue_depth",
            "Audit records waiting for the sink.",
            "gauge",
        );
        let _ = writeln!(
            out,
            "pgbastion_audit_queue_depth {}",
            snapshot.audit_queue_depth
        );
        for (name, help, value) in [
            (
                "pgbastion_audit_records_total",
                "Audit records written.",
                snapshot.audit_written,
            ),
            (
                "pgbastion_audit_dropped_total",
                "Audit records dropped (on_full = \"drop\").",
                snapshot.audit_dropped,
            ),
            (
                "pgbastion_audit_sink_failures_total",
                "Failed writes to the audit sink (retried).",
                snapshot.audit_failures,
            ),
        ] {
            counter(&mut out, name, help, "counter");
            let _ = writeln!(out, "{name} {value}");
        }
        counter(
            &mut out,
            "pgbastion_config_reloads_total",
            "Configuration reloads, by outcome.",
            "counter",
        );
        for (outcome, n) in self.reloads.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "pgbastion_config_reloads_total{{outcome=\"{outcome}\"}} {n}"
            );
        }
        counter(
            &mut out,
            "pgbastion_config_generation",
            "Configurations loaded since start (1: the first).",
            "gauge",
        );
        let _ = writeln!(
            out,
            "pgbastion_config_generation {}",
            snapshot.config_generation
        );
        if let Some(rounds) = snapshot.busy_poll_rounds {
            counter(
                &mut out,
                "pgbastion_busy_poll_rounds_total",
                "Busy-poll rounds ([runtime] busy_poll); each polls the sockets once without sleeping.",
                "counter",
            );
            let _ = writeln!(out, "pgbastion_busy_poll_rounds_total {rounds}");
        }
        out
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
