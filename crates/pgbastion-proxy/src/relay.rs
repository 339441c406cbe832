//! The relay of an authenticated session: client to upstream and upstream to client, run as
//! two independent directions in one task so neither can block the other.
//!
//! Bytes are forwarded as they are; only Query, Parse and FunctionCall are held whole and
//! decided before forwarding. A denied request is replaced upstream by a statement that fails
//! to parse (a "sentinel"), and the sentinel's error is replaced by the denial on its way back.
//! That keeps responses in order under pipelining and leaves the upstream's transaction state
//! exactly as a real error would (failed inside a transaction block, until ROLLBACK).
//!
//! `client_side` decides and forwards; `upstream_side` relays the answers; `executions`
//! follows each forwarded statement to its outcome for the audit log and metrics.

use crate::cancel::CancelKey;
use crate::catalog::Loader;
use crate::client_side::{CatalogAccess, ClientToUpstream};
use crate::executions::Executions;
use crate::limits::{ConnectionSlot, SessionSlot, StatementRate};
use crate::listener::Shared;
use crate::pool::{AcquireError, Lease, Pools, Target};
use crate::prepared::Book;
use crate::renaming::{ConnectionStatements, Owed};
use crate::reply::Refusal;
use crate::settings::Settings;
use crate::upstream_side::{Expiry, UpstreamToClient};
use bytes::BytesMut;
use pgbastion_audit::Event;
use pgbastion_auth::{Grant, Identity};
use pgbastion_config::PoolMode;
use pgbastion_policy::CompiledPolicy;
use pgbastion_wire::messages::Report;
use pgbastion_wire::stream::{ClientStream, UpstreamStream};
use pgbastion_wire::upstream;
use pgbastion_wire::upstream::Login;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// Messages up to this size are handled whole; larger ones (big rows, COPY data, bytea
/// parameters) stream through without being buffered entirely.
pub(crate) const WHOLE_MESSAGE: usize = 64 * 1024;
pub(crate) const READ_BUFFER: usize = 16 * 1024;

pub(crate) struct Session {
    pub client: ClientStream,
    /// The upstream connection and its place in its pool; None for a transaction-pooled
    /// session, which takes one for each transaction.
    pub upstream: Option<(UpstreamStream, Lease)>,
    pub mode: PoolMode,
    /// Startup parameters of the upstream login (transaction pooling logs in again with them).
    pub parameters: Vec<(String, String)>,
    /// The session's pool.
    pub target: Target,
    pub identity: Identity,
    pub grant: Grant,
    pub policy: Arc<CompiledPolicy>,
    /// The session's search_path as the policy resolves unqualified names with it.
    pub search_path: Vec<String>,
    pub database: String,
    /// The role pgbastion logged in as upstream (the gateway role in gateway mode).
    pub login_role: String,
    pub cancel: CancelKey,
    pub shared: Arc<Shared>,
    pub conn: u64,
    /// Who the session is, as a JSON object for audit records.
    pub session_json: Arc<str>,
    pub statement_rate: Option<StatementRate>,
    /// Places under the connection limits, released when the session ends.
    pub slots: (ConnectionSlot, Option<SessionSlot>),
    /// The configuration generation `policy` was taken from.
    pub generation: u64,
}

/// How a session ended.
#[derive(Debug)]
pub(crate) enum Ended {
    ClientTerminated,
    ClientGone,
    UpstreamClosed,
    Refused(Refusal),
    /// Transaction pooling: the transaction ended and nothing is in flight, so the upstream
    /// connection goes back to the pool.
    Release,
    /// Transaction pooling: the client sent a request and the session holds no connection.
    NeedUpstream,
}

impl Ended {
    fn reason(&self) -> &'static str {
        match self {
            Ended::ClientTerminated => "client_terminated",
            Ended::ClientGone => "client_gone",
            Ended::UpstreamClosed => "upstream_closed",
            Ended::Refused(refusal) => refusal.reason(),
            Ended::Release | Ended::NeedUpstream => "pooling",
        }
    }
}

/// A denial on its way: the sentinel's error, arriving before ReadyForQuery number `group`,
/// is replaced by `report`.
pub(crate) struct PendingDenial {
    pub group: u64,
    pub report: Report,
}

