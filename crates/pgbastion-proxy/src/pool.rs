//! Upstream connection pools, one per (login role, database), shared by every identity that
//! logs in as that role. A connection serves one client session at a time (session mode).
//!
//! A connection is reused only by a client whose startup parameters (application_name,
//! client_encoding, DateStyle, ..., the read-only default, and in gateway mode the identity)
//! equal those in effect on it: those it logged in with, or those it was adapted to (below).
//! Startup values are the session's defaults, which RESET and DISCARD ALL return to, so a
//! reused connection behaves like a fresh one, and in gateway mode one identity's connection
//! never serves another. When the pool is full and no idle connection matches, the oldest
//! idle one is closed to make room, except under transaction pooling: there an idle
//! connection whose parameters differ only in how results are labelled or formatted
//! (`ADAPTABLE`: application_name, TimeZone, ...) is switched with SET rather than replaced
//! by a new login. Its login values stay its defaults: a client's RESET of such a setting
//! returns to them (and pins the session, as any SET does), pg_settings' reset_val shows
//! them, and the reset at a session's end returns the connection to them.
//!
//! A session's connection goes back only after a clean end (the client sent Terminate with
//! nothing in flight and no transaction open) and a successful reset (`pool.reset_query`,
//! DISCARD ALL); anything else closes it. Under transaction pooling a connection also goes
//! back, as it is, after each transaction (`release`). Before reuse it must be quiet (open,
//! no unread bytes) and, after `health_check_after` idle, answer an empty query.

use crate::listener::Shared;
use crate::metrics::Metrics;
use crate::renaming::{ConnectionStatements, MAX_STATEMENTS_PER_CONNECTION};
use crate::settings::Settings;
use bytes::BytesMut;
use pgbastion_config::{Pool as PoolConfig, PoolMode};
use pgbastion_wire::frame::{read_message, Fields};
use pgbastion_wire::messages;
use pgbastion_wire::stream::UpstreamStream;
use pgbastion_wire::upstream::{self, Login, UpstreamError};
use pgbastion_wire::WireError;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio::time::Instant;

type Parameters = Vec<(String, String)>;
/// ParameterStatus values, by name.
type Statuses = Vec<(String, String)>;

/// Idle connections are checked for a closed socket or unexpected bytes after this long.
const QUIET_CHECK_AFTER: Duration = Duration::from_secs(1);

/// Largest message the pool reads itself (reset and health-check answers).
const MAX_MESSAGE: usize = 1024 * 1024;

/// Every pool of one proxy.
#[derive(Debug, Default)]
pub(crate) struct Pools {
    pools: Mutex<HashMap<(String, String), Arc<Pool>>>,
}

#[derive(Debug)]
struct Pool {
    role: String,
    database: String,
    state: Mutex<State>,
    /// Signalled when a connection goes back idle or closes: a waiting client looks again.
    changed: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Connections open: in use, idle, or being opened or reset.
    open: usize,
    /// Idle connections, the most recently returned last.
    idle: Vec<Idle>,
    /// The startup parameters of the latest client, to refill to `min_size` with.
    latest: Option<Arc<Parameters>>,
    /// The ParameterStatus values of the latest connection logged in with `latest`: a
    /// transaction-pooled client gets them at startup without taking a connection.
    statuses: Option<(Arc<Parameters>, Arc<Statuses>)>,
}

#[derive(Debug)]
struct Idle {
    stream: UpstreamStream,
    lease: Lease,
    since: Instant,
}

/// A pooled connection's place in its pool and what the pool knows about it; travels with
/// the connection's stream.
#[derive(Debug)]
pub(crate) struct Lease {
    slot: Slot,
    /// The upstream's BackendKeyData, for cancel requests.
    pub pid: i32,
    pub secret: i32,
    /// The startup parameters in effect, sorted: those it logged in with, or those it was
    /// adapted to (see `ADAPTABLE`).
    parameters: Arc<Parameters>,
    /// The startup parameters it logged in with, which a reset returns it to.
    startup: Arc<Parameters>,
    /// ParameterStatus values as the server last reported them (before the client's own
    /// changes: a reset returns to them).
    /// Shared with the pool's `statuses` while equal to them, so that the comparison after
    /// each pooled transaction is a pointer comparison.
    status: Arc<Statuses>,
    created: Instant,
    /// The configuration generation it was opened under: a reload may change the upstream
    /// address or credentials, so older connections are not reused.
    generation: u64,
    /// The statements transaction pooling prepared on it (see `renaming`).
    pub statements: ConnectionStatements,
}

