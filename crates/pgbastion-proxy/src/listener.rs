//! The listener: binds, accepts, and gives each connection its task, id and tracing span;
//! reloads the configuration and drains sessions at shutdown.

use crate::admin;
use crate::busy_poll::BusyPoll;
use crate::cancel::CancelRegistry;
use crate::catalog::Catalogs;
use crate::decision_cache::DecisionCache;
use crate::handshake;
use crate::limits::Limits;
use crate::metrics::{Metrics, Snapshot};
use crate::pool::Pools;
use crate::settings::Settings;
use pgbastion_audit::{Auditor, Event, Outcome, Record, WriterHandle};
use pgbastion_auth::Verifier;
use pgbastion_config::Config;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

/// Distinct statement texts whose decisions are remembered.
const DECISION_CACHE_ENTRIES: usize = 10_000;

/// What every connection of one proxy shares.
#[derive(Debug)]
pub(crate) struct Shared {
    current: RwLock<Arc<Settings>>,
    /// Bumped by every successful reload; sessions compare it to pick up new policies.
    generation: AtomicU64,
    pub verifier: Verifier,
    pub cancels: Arc<CancelRegistry>,
    pub decisions: DecisionCache,
    pub catalogs: Catalogs,
    pub metrics: Metrics,
    pub auditor: Auditor,
    pub limits: Arc<Limits>,
    pub pools: Pools,
    /// Set at the end of the drain: sessions still running end with 57P01.
    pub terminate: watch::Receiver<bool>,
    /// `[runtime] busy_poll`, when on and the runtime is single-threaded.
    busy_poll: Option<Arc<BusyPoll>>,
}

impl Shared {
    /// The configuration in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.current.read().expect("settings lock").clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Queues an audit record; `event` is only built when the audit log is on.
    pub async fn audit(&self, conn: u64, session: Option<Arc<str>>, event: impl FnOnce() -> Event) {
        if !self.auditor.enabled() {
            return;
        }
        let event = event();
        self.auditor
            .record(Record {
                time: SystemTime::now(),
                conn,
                session,
                event,
            })
            .await;
    }

    /// A message was forwarded to the client or upstream: with busy polling on, the thread
    /// polls for its answer a while before it sleeps.
    pub fn forwarded(&self) {
        if let Some(busy) = &self.busy_poll {
            busy.forwarded();
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            audit_queue_depth: self.auditor.queue_depth(),
            audit_written: self.auditor.written(),
            audit_dropped: self.auditor.dropped(),
            audit_failures: self.auditor.failures(),
            keys: self.verifier.key_status(),
            config_generation: self.generation(),
            pools: self.pools.status(),
            busy_poll_rounds: self.busy_poll.as_deref().map(BusyPoll::rounds),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    Settings(String),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("audit log: {0}")]
    Audit(std::io::Error),
}

/// A bound, not yet running proxy.
#[derive(Debug)]
pub struct Proxy {
    listener: TcpListener,
    admin: Option<TcpListener>,
    shared: Arc<Shared>,
    terminate: watch::Sender<bool>,
    writer: WriterHandle,
}

/// Reloads the configuration of a running proxy.
#[derive(Debug, Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
}

