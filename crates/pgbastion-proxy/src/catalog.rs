//! Upstream catalog snapshots, one per database, for policies with relation or column rules:
//! which relations exist, what views read, the inheritance and partition tree.
//!
//! A snapshot is loaded on a connection of the proxy's own (the session's login role; the
//! catalog is readable by every role), reused while younger than `upstream.catalog_refresh`,
//! and reloaded early (at most once a second) when a statement names a relation it does not
//! know. Loading fails closed: without a catalog, statements of such policies are refused.

use pgbastion_config::Secret;
use pgbastion_policy::{Catalog, Fact};
use pgbastion_wire::query::simple_query;
use pgbastion_wire::upstream::{self, Login, UpstreamTarget};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// The soonest a snapshot is reloaded because a statement named an unknown relation.
pub const UNKNOWN_RELATION_REFRESH: Duration = Duration::from_secs(1);

static VERSIONS: AtomicU64 = AtomicU64::new(1);

/// Who loads a database's catalog: the session's own login.
pub struct Loader<'a> {
    pub target: &'a UpstreamTarget,
    pub role: &'a str,
    pub password: &'a Secret,
    pub database: &'a str,
}

#[derive(Debug, Default)]
pub struct Catalogs {
    by_database: Mutex<HashMap<String, Arc<DatabaseCatalog>>>,
}

impl Catalogs {
    pub fn database(&self, database: &str) -> Arc<DatabaseCatalog> {
        let mut map = self.by_database.lock().expect("catalogs lock");
        map.entry(database.to_string()).or_default().clone()
    }
}

#[derive(Debug, Default)]
pub struct DatabaseCatalog {
    current: Mutex<Option<(Arc<Catalog>, Instant)>>,
    /// One load at a time; others wait for it and use its result.
    loading: tokio::sync::Mutex<()>,
}

impl DatabaseCatalog {
    /// A snapshot loaded less than `max_age` ago, loading one if needed.
    pub async fn fresh(
        &self,
        loader: &Loader<'_>,
        max_age: Duration,
    ) -> Result<Arc<Catalog>, String> {
        if let Some(catalog) = self.younger_than(max_age) {
            return Ok(catalog);
        }
        let _loading = self.loading.lock().await;
        if let Some(catalog) = self.younger_than(max_age) {
            return Ok(catalog);
        }
        let started = Instant::now();
        let catalog = Arc::new(load(loader).await?);
        tracing::debug!(
            database = loader.database,
            relations = catalog.len(),
            ms = started.elapsed().as_millis() as u64,
            "upstream catalog loaded"
        );
        *self.current.lock().expect("catalog lock") = Some((catalog.clone(), Instant::now()));
        Ok(catalog)
    }

    fn younger_than(&self, max_age: Duration) -> Option<Arc<Catalog>> {
        let current = self.current.lock().expect("catalog lock");
        current
            .as_ref()
            .filter(|(_, at)| at.elapsed() < max_age)
            .map(|(catalog, _)| catalog.clone())
    }
}

async fn load(loader: &Loader<'_>) -> Result<Catalog, String> {
    let login = Login {
        user: loader.role,
        password: loader.password.expose(),
        database: loader.database,
        parameters: &[],
    };
    let mut connection = upstream::connect(loader.target, login)
        .await
        .map_err(|err| err.to_string())?;
    let rows = tokio::time::timeout(
        loader.target.connect_timeout * 2,
        simple_query(&mut connection.stream, Catalog::QUERY),
    )
    .await
    .map_err(|_| "the catalog query timed out".to_string())?
    .map_err(|err| err.to_string())?;
    // Terminate; the connection is the proxy's own and not reused.
    let _ = connection.stream.write_all(b"X\0\0\0\x04").await;
    let _ = connection.stream.shutdown().await;
    let facts = rows.iter().filter_map(|row| Fact::from_row(row));
    Ok(Catalog::new(
        VERSIONS.fetch_add(1, Ordering::Relaxed),
        facts,
    ))
}
