//! The relay of an authenticated session: client to upstream and upstream to client, run as
//! two independent directions in one task so neither can block the other.
//!
//! Bytes are forwarded as they are; only Query, Parse and FunctionCall are held whole and
//! decided before forwarding. A denied request is replaced upstream by a statement that fails
//! to parse (a "sentinel"), and the sentinel's error is replaced by the denial on its way back.
//! That keeps responses in order under pipelining and leaves the upstream's transaction state
//! exactly as a real error would (failed inside a transaction block, until ROLLBACK).

use crate::cancel::CancelKey;
use crate::catalog::{DatabaseCatalog, Loader, UNKNOWN_RELATION_REFRESH};
use crate::decision_cache::{DecisionCache, KeyKind, Scope, Verdict};
use crate::listener::Shared;
use crate::prepared::{Approved, Book};
use crate::reply::Refusal;
use bytes::{Buf, BytesMut};
use pgbastion_auth::{Grant, Identity};
use pgbastion_config::OnTokenExpiry;
use pgbastion_policy::{
    decide_with_effects, decision_key, Catalog, CompiledPolicy, Decision, PreparedOp, Principal,
    Request,
};
use pgbastion_wire::frame::{header, Fields, HEADER_LEN};
use pgbastion_wire::messages::{self, Report, Severity};
use pgbastion_wire::stream::{ClientStream, UpstreamStream};
use pgbastion_wire::{codes, upstream};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Instant;

/// Messages up to this size are handled whole; larger ones (big rows, COPY data, bytea
/// parameters) stream through without being buffered entirely.
const WHOLE_MESSAGE: usize = 64 * 1024;
const READ_BUFFER: usize = 16 * 1024;

pub(crate) struct Session {
    pub client: ClientStream,
    pub upstream: UpstreamStream,
    pub upstream_key: (i32, i32),
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
}

/// How a session ended.
#[derive(Debug)]
enum Ended {
    ClientTerminated,
    ClientGone,
    UpstreamClosed,
    Refused(Refusal),
}

/// A denial on its way: the sentinel's error, arriving before ReadyForQuery number `group`,
/// is replaced by `report`.
struct PendingDenial {
    group: u64,
    report: Report,
}

/// What the two directions share.
#[derive(Default)]
struct Ledger {
    denials: VecDeque<PendingDenial>,
    /// Messages forwarded upstream that each end with one ReadyForQuery (Query, Sync, FunctionCall).
    sent: u64,
    /// ReadyForQuery messages received.
    ready: u64,
    /// The prepared statements, kept up to date by both directions.
    book: Book,
}

impl Session {
    pub async fn run(self) {
        let Session {
            client,
            upstream,
            upstream_key,
            identity,
            grant,
            policy,
            search_path,
            database,
            login_role,
            cancel,
            shared,
        } = self;
        let started = Instant::now();
        let (client_read, mut client_write) = tokio::io::split(client);
        let (upstream_read, mut upstream_write) = tokio::io::split(upstream);
        let ledger = Mutex::new(Ledger::default());
        let sentinel = format!("pgbastion_denied_{:016x}", rand::random::<u64>());
        let config = &shared.settings.config;
        let expiry = Expiry::new(
            identity.expires_at,
            config.session.on_token_expiry,
            config.session.expiry_warning,
            shared
                .settings
                .config
                .issuers
                .iter()
                .find(|i| i.issuer == identity.issuer)
                .map(|i| i.leeway)
                .unwrap_or_default(),
        );
        let catalog = match (
            policy.needs_catalog(),
            shared.settings.role_passwords.get(&login_role),
        ) {
            (true, Some(password)) => Some(CatalogAccess {
                database: shared.catalogs.database(&database),
                loader: Loader {
                    target: &shared.settings.upstream,
                    role: &login_role,
                    password,
                    database: &database,
                },
                max_age: config.upstream.catalog_refresh,
            }),
            _ => None,
        };
        let ended = {
            let mut to_upstream = ClientToUpstream {
                decisions: &shared.decisions,
                client: client_read,
                upstream: &mut upstream_write,
                ledger: &ledger,
                sentinel: &sentinel,
                user: &identity.user,
                role: &grant.role,
                policy: &policy,
                search_path,
                catalog,
                max_statement: config.client.max_statement_bytes,
                passthrough: 0,
                skipping: false,
                decided_with: 0,
                login_role: &login_role,
                defaults_from: 0,
            };
            let mut to_client = UpstreamToClient {
                upstream: upstream_read,
                client: &mut client_write,
                ledger: &ledger,
                sentinel: &sentinel,
                passthrough: 0,
                expiry,
            };
            tokio::select! {
                ended = to_upstream.run() => ended,
                ended = to_client.run() => ended,
            }
        };
        let busy = {
            let ledger = ledger.lock().expect("ledger lock");
            ledger.sent > ledger.ready
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
                let target = shared.settings.upstream.clone();
                tokio::spawn(async move {
                    let _ = upstream::cancel(&target, upstream_key.0, upstream_key.1).await;
                });
            }
            _ => {}
        }
        let _ = client_write.shutdown().await;
        let _ = upstream_write.shutdown().await;
        drop(cancel);
        tracing::info!(
            ended = ?ended,
            seconds = started.elapsed().as_secs_f64(),
            "session ended"
        );
    }
}