impl Proxy {
    /// Resolves the config (files, secrets), opens the audit log, starts fetching signing
    /// keys and binds the listeners. Port 0 binds a free port; `local_addr` tells which.
    pub async fn bind(config: Config) -> Result<Proxy, ProxyError> {
        let settings = Settings::resolve(config).map_err(ProxyError::Settings)?;
        let verifier = Verifier::start(&settings.config.issuers).map_err(ProxyError::Settings)?;
        let address = settings.config.listen.address;
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| ProxyError::Bind { address, source })?;
        let admin = match settings.config.admin.enabled {
            true => {
                let address = settings.config.admin.address;
                Some(
                    TcpListener::bind(address)
                        .await
                        .map_err(|source| ProxyError::Bind { address, source })?,
                )
            }
            false => None,
        };
        let (auditor, writer) = Auditor::start(
            &settings.config.audit,
            Arc::new(|sql: &str| pgbastion_policy::redact(sql)),
        )
        .map_err(ProxyError::Audit)?;
        let (terminate, terminated) = watch::channel(false);
        let limits = Limits::new(settings.config.limits.auth_attempts_per_minute);
        let busy_poll = busy_poll(settings.config.runtime.busy_poll);
        Ok(Proxy {
            listener,
            admin,
            terminate,
            writer,
            shared: Arc::new(Shared {
                current: RwLock::new(Arc::new(settings)),
                generation: AtomicU64::new(1),
                verifier,
                cancels: Arc::new(CancelRegistry::default()),
                decisions: DecisionCache::new(DECISION_CACHE_ENTRIES),
                catalogs: Catalogs::default(),
                metrics: Metrics::default(),
                auditor,
                limits,
                pools: Pools::default(),
                terminate: terminated,
                busy_poll,
            }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Where /metrics, /healthz and /readyz are served, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn handle(&self) -> ProxyHandle {
        ProxyHandle {
            shared: self.shared.clone(),
        }
    }

    /// Waits until every issuer's signing keys are loaded; returns the issuers still without.
    pub async fn wait_for_keys(&self, timeout: Duration) -> Vec<String> {
        self.shared.verifier.wait_for_keys(timeout).await
    }

    /// Accepts connections until `shutdown` completes; then lets sessions finish for up to
    /// `shutdown.drain_timeout`, ends the rest with 57P01 and writes the audit log out.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let next_id = AtomicU64::new(1);
        let admin = self
            .admin
            .map(|listener| tokio::spawn(admin::serve(listener, self.shared.clone())));
        let maintenance = tokio::spawn(maintain_pools(self.shared.clone()));
        let polling = self
            .shared
            .busy_poll
            .clone()
            .map(|busy| tokio::spawn(async move { busy.run().await }));
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::error!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let conn = next_id.fetch_add(1, Ordering::Relaxed);
            let span = tracing::info_span!("conn", id = conn, peer = %peer);
            tokio::spawn(handshake::serve(self.shared.clone(), tcp, peer, conn).instrument(span));
        }
        drop(self.listener);
        let drain = self.shared.settings().config.shutdown.drain_timeout;
        tracing::info!(
            sessions = self.shared.limits.connections(),
            drain_seconds = drain.as_secs_f64(),
            "listener stopped; draining sessions"
        );
        let deadline = tokio::time::Instant::now() + drain;
        while self.shared.limits.connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.shared.limits.connections() > 0 {
            tracing::info!(
                sessions = self.shared.limits.connections(),
                "drain timeout: ending the remaining sessions"
            );
            let _ = self.terminate.send(true);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while self.shared.limits.connections() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if let Some(admin) = admin {
            admin.abort();
        }
        maintenance.abort();
        if let Some(polling) = polling {
            polling.abort();
        }
        self.shared.pools.close_idle().await;
        if !self.shared.auditor.flush(Duration::from_secs(10)).await {
            tracing::error!("the audit log could not be written out before stopping");
        }
        // The writer thread ends with the last auditor clone; it has nothing left to write.
        drop(self.writer);
        tracing::info!("pgbastion stopped");
    }
}

/// Idle timeouts, lifetimes and `min_size`, once a second.
async fn maintain_pools(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let settings = shared.settings();
        shared
            .pools
            .maintain(&settings, shared.generation(), &shared.metrics)
            .await;
    }
}

impl ProxyHandle {
    /// Loads `config` in place of the running one. New sessions use it at once; running
    /// sessions apply their policy's new rules from their next statement. On error the
    /// running configuration stays, and the error says what is wrong.
    pub async fn reload(&self, config: Config) -> Result<(), String> {
        let shared = &self.shared;
        let result = Self::check_reloadable(&shared.settings().config, &config)
            .and_then(|()| Settings::resolve(config));
        match result {
            Ok(settings) => {
                *shared.current.write().expect("settings lock") = Arc::new(settings);
                let generation = shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
                shared.metrics.reload("success");
                tracing::info!(generation, "configuration reloaded");
                shared
                    .audit(0, None, || Event::Reload {
                        outcome: Outcome::Success,
                        error: None,
                    })
                    .await;
                Ok(())
            }
            Err(error) => {
                self.reload_refused(error.clone()).await;
                Err(error)
            }
        }
    }

    /// A reload that cannot happen (the file does not parse, say): logged, counted, audited.
    pub async fn reload_refused(&self, error: String) {
        let shared = &self.shared;
        shared.metrics.reload("failure");
        tracing::error!(error = %error, "configuration reload refused; the running configuration stays");
        shared
            .audit(0, None, || Event::Reload {
                outcome: Outcome::Failure,
                error: Some(error),
            })
            .await;
    }

    /// Keys read only at start: a reload that changes them is refused rather than half applied.
    fn check_reloadable(running: &Config, new: &Config) -> Result<(), String> {
        let changed: Vec<&str> = [
            ("listen", same(&running.listen, &new.listen)),
            ("admin", same(&running.admin, &new.admin)),
            ("audit", same(&running.audit, &new.audit)),
            ("issuers", same(&running.issuers, &new.issuers)),
            ("limits", same(&running.limits, &new.limits)),
            ("runtime", same(&running.runtime, &new.runtime)),
        ]
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(key, _)| key)
        .collect();
        if changed.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "[{}] changed: these keys take effect only at a restart",
                changed.join("], [")
            ))
        }
    }
}

/// Busy polling, if configured and possible on this runtime (see `busy_poll`).
fn busy_poll(window: Duration) -> Option<Arc<BusyPoll>> {
    if window.is_zero() {
        return None;
    }
    let flavor = tokio::runtime::Handle::current().runtime_flavor();
    if flavor != tokio::runtime::RuntimeFlavor::CurrentThread {
        tracing::warn!(
            "runtime.busy_poll is ignored: pgbastion is not running on a single-threaded runtime"
        );
        return None;
    }
    Some(Arc::new(BusyPoll::new(window)))
}

/// Whether two configuration sections are equal (compared by their serialised form: the
/// model has no `PartialEq`).
fn same<T: serde::Serialize>(a: &T, b: &T) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}
