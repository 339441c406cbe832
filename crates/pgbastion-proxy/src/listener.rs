//! The listener: binds, accepts, and gives each connection its task, id and tracing span.

use crate::cancel::CancelRegistry;
use crate::catalog::Catalogs;
use crate::decision_cache::DecisionCache;
use crate::handshake;
use crate::settings::Settings;
use pgbastion_auth::{Mapper, Verifier};
use pgbastion_config::Config;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::Instrument;

/// Distinct statement texts whose decisions are remembered.
const DECISION_CACHE_ENTRIES: usize = 10_000;

/// What every connection of one proxy shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub settings: Settings,
    pub verifier: Verifier,
    pub mapper: Mapper,
    pub cancels: Arc<CancelRegistry>,
    pub decisions: DecisionCache,
    pub catalogs: Catalogs,
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
}

/// A bound, not yet running proxy.
#[derive(Debug)]
pub struct Proxy {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Resolves the config (files, secrets), starts fetching signing keys and binds the
    /// listener. Port 0 binds a free port; `local_addr` tells which.
    pub async fn bind(config: Config) -> Result<Proxy, ProxyError> {
        let settings = Settings::resolve(config).map_err(ProxyError::Settings)?;
        let verifier = Verifier::start(&settings.config.issuers).map_err(ProxyError::Settings)?;
        let mapper = Mapper::new(settings.config.mappings.clone());
        let address = settings.config.listen.address;
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| ProxyError::Bind { address, source })?;
        Ok(Proxy {
            listener,
            shared: Arc::new(Shared {
                settings,
                verifier,
                mapper,
                cancels: Arc::new(CancelRegistry::default()),
                decisions: DecisionCache::new(DECISION_CACHE_ENTRIES),
                catalogs: Catalogs::default(),
            }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Waits until every issuer's signing keys are loaded; returns the issuers still without.
    pub async fn wait_for_keys(&self, timeout: Duration) -> Vec<String> {
        self.shared.verifier.wait_for_keys(timeout).await
    }

    /// Accepts connections until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let next_id = AtomicU64::new(1);
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
            tokio::spawn(handshake::serve(self.shared.clone(), tcp, conn).instrument(span));
        }
        tracing::info!("listener stopped");
    }
}