/// What the two directions share.
pub(crate) struct Ledger {
    pub denials: VecDeque<PendingDenial>,
    /// Messages forwarded upstream that each end with one ReadyForQuery (Query, Sync, FunctionCall).
    pub sent: u64,
    /// ReadyForQuery messages received.
    pub ready: u64,
    /// The transaction status of the last ReadyForQuery ('I' idle, 'T' in a transaction,
    /// 'E' failed).
    pub status: u8,
    /// The prepared statements, kept up to date by both directions.
    pub book: Book,
    /// Forwarded statements awaiting their outcome.
    pub executions: Executions,
    /// Transaction pooling is on and the session has created no session state: its
    /// connection goes back to the pool after each transaction.
    pub releasing: bool,
    /// The client side is between requests (no batch being handled, nothing half sent, no
    /// pipeline waiting for its Sync); kept only when `releasing`.
    pub client_between: bool,
    /// The upstream side is between messages with nothing unread; kept only when `releasing`.
    pub upstream_between: bool,
    /// The attached connection's prepared statements and the answers owed for the Parse and
    /// Close messages the proxy sent on it (transaction pooling).
    pub connection: ConnectionStatements,
    pub owed: Owed,
}

impl Ledger {
    /// Whether the attached connection may go back to the pool now.
    pub fn releasable(&self) -> bool {
        self.releasing
            && self.client_between
            && self.upstream_between
            && self.sent == self.ready
            && self.status == b'I'
            && self.denials.is_empty()
            && self.owed.is_empty()
    }
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            denials: VecDeque::new(),
            sent: 0,
            ready: 0,
            status: b'I',
            book: Book::default(),
            executions: Executions::default(),
            releasing: false,
            client_between: true,
            upstream_between: true,
            connection: ConnectionStatements::default(),
            owed: Owed::default(),
        }
    }
}

impl Session {
    pub async fn run(self) {
        let Session {
            client,
            upstream,
            mode,
            parameters,
            target,
            identity,
            grant,
            policy,
            search_path,
            database,
            login_role,
            cancel,
            shared,
            conn,
            session_json,
            statement_rate,
            slots,
            generation,
        } = self;
        let started = Instant::now();
        let settings = shared.settings();
        let config = &settings.config;
        let (client_read, mut client_write) = tokio::io::split(client);
        let transaction_pool = mode == PoolMode::Transaction;
        let (mut upstream_write, mut upstream_read, mut lease) = (None, None, None);
        let mut ledger = Ledger {
            releasing: transaction_pool,
            ..Ledger::default()
        };
        if let Some((stream, mut attached)) = upstream {
            let (read, write) = tokio::io::split(stream);
            (upstream_read, upstream_write) = (Some(read), Some(write));
            ledger.connection = std::mem::take(&mut attached.statements);
            lease = Some(attached);
        }
        let ledger = Mutex::new(ledger);
        let sentinel = format!("pgbastion_denied_{:016x}", rand::random::<u64>());
        let expiry = Expiry::new(
            identity.expires_at,
            config.session.on_token_expiry,
            config.session.expiry_warning,
            config
                .issuers
                .iter()
                .find(|i| i.issuer == identity.issuer)
                .map(|i| i.leeway)
                .unwrap_or_default(),
        );
        let catalog = settings
            .role_passwords
            .get(&login_role)
            .map(|password| CatalogAccess {
                database: shared.catalogs.database(&database),
                loader: Loader {
                    target: &settings.upstream,
                    role: &login_role,
                    password,
                    database: &database,
                },
                max_age: config.upstream.catalog_refresh,
            });
        let audit = shared.auditor.enabled().then(|| session_json.clone());
        let (ended, bytes_in, bytes_out, between_requests, upstream) = {
            let mut to_upstream = ClientToUpstream::new(
                &shared,
                client_read,
                upstream_write,
                &ledger,
                &sentinel,
                &identity.user,
                &grant.role,
                policy,
                search_path,
                catalog,
                &login_role,
                config.client.max_statement_bytes,
                statement_rate,
                conn,
                audit,
                generation,
                transaction_pool,
            );
            let mut to_client = UpstreamToClient::new(
                &shared,
                upstream_read,
                &mut client_write,
                &ledger,
                &sentinel,
                expiry,
                conn,
                session_json.clone(),
            );
            let ended = loop {
                let ended = tokio::select! {
                    ended = to_upstream.run() => ended,
                    ended = to_client.run() => ended,
                };
                match ended {
                    Ended::Release => {
                        let (Some(read), Some(write), Some(mut released)) =
                            (to_client.detach(), to_upstream.detach(), lease.take())
                        else {
                            unreachable!("only an attached session releases its connection");
                        };
                        released.statements =
                            std::mem::take(&mut ledger.lock().expect("ledger lock").connection);
                        cancel.set_upstream(None);
                        cancel.settle().await;
                        Pools::release(read.unsplit(write), released, &shared);
                    }
                    Ended::NeedUpstream => {
                        let acquired = attach(
                            &shared,
                            &target,
                            &settings,
                            &login_role,
                            &database,
                            &parameters,
                        )
                        .await;
                        let (stream, mut attached) = match acquired {
                            Ok(acquired) => acquired,
                            Err(refusal) => break Ended::Refused(refusal),
                        };
                        cancel.set_upstream(Some((attached.pid, attached.secret)));
                        ledger.lock().expect("ledger lock").connection =
                            std::mem::take(&mut attached.statements);
                        let (read, write) = tokio::io::split(stream);
                        to_upstream.attach(write);
                        to_client.attach(read);
                        lease = Some(attached);
                    }
                    ended => break ended,
                }
            };
            // Statements forwarded but not answered: still recorded, their outcome unknown.
            ledger
                .lock()
                .expect("ledger lock")
                .executions
                .abandon(&mut to_client.finished);
            to_client.report_finished().await;
            let bytes_out = to_client.bytes;
            let between_requests = to_upstream.between_requests();
            let upstream = match (to_client.into_idle_upstream(), to_upstream.detach()) {
                (Some(read), Some(write)) => Some(read.unsplit(write)),
                (_, Some(mut write)) => {
                    let _ = write.shutdown().await;
                    None
                }
                _ => None,
            };
            (
                ended,
                to_upstream.bytes,
                bytes_out,
                between_requests,
                upstream,
            )
        };
        let (busy, idle) = {
            let ledger = ledger.lock().expect("ledger lock");
            (
                ledger.sent > ledger.ready,
                ledger.sent == ledger.ready && ledger.status == b'I',
            )
        };
        match &ended {
            Ended::Refused(refusal) => {
                let mut out = BytesMut::new();
                refusal.encode(&mut out);
                let _ = client_write.write_all(&out).await;
                let _ = client_write.flush().await;
            }
            Ended::ClientGone if busy => {
                // The client vanished mid-statement: without a cancel the upstream would run
                // the statement to its end before noticing.
                let target = settings.upstream.clone();
                if let Some(lease) = &lease {
                    let (pid, secret) = (lease.pid, lease.secret);
                    tokio::spawn(async move {
                        let _ = upstream::cancel(&target, pid, secret).await;
                    });
                }
            }
            _ => {}
        }
        let _ = client_write.shutdown().await;
        // The connection serves another session only after a clean end: the client said
        // Terminate between requests, every request was answered, no transaction is open.
        let clean = matches!(ended, Ended::ClientTerminated) && between_requests && idle;
        let pinned = transaction_pool && !ledger.lock().expect("ledger lock").releasing;
        cancel.set_upstream(None);
        cancel.settle().await;
        match (upstream, lease) {
            (Some(stream), Some(mut lease)) => {
                lease.statements =
                    std::mem::take(&mut ledger.lock().expect("ledger lock").connection);
                if transaction_pool && clean && !pinned {
                    // Nothing of the session's is left on it: no reset needed.
                    Pools::release(stream, lease, &shared);
                } else {
                    Pools::give_back(stream, lease, clean, shared.clone());
                }
            }
            (_, lease) => drop(lease),
        }
        drop(cancel);
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(ended = ?ended, seconds, "session ended");
        shared
            .audit(conn, Some(session_json), || Event::Disconnect {
                reason: ended.reason().to_string(),
                seconds,
                bytes_from_client: bytes_in,
                bytes_to_client: bytes_out,
            })
            .await;
        drop(slots);
    }
}