/// Counts one open connection; closing (dropping) it wakes a waiting client.
#[derive(Debug)]
struct Slot(Arc<Pool>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.state.lock().expect("pool lock").open -= 1;
        self.0.changed.notify_one();
    }
}

/// A connection for a client session.
#[derive(Debug)]
pub(crate) struct Checkout {
    pub stream: UpstreamStream,
    pub lease: Lease,
    /// From a fresh login, what the client receives after AuthenticationOk: the server's
    /// ParameterStatus messages and notices, as sent. Empty for a reused connection: see
    /// `startup_messages`.
    pub startup: BytesMut,
    pub reused: bool,
}

impl Checkout {
    /// An idle connection for a client. A new session's startup messages are built only
    /// for one (`startup_messages`): under transaction pooling most checkouts serve a
    /// transaction.
    fn reused(idle: Idle) -> Checkout {
        Checkout {
            stream: idle.stream,
            lease: idle.lease,
            startup: BytesMut::new(),
            reused: true,
        }
    }

    /// What a new client session receives after AuthenticationOk.
    pub fn startup_messages(&self) -> BytesMut {
        match self.reused {
            false => self.startup.clone(),
            true => {
                let mut startup = BytesMut::new();
                for (name, value) in self.lease.status.iter() {
                    messages::parameter_status(name, value, &mut startup);
                }
                startup
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum AcquireError {
    #[error("all {max} upstream connections of the pool are in use (waited {waited:?})")]
    Exhausted { max: usize, waited: Duration },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

/// A session's pool and sorted startup parameters.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pool: Arc<Pool>,
    parameters: Arc<Parameters>,
}

/// What a pool looks like now, for metrics.
#[derive(Debug, Default, Clone)]
pub struct PoolStatus {
    pub role: String,
    pub database: String,
    pub open: usize,
    pub idle: usize,
}

enum Step {
    Reuse(Idle),
    /// An idle connection to adapt to the client's parameters with `sql` (see `ADAPTABLE`).
    Adapt(Idle, String),
    Open(Slot),
    Wait,
}

/// Startup parameters that only format or label what a session sends: under transaction
/// pooling a connection may be switched between values of these with SET. Anything that
/// decides what a statement may do or how the proxy reads the client's bytes
/// (client_encoding, search_path, timeouts, the read-only default, gateway identity) never is.
/// DateStyle is not among them: SET DateStyle keeps the connection's day/month order when
/// the value names only a style, so the result would depend on the connection's past.
const ADAPTABLE: &[&str] = &[
    "application_name",
    "timezone",
    "intervalstyle",
    "extra_float_digits",
    "bytea_output",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
];

/// The SET statements that turn a connection with parameters `from` into one with `to`, if
/// they differ only in values of `ADAPTABLE` parameters.
fn adaptation(from: &Parameters, to: &Parameters) -> Option<String> {
    if from.len() != to.len() {
        return None;
    }
    let mut sql = String::new();
    for ((name, have), (wanted_name, want)) in from.iter().zip(to.iter()) {
        if name != wanted_name {
            return None;
        }
        if have == want {
            continue;
        }
        // Non-ASCII text would be read in the connection's client_encoding, which may not
        // be the UTF-8 it was sent in.
        if !ADAPTABLE.iter().any(|a| name.eq_ignore_ascii_case(a)) || !want.is_ascii() {
            return None;
        }
        // An escape string literal reads the same whatever standard_conforming_strings is.
        let value = want.replace('\\', "\\\\").replace('\'', "''");
        sql.push_str(&format!("SET {name} = E'{value}';"));
    }
    Some(sql)
}

impl Pools {
    fn all(&self) -> Vec<Arc<Pool>> {
        let pools = self.pools.lock().expect("pools lock");
        pools.values().cloned().collect()
    }

    fn pool(&self, role: &str, database: &str) -> Arc<Pool> {
        let mut pools = self.pools.lock().expect("pools lock");
        pools
            .entry((role.to_string(), database.to_string()))
            .or_insert_with(|| {
                Arc::new(Pool {
                    role: role.to_string(),
                    database: database.to_string(),
                    state: Mutex::default(),
                    changed: Notify::new(),
                })
            })
            .clone()
    }

    /// Where a session's connections come from: its pool and its startup parameters, looked
    /// up once (a transaction-pooled session acquires for every transaction).
    pub fn target(&self, login: Login<'_>) -> Target {
        let mut parameters = login.parameters.to_vec();
        parameters.sort();
        let pool = self.pool(login.user, login.database);
        // Most sessions of a pool send the same parameters: sharing the pool's Arc makes
        // matching an idle connection a pointer comparison.
        let parameters = match &pool.state.lock().expect("pool lock").latest {
            Some(latest) if **latest == parameters => latest.clone(),
            _ => Arc::new(parameters),
        };
        Target { pool, parameters }
    }

    /// A connection logged in as `login`: an idle one with the same startup parameters, a
    /// new one while the pool has room, else the first to come free within
    /// `pool.acquire_timeout`.
    pub async fn acquire(
        &self,
        target: &Target,
        settings: &Settings,
        login: Login<'_>,
        generation: u64,
        metrics: &Metrics,
    ) -> Result<Checkout, AcquireError> {
        let config = &settings.config.pool;
        let (mode, max_size) = config.for_role(login.user);
        let transaction = mode == PoolMode::Transaction;
        let (pool, parameters) = (&target.pool, &target.parameters);
        let started = Instant::now();
        let deadline = started + config.acquire_timeout;
        let next_step = || {
            let (step, evicted) = pool.next_step(parameters, max_size, generation, transaction);
            if let Some(evicted) = evicted {
                metrics.pool_event("closed_to_make_room");
                tokio::spawn(terminate(evicted));
            }
            step
        };
        loop {
            let changed = pool.changed.notified();
            tokio::pin!(changed);
            let mut step = next_step();
            if matches!(step, Step::Wait) {
                // Registered before looking again, so a connection returned in between is
                // not missed; only a client that must wait pays for the registration.
                changed.as_mut().enable();
                step = next_step();
            }
            let slot = match step {
                Step::Reuse(mut idle) => {
                    match usable(&mut idle, transaction, config, generation, settings).await {
                        Ok(()) => {
                            metrics.pool_event("reused");
                            return Ok(Checkout::reused(idle));
                        }
                        Err(reason) => {
                            metrics.pool_event(reason);
                            close(idle.stream, idle.lease);
                            continue;
                        }
                    }
                }
                Step::Adapt(mut idle, sql) => {
                    let adapted =
                        match usable(&mut idle, transaction, config, generation, settings).await {
                            Ok(()) => adapt(&mut idle, parameters, &sql, settings).await,
                            Err(reason) => Adapted::Failed(reason),
                        };
                    match adapted {
                        Adapted::Done => {
                            metrics.pool_event("adapted");
                            return Ok(Checkout::reused(idle));
                        }
                        Adapted::Refused(error) => {
                            // The client gets the server's answer, as a login with its values
                            // would have; the connection stays for others.
                            metrics.pool_event("adapt_refused");
                            pool.clone().put_idle(idle.stream, idle.lease);
                            return Err(AcquireError::Upstream(error));
                        }
                        Adapted::Failed(reason) => {
                            // Its slot goes to a new login, as when a connection makes room.
                            metrics.pool_event(reason);
                            tokio::spawn(terminate(idle.stream));
                            idle.lease.slot
                        }
                    }
                }
                Step::Open(slot) => slot,
                Step::Wait => {
                    if tokio::time::timeout_at(deadline, changed).await.is_err() {
                        metrics.pool_event("exhausted");
                        return Err(AcquireError::Exhausted {
                            max: max_size,
                            waited: started.elapsed(),
                        });
                    }
                    continue;
                }
            };
            let (stream, lease, startup) = open(
                slot,
                settings,
                login,
                parameters.clone(),
                generation,
                metrics,
            )
            .await?;
            metrics.pool_event("opened");
            return Ok(Checkout {
                stream,
                lease,
                startup,
                reused: false,
            });
        }
    }

    /// Takes a connection back after its session. `clean`: the session ended with nothing in
    /// flight and no transaction open; the connection is then reset and kept idle (in a task
    /// of its own, so the client is not kept waiting). Otherwise it is closed.
    pub fn give_back(stream: UpstreamStream, lease: Lease, clean: bool, shared: Arc<Shared>) {
        if !clean {
            shared.metrics.pool_event("closed_unclean_end");
            close(stream, lease);
            return;
        }
        tokio::spawn(async move {
            let (mut stream, mut lease) = (stream, lease);
            let settings = shared.settings();
            let config = &settings.config.pool;
            if let Err(reason) = keepable(&lease, config, shared.generation()) {
                shared.metrics.pool_event(reason);
                close(stream, lease);
                return;
            }
            let reset = exchange(&mut stream, &mut lease, &config.reset_query);
            match tokio::time::timeout(settings.upstream.connect_timeout, reset).await {
                Ok(Ok(())) => {
                    // DISCARD ALL deallocated every prepared statement and returned every
                    // setting, adapted ones too, to the startup values.
                    lease.statements.clear();
                    lease.parameters = lease.startup.clone();
                    lease.slot.0.clone().put_idle(stream, lease)
                }
                failed => {
                    if let Ok(Err(err)) = &failed {
                        tracing::warn!(error = %err, "pool reset query failed; connection closed");
                    }
                    shared.metrics.pool_event("closed_reset_failed");
                    close(stream, lease);
                }
            }
        });
    }

    /// The ParameterStatus messages a client with these startup parameters would get from a
    /// connection of the pool, if one has served them before (transaction pooling: the
    /// client then starts without taking a connection).
    pub fn known_statuses(
        &self,
        role: &str,
        database: &str,
        parameters: &[(String, String)],
    ) -> Option<BytesMut> {
        let pool = self
            .pools
            .lock()
            .expect("pools lock")
            .get(&(role.to_string(), database.to_string()))?
            .clone();
        let state = pool.state.lock().expect("pool lock");
        let (known, statuses) = state.statuses.as_ref()?;
        let mut sorted = parameters.to_vec();
        sorted.sort();
        if **known != sorted {
            return None;
        }
        let mut startup = BytesMut::new();
        for (name, value) in statuses.iter() {
            messages::parameter_status(name, value, &mut startup);
        }
        Some(startup)
    }

    /// Takes a connection back at the end of a transaction (transaction pooling), as it is:
    /// the session left no state on it beyond the shared prepared statements.
    pub fn release(stream: UpstreamStream, lease: Lease, shared: &Shared) {
        let settings = shared.settings();
        let kept = keepable(&lease, &settings.config.pool, shared.generation()).and_then(|()| {
            match lease.statements.len() > MAX_STATEMENTS_PER_CONNECTION {
                true => Err("closed_too_many_statements"),
                false => Ok(()),
            }
        });
        match kept {
            Ok(()) => lease.slot.0.clone().put_idle(stream, lease),
            Err(reason) => {
                shared.metrics.pool_event(reason);
                close(stream, lease);
            }
        }
    }

    /// Closes idle connections past `idle_timeout` (down to `min_size`) or `max_lifetime`,
    /// or from before a reload, and opens connections up to `min_size`. Called every second.
    pub async fn maintain(&self, settings: &Settings, generation: u64, metrics: &Metrics) {
        let config = &settings.config.pool;
        for pool in self.all() {
            let (expired, refill) = pool.expire(config, generation);
            for (idle, reason) in expired {
                metrics.pool_event(reason);
                close(idle.stream, idle.lease);
            }
            let Some((slots, parameters)) = refill else {
                continue;
            };
            let Some(password) = settings.role_passwords.get(&pool.role) else {
                continue;
            };
            for slot in slots {
                let login = Login {
                    user: &pool.role,
                    password: password.expose(),
                    database: &pool.database,
                    parameters: &parameters,
                };
                match open(
                    slot,
                    settings,
                    login,
                    parameters.clone(),
                    generation,
                    metrics,
                )
                .await
                {
                    Ok((stream, lease, _)) => {
                        metrics.pool_event("opened_min_size");
                        pool.clone().put_idle(stream, lease);
                    }
                    Err(err) => {
                        tracing::warn!(role = %pool.role, database = %pool.database, error = %err, "opening a pool connection failed");
                        break;
                    }
                }
            }
        }
    }

    /// Closes every idle connection (at shutdown).
    pub async fn close_idle(&self) {
        let mut closing = tokio::task::JoinSet::new();
        for pool in self.all() {
            let idle = std::mem::take(&mut pool.state.lock().expect("pool lock").idle);
            for idle in idle {
                closing.spawn(async move {
                    terminate(idle.stream).await;
                    drop(idle.lease);
                });
            }
        }
        closing.join_all().await;
    }

    pub fn status(&self) -> Vec<PoolStatus> {
        let pools = self.pools.lock().expect("pools lock");
        let mut status: Vec<PoolStatus> = pools
            .values()
            .map(|pool| {
                let state = pool.state.lock().expect("pool lock");
                PoolStatus {
                    role: pool.role.clone(),
                    database: pool.database.clone(),
                    open: state.open,
                    idle: state.idle.len(),
                }
            })
            .collect();
        status.sort_by(|a, b| (&a.role, &a.database).cmp(&(&b.role, &b.database)));
        status
    }
}

impl Pool {
    /// Under the lock: what to do next, and an idle connection to close to make room.
    fn next_step(
        self: &Arc<Self>,
        parameters: &Arc<Parameters>,
        max: usize,
        generation: u64,
        transaction: bool,
    ) -> (Step, Option<UpstreamStream>) {
        let mut state = self.state.lock().expect("pool lock");
        state.latest = Some(parameters.clone());
        if let Some(i) = state.idle.iter().rposition(|idle| {
            idle.lease.parameters == *parameters && idle.lease.generation == generation
        }) {
            return (Step::Reuse(state.idle.remove(i)), None);
        }
        if state.open < max {
            state.open += 1;
            return (Step::Open(Slot(self.clone())), None);
        }
        if transaction {
            let adaptable = state.idle.iter().enumerate().rev().find_map(|(i, idle)| {
                if idle.lease.generation != generation {
                    return None;
                }
                adaptation(&idle.lease.parameters, parameters).map(|sql| (i, sql))
            });
            if let Some((i, sql)) = adaptable {
                return (Step::Adapt(state.idle.remove(i), sql), None);
            }
        }
        if !state.idle.is_empty() {
            // Full, and no idle connection fits: the oldest makes room and hands its slot on.
            let Idle { stream, lease, .. } = state.idle.remove(0);
            return (Step::Open(lease.slot), Some(stream));
        }
        (Step::Wait, None)
    }

    fn put_idle(self: Arc<Self>, stream: UpstreamStream, mut lease: Lease) {
        let mut state = self.state.lock().expect("pool lock");
        // This runs after every pooled transaction: equal values are made the same Arcs, so
        // that the next comparison (Arc's == looks at the pointers first) is cheap.
        match &state.statuses {
            Some((p, s)) if *p == lease.parameters && *s == lease.status => {
                lease.parameters = p.clone();
                lease.status = s.clone();
            }
            _ => state.statuses = Some((lease.parameters.clone(), lease.status.clone())),
        }
        state.idle.push(Idle {
            stream,
            lease,
            since: Instant::now(),
        });
        drop(state);
        self.changed.notify_one();
    }

    /// Under the lock: the idle connections to close, and the slots to refill to `min_size`.
    #[allow(clippy::type_complexity)]
    fn expire(
        self: &Arc<Self>,
        config: &PoolConfig,
        generation: u64,
    ) -> (
        Vec<(Idle, &'static str)>,
        Option<(Vec<Slot>, Arc<Parameters>)>,
    ) {
        let mut state = self.state.lock().expect("pool lock");
        let mut expired = Vec::new();
        let mut i = 0;
        while i < state.idle.len() {
            let idle = &state.idle[i];
            let reason = match keepable(&idle.lease, config, generation) {
                Err(reason) => Some(reason),
                Ok(())
                    if idle.since.elapsed() >= config.idle_timeout
                    // Counted as still open until closed: the pool keeps `min_size`.
                    && state.open - expired.len() > config.min_size =>
                {
                    Some("closed_idle_timeout")
                }
                Ok(()) => None,
            };
            match reason {
                Some(reason) => expired.push((state.idle.remove(i), reason)),
                None => i += 1,
            }
        }
        let open_after = state.open - expired.len();
        let refill = match (&state.latest, config.min_size.checked_sub(open_after)) {
            (Some(latest), Some(missing)) if missing > 0 => {
                let parameters = latest.clone();
                state.open += missing;
                let slots = (0..missing).map(|_| Slot(self.clone())).collect();
                Some((slots, parameters))
            }
            _ => None,
        };
        (expired, refill)
    }
}

/// Whether a connection may be kept at all: not from before a reload, not past its lifetime,
/// and pooling not switched off.
fn keepable(lease: &Lease, config: &PoolConfig, generation: u64) -> Result<(), &'static str> {
    if config.idle_timeout.is_zero() {
        return Err("closed_not_pooled");
    }
    if lease.generation != generation {
        return Err("closed_after_reload");
    }
    if lease.created.elapsed() >= config.max_lifetime {
        return Err("closed_max_lifetime");
    }
    Ok(())
}

/// Whether an idle connection may serve a new client.
async fn usable(
    idle: &mut Idle,
    transaction: bool,
    config: &PoolConfig,
    generation: u64,
    settings: &Settings,
) -> Result<(), &'static str> {
    keepable(&idle.lease, config, generation)?;
    // Under transaction pooling a connection back for less than a second skips the socket
    // check: connections change hands thousands of times a second, and a syscall each time
    // would guard against a failure that then shows at the next read instead.
    let recent = transaction && idle.since.elapsed() < QUIET_CHECK_AFTER;
    if !recent && !idle.stream.is_quiet() {
        return Err("closed_health_check");
    }
    if idle.since.elapsed() >= config.health_check_after {
        let check = exchange(&mut idle.stream, &mut idle.lease, "");
        match tokio::time::timeout(settings.upstream.connect_timeout, check).await {
            Ok(Ok(())) => {}
            _ => return Err("closed_health_check"),
        }
    }
    Ok(())
}

/// How switching a connection's settings went.
enum Adapted {
    Done,
    /// The server refused a value (a time zone it does not know, ...). The SETs ran as one
    /// implicit transaction and were rolled back together: the connection is as it was.
    Refused(UpstreamError),
    /// The connection failed; it is to be closed, for this reason.
    Failed(&'static str),
}

/// Switches an idle connection's adaptable settings to the client's `parameters` by running
/// `sql` (from `adaptation`).
async fn adapt(
    idle: &mut Idle,
    parameters: &Arc<Parameters>,
    sql: &str,
    settings: &Settings,
) -> Adapted {
    let set = exchange(&mut idle.stream, &mut idle.lease, sql);
    match tokio::time::timeout(settings.upstream.connect_timeout, set).await {
        Ok(Ok(())) => {
            idle.lease.parameters = parameters.clone();
            Adapted::Done
        }
        Ok(Err(ExchangeError::Refused(error))) => Adapted::Refused(error),
        _ => Adapted::Failed("closed_adapt_failed"),
    }
}

/// Logs in a new connection for `slot`.
async fn open(
    slot: Slot,
    settings: &Settings,
    login: Login<'_>,
    parameters: Arc<Parameters>,
    generation: u64,
    metrics: &Metrics,
) -> Result<(UpstreamStream, Lease, BytesMut), UpstreamError> {
    let connecting = Instant::now();
    let connected = upstream::connect(&settings.upstream, login).await;
    metrics.upstream_connect.observe(connecting.elapsed());
    let connection = connected.inspect_err(|_| {
        metrics
            .upstream_connect_failures
            .fetch_add(1, Ordering::Relaxed);
    })?;
    if connection.status != b'I' {
        return Err(UpstreamError::Wire(WireError::protocol(
            "upstream login did not end idle",
        )));
    }
    let lease = Lease {
        slot,
        pid: connection.pid,
        secret: connection.secret,
        startup: parameters.clone(),
        parameters,
        status: Arc::new(parameter_statuses(&connection.relay)),
        created: Instant::now(),
        generation,
        statements: ConnectionStatements::default(),
    };
    Ok((connection.stream, lease, connection.relay))
}

/// The ParameterStatus values among the login's messages.
fn parameter_statuses(relay: &[u8]) -> Vec<(String, String)> {
    let mut status = Vec::new();
    let mut rest = relay;
    while let Ok(Some((tag, total))) = pgbastion_wire::frame::header(rest) {
        if total > rest.len() {
            break;
        }
        if tag == b'S' {
            let mut fields = Fields::new(&rest[5..total]);
            if let (Ok(name), Ok(value)) = (fields.cstr(), fields.cstr()) {
                set_status(&mut status, name, value);
            }
        }
        rest = &rest[total..];
    }
    status
}

fn set_status(status: &mut Vec<(String, String)>, name: &str, value: &str) {
    match status.iter_mut().find(|(n, _)| n == name) {
        Some(entry) => entry.1 = value.to_string(),
        None => status.push((name.to_string(), value.to_string())),
    }
}

/// How a query the pool runs itself failed.
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    /// The server answered with an error and is idle again: the connection is intact.
    #[error(transparent)]
    Refused(UpstreamError),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Runs `sql` as a simple query and reads to ReadyForQuery; it must succeed and leave the
/// connection idle. ParameterStatus reports on the way (a reset returning settings to their
/// defaults) are remembered for the next client.
async fn exchange(
    stream: &mut UpstreamStream,
    lease: &mut Lease,
    sql: &str,
) -> Result<(), ExchangeError> {
    // A simple query destroys the unnamed statement.
    lease.statements.lose_unnamed();
    let mut out = BytesMut::new();
    let mut text = Vec::with_capacity(sql.len() + 1);
    text.extend_from_slice(sql.as_bytes());
    text.push(0);
    messages::raw(b'Q', &text, &mut out);
    stream.write_all(&out).await.map_err(WireError::from)?;
    stream.flush().await.map_err(WireError::from)?;
    let mut failed = None;
    // Buffered: an answer is a few small messages, read in one system call rather than two
    // per message. The server sends nothing unasked after ReadyForQuery but notices and
    // notifications; whatever arrived with it ends the connection rather than be lost.
    let mut reader = tokio::io::BufReader::with_capacity(8192, &mut *stream);
    loop {
        let (tag, body) = read_message(&mut reader, "upstream message", MAX_MESSAGE).await?;
        match tag {
            b'S' => {
                let mut fields = Fields::new(&body);
                set_status(
                    Arc::make_mut(&mut lease.status),
                    fields.cstr()?,
                    fields.cstr()?,
                );
            }
            b'E' if failed.is_none() => failed = Some(upstream::refused(&body)),
            b'G' | b'H' | b'W' => {
                return Err(WireError::protocol("the query started a COPY").into());
            }
            b'Z' => {
                if !reader.buffer().is_empty() {
                    return Err(WireError::protocol("the server sent more after the answer").into());
                }
                return match (failed, body.first()) {
                    (Some(refused), Some(b'I')) => Err(ExchangeError::Refused(refused)),
                    (None, Some(b'I')) => Ok(()),
                    (_, _) => Err(WireError::protocol("the query left a transaction open").into()),
                };
            }
            // Results, notices, notifications: nothing the next client should see.
            _ => {}
        }
    }
}

/// Closes a connection in the background; its slot is freed once the socket is closed.
fn close(stream: UpstreamStream, lease: Lease) {
    tokio::spawn(async move {
        terminate(stream).await;
        drop(lease);
    });
}

/// Terminate, then close the socket (TLS close_notify included), without waiting long.
async fn terminate(mut stream: UpstreamStream) {
    let goodbye = async {
        stream.write_all(&[b'X', 0, 0, 0, 4]).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), goodbye).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_format_settings_in_ascii_are_adapted_and_values_stay_literals() {
        let params = |pairs: &[(&str, &str)]| -> Parameters {
            pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        let from = params(&[("TimeZone", "UTC"), ("application_name", "a")]);
        let to = params(&[("TimeZone", "UTC"), ("application_name", "o'k\\';x")]);
        assert_eq!(
            adaptation(&from, &to).as_deref(),
            Some("SET application_name = E'o''k\\\\'';x';")
        );
        assert_eq!(adaptation(&from, &from).as_deref(), Some(""));
        for to in [
            params(&[("TimeZone", "UTC"), ("application_name", "é")]),
            params(&[("TimeZone", "UTC")]),
            params(&[("TimeZone", "UTC"), ("search_path", "a")]),
        ] {
            assert_eq!(adaptation(&from, &to), None, "{to:?}");
        }
        let from = params(&[("DateStyle", "ISO, MDY")]);
        assert_eq!(adaptation(&from, &params(&[("DateStyle", "ISO")])), None);
        for name in [
            "client_encoding",
            "search_path",
            "default_transaction_read_only",
        ] {
            assert_eq!(
                adaptation(&params(&[(name, "a")]), &params(&[(name, "b")])),
                None,
                "{name}"
            );
        }
    }

    #[test]
    fn parameter_statuses_are_read_from_the_login_messages() {
        let mut relay = BytesMut::new();
        messages::parameter_status("TimeZone", "UTC", &mut relay);
        messages::raw(b'N', b"SNOTICE\0\0", &mut relay);
        messages::parameter_status("application_name", "psql", &mut relay);
        messages::parameter_status("TimeZone", "Europe/Paris", &mut relay);
        assert_eq!(
            parameter_statuses(&relay),
            vec![
                ("TimeZone".to_string(), "Europe/Paris".to_string()),
                ("application_name".to_string(), "psql".to_string()),
            ]
        );
    }
}