/// How a session reaches its database's catalog snapshots.
struct CatalogAccess<'a> {
    database: Arc<DatabaseCatalog>,
    loader: Loader<'a>,
    max_age: std::time::Duration,
}

struct ClientToUpstream<'a> {
    decisions: &'a DecisionCache,
    client: ReadHalf<ClientStream>,
    upstream: &'a mut WriteHalf<UpstreamStream>,
    ledger: &'a Mutex<Ledger>,
    sentinel: &'a str,
    user: &'a str,
    role: &'a str,
    policy: &'a CompiledPolicy,
    /// Every schema the session's search_path has held (see `Principal::search_path`).
    search_path: Vec<String>,
    /// Present when the policy has relation or column rules.
    catalog: Option<CatalogAccess<'a>>,
    /// The catalog snapshot the last decision used (0: none).
    decided_with: u64,
    login_role: &'a str,
    /// The catalog snapshot whose search_path defaults (ALTER ROLE/DATABASE ... SET) were
    /// last added to `search_path`.
    defaults_from: u64,
    max_statement: usize,
    /// Bytes of a large message still to stream through.
    passthrough: usize,
    /// After a denied Parse: the upstream would skip to Sync, so the client's messages are dropped until Sync.
    skipping: bool,
}

impl ClientToUpstream<'_> {
    async fn run(&mut self) -> Ended {
        let mut buf = BytesMut::with_capacity(READ_BUFFER);
        loop {
            match self.client.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Ended::ClientGone,
                Ok(_) => {}
            }
            match self.process(&mut buf).await {
                Ok(None) => {}
                Ok(Some(ended)) => return ended,
                Err(_) => return Ended::UpstreamClosed,
            }
            if buf.capacity() < READ_BUFFER {
                buf.reserve(READ_BUFFER);
            }
        }
    }

    /// Forwards or decides every complete message in `buf`; returns how the session ends, if it does.
    async fn process(&mut self, buf: &mut BytesMut) -> std::io::Result<Option<Ended>> {
        // buf[..ready] is verbatim traffic waiting to be written upstream in one go.
        let mut ready = 0;
        loop {
            if self.passthrough > 0 {
                let n = self.passthrough.min(buf.len() - ready);
                if n == 0 {
                    break;
                }
                self.passthrough -= n;
                if self.skipping {
                    self.flush_ready(buf, &mut ready).await?;
                    buf.advance(n);
                } else {
                    ready += n;
                }
                continue;
            }
            let (tag, total) = match header(&buf[ready..]) {
                Ok(Some(found)) => found,
                Ok(None) => break,
                Err(err) => return Ok(Some(Ended::Refused(Refusal::from(err)))),
            };
            let available = buf.len() - ready;
            let inspect = matches!(tag, b'Q' | b'P' | b'F');
            if inspect && total - HEADER_LEN > self.max_statement {
                return Ok(Some(Ended::Refused(Refusal::StatementTooLarge {
                    size: total - HEADER_LEN,
                    limit: self.max_statement,
                })));
            }
            if available < total {
                if inspect || total <= WHOLE_MESSAGE {
                    buf.reserve(total - available);
                    break;
                }
                // A large Bind or CopyData: stream it (a Bind once its names are checked).
                if tag == b'B' {
                    let names = &buf[ready + HEADER_LEN..];
                    if names.iter().filter(|b| **b == 0).count() < 2 {
                        if available > 4096 {
                            return Ok(Some(Ended::Refused(Refusal::Protocol(
                                "Bind message names are too long".into(),
                            ))));
                        }
                        buf.reserve(4096);
                        break;
                    }
                    if let Err(report) = self.check_bind(names).await {
                        // Its parameters are still to come: drop them as they arrive.
                        self.flush_ready(buf, &mut ready).await?;
                        let sentinel = self.sentinel.to_string();
                        self.deny(b'P', &sentinel, report).await?;
                        self.passthrough = total;
                        continue;
                    }
                }
                if !matches!(tag, b'B' | b'd' | b'E' | b'D' | b'C') {
                    return Ok(Some(Ended::Refused(Refusal::Protocol(format!(
                        "unexpected message type '{}'",
                        tag.escape_ascii()
                    )))));
                }
                self.passthrough = total;
                continue;
            }
            if self.skipping && !matches!(tag, b'S' | b'X') {
                self.flush_ready(buf, &mut ready).await?;
                buf.advance(total);
                continue;
            }
            match tag {
                b'Q' | b'P' | b'F' => {
                    let body = &buf[ready + HEADER_LEN..ready + total];
                    match self.decide(tag, body).await {
                        Ok(()) => {
                            if tag != b'P' {
                                self.ledger.lock().expect("ledger lock").sent += 1;
                            }
                            ready += total;
                        }
                        Err(report) => {
                            let statement = match tag {
                                b'P' => messages::parse_message(body)
                                    .map(|p| p.statement.to_string())
                                    .unwrap_or_default(),
                                _ => String::new(),
                            };
                            self.flush_ready(buf, &mut ready).await?;
                            buf.advance(total);
                            self.deny(tag, &statement, report).await?;
                        }
                    }
                }
                b'S' => {
                    self.skipping = false;
                    self.ledger.lock().expect("ledger lock").sent += 1;
                    ready += total;
                }
                b'X' => {
                    ready += total;
                    self.flush_ready(buf, &mut ready).await?;
                    return Ok(Some(Ended::ClientTerminated));
                }
                b'B' => {
                    let body = &buf[ready + HEADER_LEN..ready + total];
                    match self.check_bind(body).await {
                        Ok(()) => ready += total,
                        Err(report) => {
                            self.flush_ready(buf, &mut ready).await?;
                            buf.advance(total);
                            let sentinel = self.sentinel.to_string();
                            self.deny(b'P', &sentinel, report).await?;
                        }
                    }
                }
                b'C' => {
                    let body = &buf[ready + HEADER_LEN..ready + total];
                    if let [kind, name @ .., 0] = body {
                        let name = String::from_utf8_lossy(name);
                        let mut ledger = self.ledger.lock().expect("ledger lock");
                        let group = ledger.sent;
                        ledger.book.close_sent(group, *kind, statement_name(&name));
                    }
                    ready += total;
                }
                b'E' | b'D' | b'H' | b'd' | b'c' | b'f' => ready += total,
                other => {
                    return Ok(Some(Ended::Refused(Refusal::Protocol(format!(
                        "unexpected message type '{}'",
                        other.escape_ascii()
                    )))))
                }
            }
        }
        self.flush_ready(buf, &mut ready).await?;
        self.upstream.flush().await?;
        Ok(None)
    }

    async fn flush_ready(&mut self, buf: &mut BytesMut, ready: &mut usize) -> std::io::Result<()> {
        if *ready > 0 {
            self.upstream.write_all(&buf[..*ready]).await?;
            buf.advance(*ready);
            *ready = 0;
        }
        Ok(())
    }

    /// The policy's verdict on a Query, Parse or FunctionCall; Err holds the client's error.
    async fn decide(&mut self, tag: u8, body: &[u8]) -> Result<(), Report> {
        let request = match tag {
            b'Q' => messages::query_text(body).map(Request::Query),
            b'P' => messages::parse_message(body).map(|p| Request::Parse {
                statement: p.statement,
                query: p.query,
            }),
            _ => messages::function_call_oid(body).map(|oid| Request::FunctionCall { oid }),
        };
        let request = request.map_err(|err| {
            Report::new(
                Severity::Error,
                codes::INSUFFICIENT_PRIVILEGE,
                format!("pgbastion could not analyse this statement, so it was not run: {err}"),
            )
            .hint("statements must be valid UTF-8; set client_encoding to UTF8")
        })?;
        let mut catalog = match &self.catalog {
            Some(access) => Some(
                access
                    .database
                    .fresh(&access.loader, access.max_age)
                    .await
                    .map_err(catalog_unavailable)?,
            ),
            None => None,
        };
        self.adopt_default_search_path(catalog.as_deref());
        let (mut decision, mut effects) = self.decide_cached(&request, catalog.as_deref());
        if let (true, Some(access), Some(current)) =
            (effects.unknown_relations, &self.catalog, &catalog)
        {
            // A relation created since the snapshot: decide again with a newer one.
            if let Ok(newer) = access
                .database
                .fresh(&access.loader, UNKNOWN_RELATION_REFRESH)
                .await
            {
                if newer.version != current.version {
                    self.adopt_default_search_path(Some(&newer));
                    (decision, effects) = self.decide_cached(&request, Some(&newer));
                    catalog = Some(newer);
                }
            }
        }
        self.decided_with = catalog.as_ref().map_or(0, |c| c.version);
        if let Decision::Deny(denial) = decision {
            return Err(denial_report(denial));
        }
        for schema in effects.search_path {
            self.widen_search_path(schema);
        }
        self.check_executes(&effects.prepared, catalog.as_deref())?;
        self.record(&request, &effects.prepared)
    }

    fn widen_search_path(&mut self, schema: String) {
        let schema = match schema.as_str() {
            "$user" => self.role.to_string(),
            _ => schema,
        };
        if !self.search_path.contains(&schema) {
            self.search_path.push(schema);
        }
    }

    /// The search_path a session starts with can come from ALTER ROLE/DATABASE ... SET, which
    /// the catalog reads: its schemas count from the start.
    fn adopt_default_search_path(&mut self, catalog: Option<&Catalog>) {
        let Some(catalog) = catalog else { return };
        if catalog.version == self.defaults_from {
            return;
        }
        self.defaults_from = catalog.version;
        let schemas: Vec<String> = catalog
            .default_search_path(self.login_role)
            .cloned()
            .collect();
        for schema in schemas {
            self.widen_search_path(schema);
        }
    }

    /// Enters an allowed request's prepared statements into the book as it is forwarded.
    fn record(&mut self, request: &Request<'_>, ops: &[PreparedOp]) -> Result<(), Report> {
        let version = self.decided_with;
        let mut ledger = self.ledger.lock().expect("ledger lock");
        let group = ledger.sent;
        let book = &mut ledger.book;
        let recorded = match request {
            Request::Parse { statement, query } => {
                let name = statement_name(statement);
                book.parse_sent(group, name, Approved::new(b'P', query, version))
                    .map_err(|()| name.to_string())
                    .and_then(|()| {
                        // PREPARE sent as a Parse runs at Execute, if ever: a possibility only.
                        ops.iter().try_for_each(|op| match op {
                            PreparedOp::Prepare(name) => book
                                .possible(name, Approved::new(b'P', query, version))
                                .map_err(|()| name.clone()),
                            _ => Ok(()),
                        })
                    })
            }
            Request::Query(sql) => ops.iter().try_for_each(|op| match op {
                PreparedOp::Prepare(name) => book
                    .prepare_sent(group, name, Approved::new(b'Q', sql, version))
                    .map_err(|()| name.clone()),
                PreparedOp::Deallocate(name) => {
                    book.deallocate_sent(group, name.as_deref());
                    Ok(())
                }
                PreparedOp::Execute(_) => Ok(()),
            }),
            Request::FunctionCall { .. } => Ok(()),
        };
        recorded.map_err(|name| {
            Report::new(
                Severity::Error,
                codes::DUPLICATE_PREPARED_STATEMENT,
                format!("prepared statement \"{name}\" already exists"),
            )
            .hint("close (DEALLOCATE) the statement before preparing it again")
        })
    }

    /// EXECUTE of a statement prepared under an older catalog snapshot: its candidates are
    /// decided again, as PostgreSQL plans them again.
    fn check_executes(
        &mut self,
        ops: &[PreparedOp],
        catalog: Option<&Catalog>,
    ) -> Result<(), Report> {
        let Some(catalog) = catalog else {
            return Ok(());
        };
        for op in ops {
            if let PreparedOp::Execute(name) = op {
                self.redecide(name, catalog)?;
            }
        }
        Ok(())
    }

    /// Decides again every statement `name` may hold that was approved under another snapshot.
    fn redecide(&mut self, name: &str, catalog: &Catalog) -> Result<(), Report> {
        let stale: Vec<(u8, Arc<str>)> = {
            let mut ledger = self.ledger.lock().expect("ledger lock");
            ledger
                .book
                .candidates(name)
                .iter()
                .filter(|a| a.catalog != catalog.version)
                .map(|a| (a.kind, a.text.clone()))
                .collect()
        };
        for (kind, text) in &stale {
            let request = match kind {
                b'Q' => Request::Query(text),
                _ => Request::Parse {
                    statement: name,
                    query: text,
                },
            };
            let (decision, effects) = self.decide_cached(&request, Some(catalog));
            if let Decision::Deny(denial) = decision {
                return Err(denial_report(denial));
            }
            // `EXECUTE q` prepared as a Parse: q may have gone stale too.
            for op in &effects.prepared {
                if let PreparedOp::Execute(inner) = op {
                    if inner != name {
                        self.redecide(inner, catalog)?;
                    }
                }
            }
        }
        if !stale.is_empty() {
            let mut ledger = self.ledger.lock().expect("ledger lock");
            for approved in ledger.book.candidates(name) {
                approved.catalog = catalog.version;
            }
        }
        Ok(())
    }

    /// A Bind may only run a statement the proxy approved; one approved under an older
    /// catalog snapshot is decided again first.
    async fn check_bind(&mut self, body: &[u8]) -> Result<(), Report> {
        let mut fields = Fields::new(body);
        let name = match fields.cstr().and_then(|_portal| fields.cstr()) {
            Ok(name) => name,
            Err(_) => return Ok(()), // malformed: the upstream refuses it
        };
        let name = statement_name(name);
        if !self.ledger.lock().expect("ledger lock").book.knows(name) {
            // Every statement the upstream may hold is in the book: this one cannot have
            // been approved.
            return Err(Report::new(
                Severity::Error,
                codes::INVALID_SQL_STATEMENT_NAME,
                format!("prepared statement \"{name}\" does not exist"),
            )
            .hint("prepare the statement before binding it"));
        }
        let Some(access) = &self.catalog else {
            return Ok(());
        };
        let catalog = access
            .database
            .fresh(&access.loader, access.max_age)
            .await
            .map_err(catalog_unavailable)?;
        self.adopt_default_search_path(Some(&catalog));
        self.redecide(name, &catalog)
    }

    /// The decision for a request, from the cache when the same statement (up to numeric
    /// literals, see `decision_key`) was decided before in the same scope.
    fn decide_cached(&self, request: &Request<'_>, catalog: Option<&Catalog>) -> Verdict {
        let principal = Principal {
            user: self.user,
            role: self.role,
            policy: self.policy,
            search_path: &self.search_path,
            catalog,
        };
        let (kind, sql) = match request {
            Request::Query(sql) => (b'Q', *sql),
            Request::Parse { query, .. } => (b'P', *query),
            Request::FunctionCall { .. } => return decide_with_effects(&principal, request),
        };
        let scope = Scope {
            kind,
            policy: &self.policy.name,
            search_path: &self.search_path,
            catalog: catalog.map_or(0, |c| c.version),
        };
        if let Some(verdict) = self.decisions.get(&scope, KeyKind::Text, sql) {
            return verdict;
        }
        let Some(key) = decision_key(sql) else {
            return decide_with_effects(&principal, request);
        };
        if let Some(verdict) = self.decisions.get(&scope, KeyKind::Tokens, &key) {
            // Seen before with other numbers: its numbers vary, and filing each text would
            // only churn the exact-text map.
            return verdict;
        }
        let verdict = decide_with_effects(&principal, request);
        self.decisions
            .insert(&scope, KeyKind::Tokens, &key, verdict.clone());
        self.decisions
            .insert(&scope, KeyKind::Text, sql, verdict.clone());
        verdict
    }

    /// Sends the sentinel in place of the denied message and records the denial. A denied
    /// Parse becomes a Parse of the sentinel under the same statement name: it fails before
    /// anything is stored, so that name stays undefined upstream and other statements, the
    /// unnamed one included, are untouched.
    async fn deny(&mut self, tag: u8, statement: &str, report: Report) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        {
            let mut ledger = self.ledger.lock().expect("ledger lock");
            let group = ledger.sent;
            ledger.denials.push_back(PendingDenial { group, report });
            match tag {
                b'P' => {
                    let mut body = BytesMut::new();
                    body.extend_from_slice(statement.as_bytes());
                    body.extend_from_slice(b"\0");
                    body.extend_from_slice(self.sentinel.as_bytes());
                    body.extend_from_slice(b"\0\0\0");
                    messages::raw(b'P', &body, &mut out);
                    // The upstream now skips to Sync; so do we with the client's messages.
                    self.skipping = true;
                }
                _ => {
                    let mut body = self.sentinel.as_bytes().to_vec();
                    body.push(0);
                    messages::raw(b'Q', &body, &mut out);
                    ledger.sent += 1;
                }
            }
        }
        self.upstream.write_all(&out).await
    }
}