/// A connection for the next transaction of a transaction-pooled session.
async fn attach(
    shared: &Shared,
    target: &Target,
    settings: &Settings,
    login_role: &str,
    database: &str,
    parameters: &[(String, String)],
) -> Result<(UpstreamStream, Lease), Refusal> {
    let password = settings
        .role_passwords
        .get(login_role)
        .ok_or(Refusal::Internal { conn: 0 })?;
    let login = Login {
        user: login_role,
        password: password.expose(),
        database,
        parameters,
    };
    let generation = shared.generation();
    match shared
        .pools
        .acquire(target, settings, login, generation, &shared.metrics)
        .await
    {
        Ok(checkout) => Ok((checkout.stream, checkout.lease)),
        Err(AcquireError::Exhausted { max, waited }) => Err(Refusal::PoolExhausted {
            role: login_role.to_string(),
            database: database.to_string(),
            max,
            waited,
        }),
        Err(AcquireError::Upstream(error)) => {
            tracing::warn!(role = %login_role, error = %error, "upstream login failed");
            Err(Refusal::Upstream {
                role: login_role.to_string(),
                error,
            })
        }
    }
}

/// A statement or portal name as PostgreSQL keys it: its first 63 bytes (NAMEDATALEN - 1).
/// Only ASCII names are accepted (see `name_is_acceptable`), so the cut is a character boundary
/// and the bytes are the same in every client encoding.
pub(crate) fn statement_name(name: &str) -> &str {
    let mut end = name.len().min(63);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// PostgreSQL compares the raw first 63 bytes of a name after converting it from the client
/// encoding; the proxy keys its book on text. Names of ASCII characters mean the same to
/// both, and every client library generates such names.
pub(crate) fn name_is_acceptable(name: &str) -> bool {
    name.is_ascii()
}
