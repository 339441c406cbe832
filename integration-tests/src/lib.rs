//! The end-to-end test harness: a real PostgreSQL (initdb into a temp dir, free port, SCRAM),
//! a real HTTP OIDC issuer on loopback signing real tokens, and the proxy in-process on a free
//! port. Each test builds its own; nothing is shared, so tests run in parallel.

use anyhow::{Context, Result};
use pgbastion_config::Config;
use pgbastion_devkit::demo::demo_config;
use pgbastion_devkit::{DevIssuer, PgCluster};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

pub use pgbastion_devkit::issuer::KeyKind;

pub use pgbastion_devkit::demo::DEMO_USERS as USERS;

#[derive(Debug)]
pub struct Harness {
    pub cluster: PgCluster,
    pub issuer: DevIssuer,
    pub proxy: SocketAddr,
    pub dir: tempfile::TempDir,
    /// The proxy's certificate (self-signed), for clients to trust.
    pub cert_pem: String,
    /// The admin listener (/metrics, /healthz, /readyz).
    pub admin: SocketAddr,
    /// Reloads the running proxy's configuration.
    pub handle: pgbastion_proxy::ProxyHandle,
    /// The configuration the proxy started with.
    pub config: Config,
    stop: Option<oneshot::Sender<()>>,
    running: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

type Bound = (
    pgbastion_proxy::Proxy,
    SocketAddr,
    SocketAddr,
    pgbastion_proxy::ProxyHandle,
);

async fn bind(config: Config) -> Result<Bound> {
    let proxy = pgbastion_proxy::Proxy::bind(config).await?;
    let missing = proxy.wait_for_keys(Duration::from_secs(10)).await;
    anyhow::ensure!(missing.is_empty(), "issuer keys not loaded: {missing:?}");
    let addr = proxy.local_addr();
    let admin = proxy.admin_addr().context("the admin listener")?;
    let handle = proxy.handle();
    Ok((proxy, addr, admin, handle))
}

/// `worker_threads = 1`: the proxy runs as `serve` runs it then, on a single-threaded runtime
/// of its own thread (named `pgbastion-proxy`). The returned task ends when the thread has
/// ended, and fails if the proxy panicked.
async fn run_on_own_thread(
    config: Config,
    stopped: oneshot::Receiver<()>,
) -> Result<(
    SocketAddr,
    SocketAddr,
    pgbastion_proxy::ProxyHandle,
    tokio::task::JoinHandle<()>,
)> {
    let (bound, bound_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("pgbastion-proxy".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                match bind(config).await {
                    Ok((proxy, addr, admin, handle)) => {
                        let _ = bound.send(Ok((addr, admin, handle)));
                        proxy
                            .run(async {
                                let _ = stopped.await;
                            })
                            .await;
                    }
                    Err(err) => {
                        let _ = bound.send(Err(err));
                    }
                }
            });
        })?;
    let (addr, admin, handle) = bound_rx.await.context("the proxy thread")??;
    let running = tokio::task::spawn_blocking(move || {
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    });
    Ok((addr, admin, handle, running))
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(|_| {}).await
    }

    /// Starts everything; `tweak` may change the generated config before the proxy starts.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Harness {
        Self::try_start(tweak).await.expect("harness starts")
    }

    async fn try_start(tweak: impl FnOnce(&mut Config)) -> Result<Harness> {
        let cluster = tokio::task::block_in_place(PgCluster::start).context("PostgreSQL")?;
        let issuer = DevIssuer::start("pgbastion").await?;
        let dir = tempfile::tempdir()?;
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut config = demo_config(dir.path(), listen, &cluster, &issuer)?;
        // Tests rotate keys and expect the new kid to be fetched at once.
        config.issuers[0].jwks_min_refetch = Duration::ZERO;
        let cert_pem = std::fs::read_to_string(dir.path().join("server.crt"))?;
        tweak(&mut config);
        let (stop, stopped) = oneshot::channel();
        let (addr, admin, handle, running) = if config.runtime.worker_threads == 1 {
            run_on_own_thread(config.clone(), stopped).await?
        } else {
            let (proxy, addr, admin, handle) = bind(config.clone()).await?;
            let running = tokio::spawn(proxy.run(async {
                let _ = stopped.await;
            }));
            (addr, admin, handle, running)
        };
        Ok(Harness {
            cluster,
            issuer,
            proxy: addr,
            dir,
            cert_pem,
            admin,
            handle,
            config,
            stop: Some(stop),
            running: Some(running),
        })
    }

    /// Stops accepting, drains sessions (`shutdown.drain_timeout`) and waits for the proxy to stop.
    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(running) = self.running.take() {
            running.await.expect("the proxy task");
        }
    }

    /// The audit log's path.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    /// The audit records written so far, as JSON, once `ready` holds for them (waits up to
    /// 10 s: records are written by a background thread).
    pub async fn audit_records(
        &self,
        ready: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(self.audit_log()).unwrap_or_default();
            let records: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("an audit record is JSON"))
                .collect();
            if ready(&records) || std::time::Instant::now() > deadline {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GET `path` from the admin listener: (status code, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.admin)
            .await
            .expect("admin");
        let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("request");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .expect("response");
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// The value of the sample `series` (a metric's name with its labels, as written) on
    /// the admin listener's /metrics, if it is there.
    pub async fn metric(&self, series: &str) -> Option<u64> {
        let (status, metrics) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "{metrics}");
        let prefix = format!("{series} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|n| n.parse().unwrap())
    }

    /// `pgbastion_pool_events_total` for `event` (0 until it first happens).
    pub async fn pool_events(&self, event: &str) -> u64 {
        self.metric(&format!("pgbastion_pool_events_total{{event=\"{event}\"}}"))
            .await
            .unwrap_or(0)
    }

    /// A valid one-hour token for a harness user (with its group).
    pub fn token(&self, user: &str) -> String {
        self.issuer
            .sign(&self.claims(user, Duration::from_secs(3600)))
            .expect("signing")
    }

    /// Claims for a harness user (its demo group, or "nobody"), to modify before signing.
    pub fn claims(&self, user: &str, lifetime: Duration) -> serde_json::Value {
        let group = USERS
            .iter()
            .find(|(u, _)| *u == user)
            .map(|(_, g)| *g)
            .unwrap_or("nobody");
        self.issuer
            .claims(user, lifetime, json!({ "groups": [group] }))
    }

    /// A client configuration for `user` on the demo database, with a fresh token as password.
    pub fn client_config(&self, user: &str) -> tokio_postgres::Config {
        let mut config: tokio_postgres::Config = self
            .connection_string(user, "demo")
            .parse()
            .expect("a valid connection string");
        config.password(self.token(user));
        config
    }

    pub fn tls(&self) -> MakeRustlsConnect {
        MakeRustlsConnect::new(client_tls(&self.cert_pem))
    }

    pub fn connection_string(&self, user: &str, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname={database} sslmode=require",
            self.proxy.port()
        )
    }

    /// Connects through the proxy over TLS with `token` as the password.
    pub async fn connect(&self, user: &str, token: &str) -> Result<Client, tokio_postgres::Error> {
        self.connect_db(user, "demo", token).await
    }

    pub async fn connect_db(
        &self,
        user: &str,
        database: &str,
        token: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        let mut config: tokio_postgres::Config = self.connection_string(user, database).parse()?;
        config.password(token);
        let (client, connection) = config.connect(self.tls()).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// The SQLSTATE and message a failed connection attempt got.
    pub async fn connect_error(&self, user: &str, database: &str, token: &str) -> (String, String) {
        match self.connect_db(user, database, token).await {
            Ok(_) => panic!("connection as {user} to {database} should have been refused"),
            Err(err) => {
                let db = err
                    .as_db_error()
                    .unwrap_or_else(|| panic!("expected a server error, got: {err}"));
                (db.code().code().to_string(), db.message().to_string())
            }
        }
    }

    /// Path of the proxy's certificate, for psql's sslrootcert.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    /// Runs the psql binary through the proxy; returns (success, stdout, stderr).
    pub fn psql(&self, user: &str, token: &str, sql: &str) -> (bool, String, String) {
        let bin = pgbastion_devkit::cluster::find_bin().expect("PostgreSQL binaries");
        let psql = if bin.join("psql").exists() {
            bin.join("psql")
        } else {
            PathBuf::from("psql")
        };
        let output = std::process::Command::new(psql)
            .arg("-X")
            .arg("-At")
            .arg(format!(
                "host=127.0.0.1 port={} user={user} dbname=demo sslmode=verify-full sslrootcert={}",
                self.proxy.port(),
                self.ca_file().display()
            ))
            .args(["-c", sql])
            .env("PGPASSWORD", token)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("psql runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

/// Every row of every statement of a simple query, as text (None for NULL); panics on error.
pub async fn text_rows(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err:?}"))
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// A rustls client configuration trusting only `ca_pem`.
pub fn client_tls(ca_pem: &str) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("PEM")).expect("CA");
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Raw protocol messages, for tests that speak the wire directly.
pub mod raw {
    use tokio::io::{AsyncRead, AsyncReadExt};

    /// A message: tag, Int32 length (including itself), body.
    pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Reads one message: (tag, body).
    pub async fn read_message<S: AsyncRead + Unpin>(stream: &mut S) -> (u8, Vec<u8>) {
        let mut head = [0u8; 5];
        stream
            .read_exact(&mut head)
            .await
            .expect("a message header");
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        stream.read_exact(&mut body).await.expect("a message body");
        (head[0], body)
    }
}

/// Installs the locked npm packages of a fixture directory under integration-tests/ unless
/// `module` is already there (.ci/run installs them beforehand).
pub fn npm_ci(fixture: &str, module: &str) -> PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(fixture);
    if !dir.join("node_modules").join(module).exists() {
        let status = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .expect("npm is needed for this test (Node.js 20 or newer): install nodejs and npm");
        assert!(status.success(), "npm ci in {} failed", dir.display());
    }
    dir
}
