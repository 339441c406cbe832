//! The client libraries applications use, unchanged, through transaction pooling: asyncpg,
//! psycopg 3 (prepared statements and pipeline mode), node-postgres named statements and
//! pgjdbc with server-side prepared statements and batches. Each runs 8 concurrent clients on
//! a pool of 2 connections, so statements are prepared on connections other clients use, and
//! checks every answer itself (integration-tests/drivers/). Python, Node.js and Java with
//! pgjdbc are installed by .ci/run; a missing one fails its test.

use integration_tests::{npm_ci, Harness};
use pgbastion_config::PoolMode;
use std::path::{Path, PathBuf};
use std::time::Duration;

const POOL: usize = 2;
/// A driver waiting for an answer the proxy lost would otherwise wait forever.
const DEADLINE: Duration = Duration::from_secs(120);

async fn harness() -> Harness {
    Harness::start_with(|c| {
        c.pool.mode = PoolMode::Transaction;
        c.pool.max_size = POOL;
        c.pool.acquire_timeout = Duration::from_secs(5);
    })
    .await
}

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("drivers")
}

/// Runs a driver script against the proxy as bob; checks it ended well and that no driver
/// saw more upstream connections than the pool holds.
async fn run(h: &Harness, program: &str, args: &[&str], needs: &str) {
    let mut command = tokio::process::Command::new(program);
    command
        .kill_on_drop(true)
        .args(args)
        .current_dir(drivers_dir())
        .env("PGB_PORT", h.proxy.port().to_string())
        .env("PGB_USER", "bob")
        .env("PGB_TOKEN", h.token("bob"))
        .env("PGB_CA", h.ca_file());
    let output = tokio::time::timeout(DEADLINE, command.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish in {DEADLINE:?}"))
        .unwrap_or_else(|err| panic!("{program} could not run ({err}): {needs}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success() && stdout.lines().last() == Some("ok"),
        "{program} {args:?} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let mut drivers = 0;
    for line in stdout.lines().filter(|l| l.starts_with("pids ")) {
        drivers += 1;
        let seen = line.split(' ').count() - 2;
        assert!(
            (1..=POOL).contains(&seen),
            "8 clients on a pool of {POOL} ran on {seen} upstream connections: {line}"
        );
    }
    assert!(drivers > 0, "no pids reported:\n{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_and_psycopg_work_through_transaction_pooling() {
    let h = harness().await;
    run(
        &h,
        // Debian's interpreter, where .ci/run installs the drivers.
        "/usr/bin/python3",
        &["python_drivers.py"],
        "install python3-asyncpg and python3-psycopg",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_named_statements_work_through_transaction_pooling() {
    npm_ci("drivers", "pg");
    let h = harness().await;
    run(&h, "node", &["node_pg.js"], "install nodejs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_prepared_statements_and_batches_work_through_transaction_pooling() {
    let jar = "/usr/share/java/postgresql.jar";
    assert!(
        Path::new(jar).exists(),
        "{jar} is missing: install libpostgresql-jdbc-java"
    );
    let h = harness().await;
    run(
        &h,
        "java",
        &["-cp", jar, "JdbcDriver.java"],
        "install default-jdk-headless",
    )
    .await;
}