struct UpstreamToClient<'a> {
    upstream: ReadHalf<UpstreamStream>,
    client: &'a mut WriteHalf<ClientStream>,
    ledger: &'a Mutex<Ledger>,
    sentinel: &'a str,
    passthrough: usize,
    expiry: Expiry,
}

impl UpstreamToClient<'_> {
    async fn run(&mut self) -> Ended {
        let mut buf = BytesMut::with_capacity(READ_BUFFER);
        // Created once: a timer registered per loop turn would cost a timer-wheel insert and
        // removal for every batch of messages.
        let warn = sleep_until(self.expiry.warn_at);
        let end = sleep_until(self.expiry.end_at);
        tokio::pin!(warn, end);
        let (mut warn_fired, mut end_fired) = (false, false);
        loop {
            tokio::select! {
                read = self.upstream.read_buf(&mut buf) => {
                    match read {
                        Ok(0) | Err(_) => return Ended::UpstreamClosed,
                        Ok(_) => {}
                    }
                    match self.process(&mut buf).await {
                        Ok(None) => {}
                        Ok(Some(ended)) => return ended,
                        Err(_) => return Ended::ClientGone,
                    }
                    if buf.capacity() < READ_BUFFER {
                        buf.reserve(READ_BUFFER);
                    }
                }
                _ = &mut warn, if !warn_fired => {
                    warn_fired = true;
                    self.expiry.warning_due = true;
                }
                _ = &mut end, if !end_fired => {
                    end_fired = true;
                    self.expiry.expired = true;
                }
            }
            // Our own messages go out only between whole messages of the upstream's.
            if self.passthrough == 0 {
                if self.expiry.expired {
                    return Ended::Refused(Refusal::TokenExpired);
                }
                if self.expiry.warning_due {
                    self.expiry.warning_due = false;
                    let mut out = BytesMut::new();
                    Report::new(
                        Severity::Warning,
                        codes::WARNING,
                        format!(
                            "the access token of this session expires at {}; the session will then end",
                            humantime::format_rfc3339_seconds(self.expiry.expires_at)
                        ),
                    )
                    .hint("reconnect with a fresh access token before then")
                    .encode(&mut out);
                    if self.client.write_all(&out).await.is_err()
                        || self.client.flush().await.is_err()
                    {
                        return Ended::ClientGone;
                    }
                }
            }
        }
    }

    async fn process(&mut self, buf: &mut BytesMut) -> std::io::Result<Option<Ended>> {
        let mut ready = 0;
        // A sentinel's error can only be in `buf` if its denial was recorded before `buf` was
        // read, so one look per batch is enough.
        let mut pending = !self.ledger.lock().expect("ledger lock").denials.is_empty();
        loop {
            if self.passthrough > 0 {
                let n = self.passthrough.min(buf.len() - ready);
                if n == 0 {
                    break;
                }
                self.passthrough -= n;
                ready += n;
                continue;
            }
            let (tag, total) = match header(&buf[ready..]) {
                Ok(Some(found)) => found,
                Ok(None) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "upstream broke the protocol");
                    return Ok(Some(Ended::UpstreamClosed));
                }
            };
            let available = buf.len() - ready;
            let inspect = matches!(tag, b'Z' | b'E' | b'1' | b'3');
            if available < total {
                if inspect || total <= WHOLE_MESSAGE {
                    buf.reserve(total - available);
                    break;
                }
                self.passthrough = total;
                continue;
            }
            match tag {
                b'Z' => {
                    let mut ledger = self.ledger.lock().expect("ledger lock");
                    let group = ledger.ready;
                    // A denial whose sentinel was skipped (an earlier error in the same
                    // pipeline) ends here unanswered, as a skipped message would.
                    while ledger.denials.front().is_some_and(|d| d.group <= group) {
                        ledger.denials.pop_front();
                    }
                    ledger.book.ready(group);
                    ledger.ready += 1;
                    ready += total;
                }
                b'1' => {
                    self.ledger
                        .lock()
                        .expect("ledger lock")
                        .book
                        .parse_complete();
                    ready += total;
                }
                b'3' => {
                    self.ledger
                        .lock()
                        .expect("ledger lock")
                        .book
                        .close_complete();
                    ready += total;
                }
                b'E' if !pending => {
                    self.ledger.lock().expect("ledger lock").book.error();
                    ready += total;
                }
                b'E' => {
                    let body = &buf[ready + HEADER_LEN..ready + total];
                    let is_sentinel = messages::error_fields(body).is_ok_and(|fields| {
                        messages::error_field(&fields, b'C') == Some(codes::SYNTAX_ERROR)
                            && messages::error_field(&fields, b'M')
                                .is_some_and(|m| m.contains(self.sentinel))
                    });
                    let replacement = {
                        let mut ledger = self.ledger.lock().expect("ledger lock");
                        ledger.book.error();
                        if is_sentinel {
                            let denial = ledger.denials.pop_front();
                            pending = !ledger.denials.is_empty();
                            denial
                        } else {
                            None
                        }
                    };
                    match replacement {
                        Some(denial) => {
                            if ready > 0 {
                                self.client.write_all(&buf[..ready]).await?;
                                buf.advance(ready);
                                ready = 0;
                            }
                            buf.advance(total);
                            let mut out = BytesMut::new();
                            denial.report.encode(&mut out);
                            self.client.write_all(&out).await?;
                        }
                        None => ready += total,
                    }
                }
                _ => ready += total,
            }
        }
        if ready > 0 {
            self.client.write_all(&buf[..ready]).await?;
            buf.advance(ready);
        }
        self.client.flush().await?;
        Ok(None)
    }
}

