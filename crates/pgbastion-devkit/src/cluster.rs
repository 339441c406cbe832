//! A throwaway PostgreSQL cluster: its own temp directory, a free port on 127.0.0.1,
//! SCRAM authentication over TCP, and the demo roles and database. Stopped and removed on drop.
//!
//! `initdb` runs once per machine into a template (under the temp directory, reused across
//! runs); each cluster copies it, so starting one costs well under a second.

use crate::process;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Roles of the demo database: (role, what it is for).
pub const DEMO_ROLES: &[&str] = &["analyst", "engineer", "demo_owner"];

/// Bumped when the seed changes, so stale templates are not reused.
const TEMPLATE_VERSION: u32 = 1;

const SEED: &str = r#"
CREATE ROLE analyst LOGIN;
CREATE ROLE engineer LOGIN;
CREATE ROLE demo_owner LOGIN;
CREATE DATABASE demo OWNER demo_owner;
\connect demo
SET ROLE demo_owner;
CREATE TABLE customers (
    id serial PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL,
    ssn text NOT NULL
);
CREATE TABLE orders (
    id serial PRIMARY KEY,
    customer_id int NOT NULL REFERENCES customers,
    amount numeric(10, 2) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE secrets (
    id serial PRIMARY KEY,
    label text NOT NULL,
    value text NOT NULL
);
INSERT INTO customers (name, email, ssn) VALUES
    ('Ada Lovelace', 'ada@example.com', '078-05-1120'),
    ('Alan Turing', 'alan@example.com', '219-09-9999'),
    ('Grace Hopper', 'grace@example.com', '457-55-5462');
INSERT INTO orders (customer_id, amount) VALUES (1, 120.00), (1, 35.50), (2, 99.99), (3, 10.00);
INSERT INTO secrets (label, value) VALUES ('payments api key', 'sk_live_demo_only');
GRANT SELECT ON ALL TABLES IN SCHEMA public TO analyst;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO engineer;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO engineer;
"#;

/// A login role of the cluster and its password (random per cluster).
#[derive(Debug, Clone)]
pub struct ClusterRole {
    pub name: String,
    pub password: String,
}

#[derive(Debug)]
pub struct PgCluster {
    dir: tempfile::TempDir,
    child: Child,
    bin: PathBuf,
    pub port: u16,
    passwords: BTreeMap<String, String>,
}

impl PgCluster {
    /// Starts a cluster seeded with the demo database and roles, each with a fresh password.
    pub fn start() -> Result<PgCluster> {
        let bin = find_bin()?;
        let template = template(&bin)?;
        let owner = owner()?;
        let mut last_error = None;
        for _ in 0..5 {
            let dir = tempfile::Builder::new().prefix("pgbastion-pg-").tempdir()?;
            chown(dir.path(), owner)?;
            copy_dir(&template, &dir.path().join("data"))?;
            let port = free_port()?;
            match start_postgres(&bin, dir.path(), port, owner) {
                Ok(child) => {
                    let mut cluster = PgCluster {
                        dir,
                        child,
                        bin,
                        port,
                        passwords: BTreeMap::new(),
                    };
                    cluster.set_passwords()?;
                    return Ok(cluster);
                }
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("PostgreSQL did not start")))
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The password of a login role (`postgres` is the superuser).
    pub fn password(&self, role: &str) -> &str {
        self.passwords.get(role).map(String::as_str).unwrap_or("")
    }

    /// A libpq URL for `role` on `database`, over TCP with SCRAM.
    pub fn url(&self, role: &str, database: &str) -> String {
        format!(
            "postgresql://{role}:{}@{}:{}/{database}",
            self.password(role),
            self.host(),
            self.port
        )
    }

    /// Runs SQL as the superuser over the cluster's private Unix socket; returns psql's output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        run_psql(&self.bin, self.dir.path(), self.port, database, sql)
    }

    /// Puts `lines` ahead of the cluster's pg_hba.conf rules (first match wins) and reloads.
    pub fn prepend_hba(&self, lines: &str) -> Result<()> {
        let path = self.dir.path().join("data").join("pg_hba.conf");
        let rules = std::fs::read_to_string(&path).context("reading pg_hba.conf")?;
        std::fs::write(&path, format!("{lines}\n{rules}")).context("writing pg_hba.conf")?;
        let before = self.psql("postgres", "SELECT pg_conf_load_time()")?;
        self.psql("postgres", "SELECT pg_reload_conf()")?;
        // The postmaster reloads when it gets to the signal; a backend started after that
        // inherits the new load time.
        let deadline = Instant::now() + Duration::from_secs(10);
        let check = format!("SELECT pg_conf_load_time() > '{}'", before.trim());
        while self.psql("postgres", &check)?.trim() != "t" {
            if Instant::now() > deadline {
                bail!("PostgreSQL did not reload pg_hba.conf");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// The server's log so far, for test failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    fn set_passwords(&mut self) -> Result<()> {
        let mut sql = String::new();
        for role in std::iter::once(&"postgres").chain(DEMO_ROLES) {
            let password = random_password();
            sql.push_str(&format!("ALTER ROLE {role} PASSWORD '{password}';\n"));
            self.passwords.insert(role.to_string(), password);
        }
        self.psql("postgres", &sql)?;
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Fast shutdown: ends sessions, removes shared memory; then make sure.
        process::signal(self.child.id(), libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn random_password() -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

/// The directory holding initdb, postgres and psql.
pub fn find_bin() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PGBASTION_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    candidates.sort();
    if let Some((_, bin)) = candidates.pop() {
        return Ok(bin);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if dir.join("initdb").exists() && dir.join("postgres").exists() {
            return Ok(dir);
        }
    }
    bail!(
        "PostgreSQL server binaries (initdb, postgres) not found in /usr/lib/postgresql/*/bin or PATH: \
         install them (Debian/Ubuntu: apt-get install postgresql) or set PGBASTION_PG_BIN"
    )
}

/// (uid, gid) to run PostgreSQL as: the `postgres` user when we are root (initdb refuses root).
fn owner() -> Result<Option<(u32, u32)>> {
    if !process::is_root() {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"postgres") && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .map(Some)
        .ok_or_else(|| anyhow!("running as root, but there is no 'postgres' user to run PostgreSQL as (apt-get install postgresql creates it)"))
}

fn as_owner(command: &mut Command, owner: Option<(u32, u32)>) {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    if !status.success() {
        bail!("copying {} to {} failed", from.display(), to.display());
    }
    Ok(())
}

fn start_postgres(bin: &Path, dir: &Path, port: u16, owner: Option<(u32, u32)>) -> Result<Child> {
    let log = std::fs::File::create(dir.join("postgres.log"))?;
    chown(&dir.join("postgres.log"), owner)?;
    let mut command = Command::new(bin.join("postgres"));
    command
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-c", &format!("port={port}")])
        .args(["-c", "listen_addresses=127.0.0.1"])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", dir.display()))
        .args([
            "-c",
            "max_connections=700",
            "-c",
            "fsync=off",
            "-c",
            "full_page_writes=off",
        ])
        .args(["-c", "synchronous_commit=off", "-c", "shared_buffers=32MB"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    as_owner(&mut command, owner);
    process::die_with_parent(&mut command);
    let mut child = command.spawn().context("starting postgres")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
            bail!("postgres exited with {status}: {log}");
        }
        if run_psql(bin, dir, port, "postgres", "SELECT 1").is_ok() {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("postgres did not accept connections within 30 s");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn run_psql(bin: &Path, socket_dir: &Path, port: u16, database: &str, sql: &str) -> Result<String> {
    let psql = if bin.join("psql").exists() {
        bin.join("psql")
    } else {
        PathBuf::from("psql")
    };
    use std::io::Write;
    let mut child = Command::new(psql)
        .arg("-X")
        .args(["-v", "ON_ERROR_STOP=1", "-qAt"])
        .arg("-h")
        .arg(socket_dir)
        .args(["-p", &port.to_string(), "-U", "postgres", "-d", database])
        .args(["-f", "-"])
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(sql.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "psql failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The initialised, seeded data directory every cluster copies.
fn template(bin: &Path) -> Result<PathBuf> {
    static TEMPLATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| make_template(bin).map_err(|err| format!("{err:#}")))
        .clone()
        .map_err(|err| anyhow!(err))
}

fn make_template(bin: &Path) -> Result<PathBuf> {
    let owner = owner()?;
    let tag = format!(
        "pgbastion-template-v{TEMPLATE_VERSION}-{}-{}",
        bin.display().to_string().replace('/', "_"),
        owner.map(|(uid, _)| uid).unwrap_or(0)
    );
    let root = std::env::temp_dir();
    let template = root.join(&tag);
    if template.join("PG_VERSION").exists() {
        return Ok(template);
    }
    let work = tempfile::Builder::new()
        .prefix("pgbastion-initdb-")
        .tempdir()?;
    chown(work.path(), owner)?;
    let data = work.path().join("data");
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
        ])
        .args(["-E", "UTF8", "--locale=C", "--no-sync"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    as_owner(&mut initdb, owner);
    let output = initdb.output().context("running initdb")?;
    if !output.status.success() {
        bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let port = free_port()?;
    let mut child = start_postgres(bin, work.path(), port, owner)?;
    let seeded = run_psql(bin, work.path(), port, "postgres", SEED);
    process::signal(child.id(), libc::SIGINT);
    child.wait()?;
    seeded.context("seeding the template")?;
    // Another process may have raced us here; either template is as good.
    match std::fs::rename(&data, &template) {
        Ok(()) => Ok(template),
        Err(_) if template.join("PG_VERSION").exists() => Ok(template),
        Err(err) => Err(err).context("storing the template"),
    }
}