/// When to warn about and end a session whose token expires.
struct Expiry {
    expires_at: SystemTime,
    warn_at: Option<Instant>,
    end_at: Option<Instant>,
    warning_due: bool,
    expired: bool,
}

impl Expiry {
    fn new(
        expires_at: SystemTime,
        mode: OnTokenExpiry,
        warning: std::time::Duration,
        leeway: std::time::Duration,
    ) -> Self {
        let mut expiry = Expiry {
            expires_at,
            warn_at: None,
            end_at: None,
            warning_due: false,
            expired: false,
        };
        if mode == OnTokenExpiry::Disconnect {
            // Tokens are accepted up to `leeway` past `exp` (clock skew), so sessions end then too.
            let remaining = (expires_at + leeway)
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            let now = Instant::now();
            expiry.end_at = Some(now + remaining);
            expiry.warn_at = Some(now + remaining.saturating_sub(warning));
        }
        expiry
    }
}

/// A statement name as PostgreSQL keys it: its first 63 bytes (NAMEDATALEN - 1).
fn statement_name(name: &str) -> &str {
    let mut end = name.len().min(63);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// The client's ErrorResponse for a denial.
fn denial_report(denial: pgbastion_policy::Denial) -> Report {
    tracing::info!(policy = %denial.policy, rule = %denial.rule, message = %denial.message, "statement denied");
    let mut report = Report::new(
        Severity::Error,
        codes::INSUFFICIENT_PRIVILEGE,
        denial.message,
    )
    .detail(format!("rule: {}", denial.rule));
    if let Some(hint) = denial.hint {
        report = report.hint(hint);
    }
    report
}

/// Without the catalog a policy with relation rules cannot see through views: fail closed.
fn catalog_unavailable(error: String) -> Report {
    tracing::warn!(error = %error, "upstream catalog could not be loaded");
    Report::new(
        Severity::Error,
        codes::INSUFFICIENT_PRIVILEGE,
        "pgbastion could not read the upstream catalog it needs to decide this statement, so it was not run",
    )
    .hint("try again shortly; if it persists, tell the pgbastion operator")
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
