//! Client to upstream: every Query, Parse, Bind and FunctionCall is decided before it is
//! forwarded; everything else streams through. Denials become sentinels (see `relay`).

use crate::catalog::{DatabaseCatalog, Loader, UNKNOWN_RELATION_REFRESH};
use crate::decision_cache::{KeyKind, Scope, Verdict};
use crate::executions::Execution;
use crate::limits::StatementRate;
use crate::listener::Shared;
use crate::prepared::{About, Approved};
use crate::relay::{
    name_is_acceptable, statement_name, Ended, Ledger, PendingDenial, READ_BUFFER, WHOLE_MESSAGE,
};
use crate::renaming::{close_message, ClientStatements, Definition, NO_STATEMENT};
use crate::reply::Refusal;
use bytes::{Buf, BytesMut};
use pgbastion_audit::{Event, StatementRecord, StatementStatus};
use pgbastion_policy::{
    decide_with_effects, decision_key, decision_key_and_redacted, Catalog, CompiledPolicy,
    Decision, PreparedOp, Principal, Request,
};
use pgbastion_wire::codes;
use pgbastion_wire::frame::{header, Fields, HEADER_LEN};
use pgbastion_wire::messages::{self, Report, Severity};
use pgbastion_wire::stream::{ClientStream, UpstreamStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

/// Named portals remembered for the audit, at most (the unnamed one is kept apart).
const MAX_PORTALS: usize = 1024;
/// Statements forwarded and not yet answered, at most: a client that pipelines more (the
/// upstream answers nothing after an error until Sync) is disconnected.
const MAX_IN_FLIGHT: usize = 65_536;
/// How deep `EXECUTE` of a statement that itself executes another may nest when re-deciding.
const MAX_EXECUTE_DEPTH: usize = 16;
/// Bytes queued for the upstream before they are written, at most.
const WRITE_BATCH: usize = 64 * 1024;

/// How a session reaches its database's catalog snapshots.
pub(crate) struct CatalogAccess<'a> {
    pub database: Arc<DatabaseCatalog>,
    pub loader: Loader<'a>,
    pub max_age: std::time::Duration,
}

pub(crate) struct ClientToUpstream<'a> {
    shared: &'a Shared,
    client: ReadHalf<ClientStream>,
    /// None between transactions of a transaction-pooled session.
    upstream: Option<WriteHalf<UpstreamStream>>,
    /// Bytes read from the client and not yet handled.
    buf: BytesMut,
    /// Bytes for the upstream not yet written. A batch whose messages are rewritten
    /// (transaction pooling renames Parse, Bind and Describe) still goes out in one write:
    /// a write per message would cost a syscall and an upstream wake-up each.
    out: BytesMut,
    /// Transaction pooling: statements are renamed (see `renaming`) and the connection is
    /// released between transactions until the session creates session state.
    transaction_pool: bool,
    statements: ClientStatements,
    ledger: &'a Mutex<Ledger>,
    sentinel: &'a str,
    user: &'a str,
    role: &'a str,
    /// The session's policy as of configuration `generation`; a reload replaces it by the
    /// policy of the same name before the next statement is decided.
    policy: Arc<CompiledPolicy>,
    generation: u64,
    /// "name\0version": decisions are cached per policy version.
    policy_key: String,
    /// Every schema the session's search_path has held (see `Principal::search_path`).
    search_path: Vec<String>,
    /// Used when the policy has relation or column rules.
    catalog: Option<CatalogAccess<'a>>,
    /// The catalog snapshot the last decision used (0: none).
    decided_with: u64,
    login_role: &'a str,
    /// The catalog snapshot whose search_path defaults (ALTER ROLE/DATABASE ... SET) were
    /// last added to `search_path`.
    defaults_from: u64,
    max_statement: usize,
    rate: Option<StatementRate>,
    conn: u64,
    /// The session's identity as JSON, when statements are audited.
    audit: Option<Arc<str>>,
    /// The last decision's verdict, for the audit of a denial.
    last_verdict: Option<Verdict>,
    /// The last decided statement redacted for the audit log, when its decision key was
    /// computed (the redaction comes from the same pass).
    last_redacted: Option<Arc<str>>,
    /// What the unnamed and named portals run, for executions' audit records and metrics.
    unnamed_portal: Option<Arc<About>>,
    portals: HashMap<String, Arc<About>>,
    /// Bytes of a large message still to stream through.
    passthrough: usize,
    /// After a denied Parse: the upstream would skip to Sync, so the client's messages are dropped until Sync.
    skipping: bool,
    /// Extended-protocol messages were forwarded since the last Sync. A Query or FunctionCall
    /// then would be skipped upstream after an error and never answered, which would put the
    /// count of ReadyForQuery messages out of step: such a session is ended instead.
    unsynced: bool,
    /// A request that may have set sequence values (a write, `nextval`, `setval`) went
    /// upstream since the current connection was attached (transaction pooling).
    sequences_set_here: bool,
    /// Bytes read from the client.
    pub bytes: u64,
}

impl<'a> ClientToUpstream<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shared: &'a Shared,
        client: ReadHalf<ClientStream>,
        upstream: Option<WriteHalf<UpstreamStream>>,
        ledger: &'a Mutex<Ledger>,
        sentinel: &'a str,
        user: &'a str,
        role: &'a str,
        policy: Arc<CompiledPolicy>,
        search_path: Vec<String>,
        catalog: Option<CatalogAccess<'a>>,
        login_role: &'a str,
        max_statement: usize,
        rate: Option<StatementRate>,
        conn: u64,
        audit: Option<Arc<str>>,
        generation: u64,
        transaction_pool: bool,
    ) -> Self {
        ClientToUpstream {
            shared,
            client,
            upstream,
            buf: BytesMut::with_capacity(READ_BUFFER),
            out: BytesMut::new(),
            transaction_pool,
            statements: ClientStatements::default(),
            ledger,
            sentinel,
            user,
            role,
            policy_key: format!("{}\0{}", policy.name, policy.version),
            policy,
            generation,
            search_path,
            catalog,
            decided_with: 0,
            login_role,
            defaults_from: 0,
            max_statement,
            rate,
            conn,
            audit,
            last_verdict: None,
            last_redacted: None,
            unnamed_portal: None,
            portals: HashMap::new(),
            passthrough: 0,
            skipping: false,
            unsynced: false,
            sequences_set_here: false,
            bytes: 0,
        }
    }

    /// Whether the client's messages so far form complete requests: nothing half forwarded,
    /// no extended-protocol pipeline waiting for its Sync.
    pub fn between_requests(&self) -> bool {
        self.passthrough == 0 && !self.skipping && !self.unsynced
    }

    /// Starts forwarding to a connection (transaction pooling).
    pub fn attach(&mut self, upstream: WriteHalf<UpstreamStream>) {
        self.upstream = Some(upstream);
        self.sequences_set_here = false;
    }

    /// Gives the connection back (after a release, or at the end).
    pub fn detach(&mut self) -> Option<WriteHalf<UpstreamStream>> {
        // Bytes queued for this connection never go to the next one.
        self.out.clear();
        self.upstream.take()
    }

    pub async fn run(&mut self) -> Ended {
        loop {
            // Bytes left from before a release or attach are handled before reading more.
            if !self.buf.is_empty() {
                match self.process_batch().await {
                    Ok(None) => {}
                    Ok(Some(ended)) => return ended,
                    Err(_) => return Ended::UpstreamClosed,
                }
            }
            if self.buf.capacity() - self.buf.len() < READ_BUFFER / 4 {
                self.buf.reserve(READ_BUFFER);
            }
            match self.client.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Ended::ClientGone,
                Ok(n) => self.bytes += n as u64,
            }
        }
    }

    /// Handles what `buf` holds; under transaction pooling, keeps the ledger told whether the
    /// client is between requests and releases the connection when the transaction is over.
    async fn process_batch(&mut self) -> std::io::Result<Option<Ended>> {
        if self.transaction_pool {
            self.ledger.lock().expect("ledger lock").client_between = false;
        }
        let mut buf = std::mem::take(&mut self.buf);
        let mut processed = self.process(&mut buf).await;
        self.buf = buf;
        // A session that ends mid-batch still sends what it queued (a session that needs a
        // connection has none, so nothing is queued then).
        if processed.is_ok() {
            if let Err(err) = self.write_out().await {
                processed = Err(err);
            }
        }
        if self.transaction_pool {
            let mut ledger = self.ledger.lock().expect("ledger lock");
            ledger.client_between = self.between_requests();
            if matches!(processed, Ok(None)) && self.upstream.is_some() && ledger.releasable() {
                return Ok(Some(Ended::Release));
            }
        }
        processed
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
            // Transaction pooling between transactions: a connection is taken once a message
            // is whole (or a large one starts streaming), never for a part of one, which
            // would be released at once and taken again without reading more.
            let whole =
                available >= total || (total > WHOLE_MESSAGE && !matches!(tag, b'Q' | b'P' | b'F'));
            if self.upstream.is_none() && tag != b'X' && whole {
                // Nothing was taken from `buf` yet.
                return Ok(Some(Ended::NeedUpstream));
            }
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
                if self.skipping && tag != b'S' {
                    // After a denied Parse everything up to Sync is dropped, large ones too.
                    self.flush_ready(buf, &mut ready).await?;
                    self.passthrough = total;
                    continue;
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
                        let names = names_text(names);
                        self.flush_ready(buf, &mut ready).await?;
                        self.deny_bind(names, report).await?;
                        self.passthrough = total;
                        continue;
                    }
                    if self.transaction_pool {
                        // Renamed: a new header and names, then the parameters as they come.
                        let mut fields = Fields::new(&buf[ready + HEADER_LEN..]);
                        let portal = fields.cstr().unwrap_or_default().to_string();
                        let name = fields.cstr().unwrap_or_default().to_string();
                        let head = HEADER_LEN + portal.len() + name.len() + 2;
                        self.forward_bind(buf, &mut ready, total, &portal, &name, None)
                            .await?;
                        self.unsynced = true;
                        self.passthrough = total - head;
                        continue;
                    }
                }
                if !matches!(tag, b'B' | b'd' | b'E' | b'D' | b'C') {
                    return Ok(Some(Ended::Refused(Refusal::Protocol(format!(
                        "unexpected message type '{}'",
                        tag.escape_ascii()
                    )))));
                }
                if tag != b'd' {
                    self.unsynced = true;
                }
                self.passthrough = total;
                continue;
            }
            if self.skipping && !matches!(tag, b'S' | b'X') {
                self.flush_ready(buf, &mut ready).await?;
                buf.advance(total);
                continue;
            }
            if matches!(tag, b'Q' | b'F') && self.unsynced {
                return Ok(Some(Ended::Refused(Refusal::Protocol(
                    "a simple Query or FunctionCall was sent inside an extended-protocol pipeline \
                     before its Sync; pgbastion does not relay that"
                        .into(),
                ))));
            }
            if matches!(tag, b'Q' | b'E')
                && self.ledger.lock().expect("ledger lock").executions.len() >= MAX_IN_FLIGHT
            {
                return Ok(Some(Ended::Refused(Refusal::Protocol(format!(
                    "more than {MAX_IN_FLIGHT} statements in flight without an answer"
                )))));
            }
            if matches!(tag, b'P' | b'B' | b'E' | b'D' | b'C') {
                self.unsynced = true;
            }
            let body = &buf[ready + HEADER_LEN..ready + total];
            match tag {
                b'Q' | b'P' | b'F' => match self.decide(tag, body).await {
                    Ok(()) => {
                        // Under transaction pooling, a statement that may leave session state
                        // keeps the session on its connection from now on.
                        let pin = self.transaction_pool
                            && self.last_verdict.as_ref().is_none_or(|v| v.1.session_state);
                        if pin {
                            self.ledger.lock().expect("ledger lock").releasing = false;
                        }
                        if tag == b'P' && self.transaction_pool {
                            // Decided above, so it parses; were it not to, nothing unnamed by
                            // the proxy may reach a shared connection.
                            let Ok(parse) = messages::parse_message(body) else {
                                return Ok(Some(Ended::Refused(Refusal::Protocol(
                                    "malformed Parse message".into(),
                                ))));
                            };
                            let name = parse.statement.to_string();
                            let types = &body[name.len() + parse.query.len() + 2..];
                            let definition = Definition::new(!name.is_empty(), parse.query, types);
                            self.forward_parse(buf, &mut ready, total, &name, definition)
                                .await?;
                            continue;
                        }
                        if tag != b'P' {
                            let mut ledger = self.ledger.lock().expect("ledger lock");
                            if tag == b'Q' && self.transaction_pool {
                                // A simple Query destroys the unnamed statement.
                                ledger.connection.lose_unnamed();
                            }
                            if tag == b'Q' {
                                let about = self.about_query(body);
                                let group = ledger.sent;
                                ledger
                                    .executions
                                    .push(Execution::new(group, "query", about));
                            }
                            ledger.sent += 1;
                        }
                        ready += total;
                    }
                    Err(report) => {
                        let (statement, text) = match tag {
                            b'P' => messages::parse_message(body)
                                .map(|p| (p.statement.to_string(), p.query.to_string()))
                                .unwrap_or_default(),
                            b'Q' => (
                                String::new(),
                                messages::query_text(body)
                                    .map(str::to_string)
                                    .unwrap_or_default(),
                            ),
                            _ => (String::new(), String::new()),
                        };
                        self.flush_ready(buf, &mut ready).await?;
                        buf.advance(total);
                        let kind = match tag {
                            b'Q' => "query",
                            b'P' => "parse",
                            _ => "function_call",
                        };
                        self.audit_denial(kind, &text, None, &report).await;
                        self.deny(tag, &statement, report).await?;
                    }
                },
                b'S' => {
                    self.skipping = false;
                    self.unsynced = false;
                    self.ledger.lock().expect("ledger lock").sent += 1;
                    ready += total;
                }
                b'X' => {
                    // Not forwarded: the upstream connection may serve another session.
                    self.flush_ready(buf, &mut ready).await?;
                    buf.advance(total);
                    return Ok(Some(Ended::ClientTerminated));
                }
                b'B' => match self.check_bind(body).await {
                    Ok(()) if self.transaction_pool => {
                        let mut fields = Fields::new(body);
                        let portal = fields.cstr().unwrap_or_default().to_string();
                        let name = fields.cstr().unwrap_or_default().to_string();
                        let rest = &body[portal.len() + name.len() + 2..];
                        let mut tail = BytesMut::with_capacity(rest.len());
                        tail.extend_from_slice(rest);
                        self.forward_bind(buf, &mut ready, total, &portal, &name, Some(&tail))
                            .await?;
                    }
                    Ok(()) => ready += total,
                    Err(report) => {
                        let names = names_text(body);
                        self.flush_ready(buf, &mut ready).await?;
                        buf.advance(total);
                        self.deny_bind(names, report).await?;
                    }
                },
                b'E' => {
                    let portal = statement_name(Fields::new(body).cstr().unwrap_or_default());
                    let about = match portal {
                        "" => self.unnamed_portal.clone(),
                        named => self.portals.get(named).cloned(),
                    };
                    let classes = about.as_ref().map(|a| a.classes.clone());
                    self.shared
                        .metrics
                        .statement(true, classes.as_deref().unwrap_or_default());
                    // A portal the proxy does not know (PostgreSQL will refuse it) is still
                    // recorded: every Execute leaves a record.
                    let about = self
                        .audit
                        .as_ref()
                        .map(|_| about.unwrap_or_else(|| self.unknown_portal(portal)));
                    let mut ledger = self.ledger.lock().expect("ledger lock");
                    let group = ledger.sent;
                    ledger
                        .executions
                        .push(Execution::new(group, "execute", about));
                    drop(ledger);
                    ready += total;
                }
                b'C' => {
                    let mut stand_in = false;
                    if let [kind, name @ .., 0] = body {
                        let name = String::from_utf8_lossy(name);
                        if *kind == b'P' {
                            self.portals.remove(statement_name(&name));
                        }
                        let mut ledger = self.ledger.lock().expect("ledger lock");
                        let group = ledger.sent;
                        ledger.book.close_sent(group, *kind, statement_name(&name));
                        if self.transaction_pool {
                            // A statement's upstream twin may serve other sessions: the
                            // client's Close only forgets it (a Close of no statement answers).
                            ledger.owed.close_sent(group, false);
                            if *kind == b'S' {
                                self.statements.forget(statement_name(&name));
                                stand_in = true;
                            }
                        }
                    }
                    if stand_in {
                        let mut out = BytesMut::new();
                        close_message(NO_STATEMENT, &mut out);
                        self.replace(buf, &mut ready, total, &out).await?;
                    } else {
                        ready += total;
                    }
                }
                b'D' if self.transaction_pool && body.first() == Some(&b'S') => {
                    let name = Fields::new(&body[1..])
                        .cstr()
                        .unwrap_or_default()
                        .to_string();
                    self.forward_describe(buf, &mut ready, total, &name).await?;
                }
                b'D' | b'H' | b'd' | b'c' | b'f' => ready += total,
                other => {
                    return Ok(Some(Ended::Refused(Refusal::Protocol(format!(
                        "unexpected message type '{}'",
                        other.escape_ascii()
                    )))))
                }
            }
        }
        if self.out.is_empty() {
            // Nothing rewritten: the batch goes out as it came, without a copy.
            if ready > 0 {
                self.write_now(&buf[..ready]).await?;
                buf.advance(ready);
            }
        } else {
            self.flush_ready(buf, &mut ready).await?;
        }
        Ok(None)
    }

    /// Queues the verbatim bytes `buf[..ready]` for the upstream.
    async fn flush_ready(&mut self, buf: &mut BytesMut, ready: &mut usize) -> std::io::Result<()> {
        if *ready > 0 {
            self.write(&buf[..*ready]).await?;
            buf.advance(*ready);
            *ready = 0;
        }
        Ok(())
    }

    /// Queues `bytes` for the upstream; only called while a connection is attached. A full
    /// batch is written at once, and a large message goes straight through uncopied.
    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.upstream.is_none() {
            return Err(std::io::ErrorKind::NotConnected.into());
        }
        if self.out.len() + bytes.len() > WRITE_BATCH {
            self.write_out().await?;
            if bytes.len() > WRITE_BATCH {
                return self.write_now(bytes).await;
            }
        }
        self.out.extend_from_slice(bytes);
        Ok(())
    }

    /// Writes what is queued, then flushes the upstream stream (TLS buffers records).
    async fn write_out(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            let mut out = std::mem::take(&mut self.out);
            let written = self.write_now(&out).await;
            // A large batch's buffer is not kept: thousands of idle sessions would hold it.
            if out.capacity() <= READ_BUFFER {
                out.clear();
                self.out = out;
            }
            written?;
        }
        Ok(())
    }

    async fn write_now(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.upstream {
            Some(upstream) => {
                upstream.write_all(bytes).await?;
                upstream.flush().await?;
                self.shared.forwarded();
                Ok(())
            }
            None => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    /// Relays what is ready, then `replacement` in place of the `total` bytes that follow.
    async fn replace(
        &mut self,
        buf: &mut BytesMut,
        ready: &mut usize,
        total: usize,
        replacement: &[u8],
    ) -> std::io::Result<()> {
        self.flush_ready(buf, ready).await?;
        buf.advance(total);
        self.write(replacement).await
    }

    /// After a configuration reload: the new rules of the session's policy.
    fn refresh_policy(&mut self) -> Result<(), Report> {
        let generation = self.shared.generation();
        if generation == self.generation {
            return Ok(());
        }
        let settings = self.shared.settings();
        let Some(policy) = settings.policies.get(&self.policy.name) else {
            return Err(Report::new(
                Severity::Error,
                codes::INSUFFICIENT_PRIVILEGE,
                format!(
                    "policy '{}' of this session was removed from pgbastion's configuration",
                    self.policy.name
                ),
            )
            .detail("rule: policy_removed")
            .hint("reconnect: new sessions get the policies now configured"));
        };
        self.policy = policy.clone();
        self.policy_key = format!("{}\0{}", policy.name, policy.version);
        self.generation = generation;
        Ok(())
    }

    /// One statement from the identity's rate budget.
    fn take_rate(&self) -> Result<(), Report> {
        let Some(rate) = &self.rate else {
            return Ok(());
        };
        rate.check().map_err(|limited| {
            self.shared.metrics.limited(limited.limit);
            Report::new(
                Severity::Error,
                codes::CONFIGURATION_LIMIT_EXCEEDED,
                limited.message,
            )
            .detail(format!("limit: {}", limited.limit))
            .hint("slow down, or ask for a higher limit in your policy")
        })
    }

    /// The catalog snapshot to decide with, when the policy needs one.
    async fn current_catalog(
        &mut self,
        max_age: Option<std::time::Duration>,
    ) -> Result<Option<Arc<Catalog>>, Report> {
        if !self.policy.needs_catalog() {
            return Ok(None);
        }
        let Some(access) = &self.catalog else {
            return Err(catalog_unavailable(
                "no credential for the login role".into(),
            ));
        };
        let catalog = access
            .database
            .fresh(&access.loader, max_age.unwrap_or(access.max_age))
            .await
            .map_err(catalog_unavailable)?;
        self.adopt_default_search_path(&catalog);
        Ok(Some(catalog))
    }

    /// The policy's verdict on a Query, Parse or FunctionCall; Err holds the client's error.
    async fn decide(&mut self, tag: u8, body: &[u8]) -> Result<(), Report> {
        self.last_verdict = None;
        self.last_redacted = None;
        let started = std::time::Instant::now();
        let result = self.decide_inner(tag, body).await;
        self.shared.metrics.overhead.observe(started.elapsed());
        let classes = self
            .last_verdict
            .as_ref()
            .map(|v| v.1.classes.clone())
            .unwrap_or_default();
        if tag == b'Q' || result.is_err() {
            self.shared.metrics.statement(result.is_ok(), &classes);
        }
        result
    }

    /// Under transaction pooling, whether `currval`/`lastval` now would read sequence values
    /// the session did not set: it is not pinned, and nothing it sent on the connection it
    /// holds (if any) could have set them. (A pinned session keeps its connection, as in
    /// session mode.)
    fn sequence_values_foreign(&self) -> bool {
        self.transaction_pool
            && !self.sequences_set_here
            && self.ledger.lock().expect("ledger lock").releasing
    }

    /// Notes what an allowed request may do to sequence values on the connection.
    fn note_sequences(&mut self, sets: bool) {
        self.sequences_set_here |= sets;
    }

    async fn decide_inner(&mut self, tag: u8, body: &[u8]) -> Result<(), Report> {
        self.refresh_policy()?;
        if tag != b'P' {
            self.take_rate()?;
        }
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
            .detail("rule: unreadable")
            .hint("statements must be valid UTF-8; set client_encoding to UTF8")
        })?;
        let mut catalog = self.current_catalog(None).await?;
        let (mut verdict, mut redacted) = self.decide_cached(&request, catalog.as_deref());
        if let (true, Some(current)) = (verdict.1.unknown_relations, &catalog) {
            // A relation created since the snapshot: decide again with a newer one.
            if let Ok(Some(newer)) = self.current_catalog(Some(UNKNOWN_RELATION_REFRESH)).await {
                if newer.version != current.version {
                    (verdict, redacted) = self.decide_cached(&request, Some(&newer));
                    catalog = Some(newer);
                }
            }
        }
        self.decided_with = catalog.as_ref().map_or(0, |c| c.version);
        self.last_verdict = Some(verdict.clone());
        self.last_redacted = redacted;
        let (decision, effects) = &*verdict;
        if let Decision::Deny(denial) = decision {
            return Err(denial_report(denial.clone()));
        }
        // A Query runs now; a Parse only when bound (checked in `check_bind`).
        let runs = tag == b'Q';
        if runs && effects.reads_earlier_sequence_values && self.sequence_values_foreign() {
            return Err(earlier_sequence_values());
        }
        for schema in &effects.search_path {
            self.widen_search_path(schema.clone());
        }
        // An EXECUTE of a name the proxy never approved fails upstream: nothing to decide.
        // Except under transaction pooling: a shared connection holds other sessions'
        // statements, so only the session's own (or one PREPAREd just before in the same
        // request) may run.
        let mut prepared_here = Vec::new();
        for op in &effects.prepared {
            match op {
                PreparedOp::Prepare(name) => prepared_here.push(name.clone()),
                PreparedOp::Execute(name) if !prepared_here.contains(name) => {
                    let unknown_ok = !self.transaction_pool;
                    self.redecide_nested(name, catalog.as_deref(), &mut Vec::new(), unknown_ok)?;
                }
                _ => {}
            }
        }
        self.record(&request, &verdict)?;
        if runs {
            self.note_sequences(effects.sets_sequence_values);
        }
        Ok(())
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
    fn adopt_default_search_path(&mut self, catalog: &Catalog) {
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

    fn about(
        &self,
        text: &str,
        redacted: Option<Arc<str>>,
        statement: Option<&str>,
        verdict: &Verdict,
    ) -> Arc<About> {
        Arc::new(About {
            text: text.into(),
            redacted,
            statement: statement.map(str::to_string),
            classes: verdict.1.classes.clone(),
            relations: verdict.1.relations.clone(),
            policy: self.policy.name.as_str().into(),
            policy_version: self.policy.version.as_str().into(),
            reads_earlier_sequence_values: verdict.1.reads_earlier_sequence_values,
            sets_sequence_values: verdict.1.sets_sequence_values,
        })
    }

    /// The audit's account of an Execute of a portal the proxy does not know.
    fn unknown_portal(&self, portal: &str) -> Arc<About> {
        Arc::new(About {
            text: "/* a portal pgbastion does not know */".into(),
            redacted: None,
            statement: Some(format!("portal {portal}")),
            classes: Arc::new([]),
            relations: Arc::new([]),
            policy: self.policy.name.as_str().into(),
            policy_version: self.policy.version.as_str().into(),
            reads_earlier_sequence_values: false,
            sets_sequence_values: false,
        })
    }

    /// What the audit says about an allowed Query (None when not auditing).
    fn about_query(&self, body: &[u8]) -> Option<Arc<About>> {
        self.audit.as_ref()?;
        let text = messages::query_text(body).ok()?;
        let verdict = self.last_verdict.as_ref()?;
        Some(self.about(text, self.last_redacted.clone(), None, verdict))
    }

    /// Enters an allowed request's prepared statements into the book as it is forwarded.
    fn record(&mut self, request: &Request<'_>, verdict: &Verdict) -> Result<(), Report> {
        let version = self.decided_with;
        let ops = &verdict.1.prepared;
        let recorded = match request {
            Request::Parse { statement, .. } if !name_is_acceptable(statement) => {
                Err(statement.to_string())
            }
            Request::Parse { statement, query } => {
                let name = statement_name(statement);
                let approved = Approved::new(
                    b'P',
                    version,
                    self.about(query, self.last_redacted.clone(), Some(name), verdict),
                );
                let mut ledger = self.ledger.lock().expect("ledger lock");
                let group = ledger.sent;
                let book = &mut ledger.book;
                book.parse_sent(group, name, approved.clone())
                    .map_err(|()| name.to_string())
                    .and_then(|()| {
                        // PREPARE sent as a Parse runs at Execute, if ever: a possibility only.
                        ops.iter().try_for_each(|op| match op {
                            PreparedOp::Prepare(name) => book
                                .possible(name, approved.clone())
                                .map_err(|()| name.clone()),
                            _ => Ok(()),
                        })
                    })
            }
            Request::Query(sql) => {
                let mut ledger = self.ledger.lock().expect("ledger lock");
                let group = ledger.sent;
                let book = &mut ledger.book;
                ops.iter().try_for_each(|op| match op {
                    PreparedOp::Prepare(name) if !name_is_acceptable(name) => Err(name.clone()),
                    PreparedOp::Prepare(name) => {
                        let about =
                            self.about(sql, self.last_redacted.clone(), Some(name), verdict);
                        book.prepare_sent(group, name, Approved::new(b'Q', version, about))
                            .map_err(|()| name.clone())
                    }
                    PreparedOp::Deallocate(name) => {
                        book.deallocate_sent(group, name.as_deref());
                        Ok(())
                    }
                    PreparedOp::Execute(_) => Ok(()),
                })
            }
            Request::FunctionCall { .. } => Ok(()),
        };
        recorded.map_err(|name| {
            if !name_is_acceptable(&name) {
                return Report::new(
                    Severity::Error,
                    codes::INVALID_SQL_STATEMENT_NAME,
                    format!("prepared statement name \"{name}\" is not plain ASCII"),
                )
                .detail("rule: statement_name")
                .hint("name prepared statements with ASCII characters");
            }
            Report::new(
                Severity::Error,
                codes::DUPLICATE_PREPARED_STATEMENT,
                format!("prepared statement \"{name}\" already exists or too many are prepared"),
            )
            .detail("rule: prepared_statement_in_doubt")
            .hint("close (DEALLOCATE) statements before preparing them again")
        })
    }

    /// Decides again every statement `name` may hold that was approved under another catalog
    /// snapshot or policy version: PostgreSQL plans it again against the views' current
    /// definitions, and a reloaded policy applies from the next statement. Err(26000) when
    /// the proxy approved nothing under that name.
    /// Ok holds what the name now runs (its newest candidate), for the audit and metrics.
    fn redecide(
        &mut self,
        name: &str,
        catalog: Option<&Catalog>,
    ) -> Result<Option<Arc<About>>, Report> {
        self.redecide_nested(name, catalog, &mut Vec::new(), false)
    }

    /// `redecide`, with the names being re-decided further up (statements may execute each
    /// other, also in cycles).
    fn redecide_nested(
        &mut self,
        name: &str,
        catalog: Option<&Catalog>,
        outer: &mut Vec<String>,
        unknown_ok: bool,
    ) -> Result<Option<Arc<About>>, Report> {
        if outer.iter().any(|n| n == name) {
            return Ok(None);
        }
        if outer.len() >= MAX_EXECUTE_DEPTH {
            return Err(Report::new(
                Severity::Error,
                codes::INSUFFICIENT_PRIVILEGE,
                "prepared statements execute each other too deeply for pgbastion to decide",
            )
            .detail("rule: execute_depth"));
        }
        outer.push(name.to_string());
        let version = catalog.map_or(0, |c| c.version);
        let (stale, newest): (Vec<Approved>, _) = {
            let mut ledger = self.ledger.lock().expect("ledger lock");
            let candidates = ledger.book.candidates(name);
            if candidates.is_empty() && unknown_ok {
                return Ok(None);
            }
            if candidates.is_empty() {
                return Err(Report::new(
                    Severity::Error,
                    codes::INVALID_SQL_STATEMENT_NAME,
                    format!("prepared statement \"{name}\" does not exist"),
                )
                .detail("rule: unknown_statement")
                .hint("prepare the statement before running it"));
            }
            let stale = candidates
                .iter()
                .filter(|a| a.catalog != version || *a.about.policy_version != *self.policy.version)
                .cloned()
                .collect();
            (stale, candidates.last().map(|a| a.about.clone()))
        };
        if stale.is_empty() {
            return Ok(newest);
        }
        let mut renewed = Vec::with_capacity(stale.len());
        for approved in &stale {
            let text = approved.about.text.clone();
            let request = match approved.kind {
                b'Q' => Request::Query(&text),
                _ => Request::Parse {
                    statement: name,
                    query: &text,
                },
            };
            let (verdict, redacted) = self.decide_cached(&request, catalog);
            if let Decision::Deny(denial) = &verdict.0 {
                self.last_verdict = Some(verdict.clone());
                return Err(denial_report(denial.clone()));
            }
            // `EXECUTE q` prepared as a Parse: q may have gone stale too.
            for op in &verdict.1.prepared {
                if let PreparedOp::Execute(inner) = op {
                    self.redecide_nested(inner, catalog, outer, !self.transaction_pool)?;
                }
            }
            renewed.push(self.about(&text, redacted, Some(name), &verdict));
        }
        let mut ledger = self.ledger.lock().expect("ledger lock");
        let candidates = ledger.book.candidates(name);
        for approved in candidates.iter_mut() {
            if let Some(i) = stale
                .iter()
                .position(|s| Arc::ptr_eq(&s.about, &approved.about))
            {
                approved.catalog = version;
                approved.about = renewed[i].clone();
            }
        }
        Ok(candidates.last().map(|a| a.about.clone()))
    }

    /// A Bind may only run a statement the proxy approved, under the policy and catalog in
    /// force: one approved under older ones is decided again first.
    async fn check_bind(&mut self, body: &[u8]) -> Result<(), Report> {
        let mut fields = Fields::new(body);
        let (portal, name) = match fields.cstr().and_then(|p| Ok((p, fields.cstr()?))) {
            Ok(names) => names,
            Err(_) => {
                return Err(Report::new(
                    Severity::Error,
                    codes::PROTOCOL_VIOLATION,
                    "malformed Bind message",
                )
                .detail("rule: malformed_message"))
            }
        };
        self.last_verdict = None;
        if !name_is_acceptable(portal) || !name_is_acceptable(name) {
            return Err(Report::new(
                Severity::Error,
                codes::INVALID_SQL_STATEMENT_NAME,
                "statement and portal names must be plain ASCII",
            )
            .detail("rule: statement_name"));
        }
        let (portal, name) = (statement_name(portal), statement_name(name));
        self.refresh_policy()?;
        self.take_rate()?;
        let catalog = self.current_catalog(None).await?;
        let about = self.redecide(name, catalog.as_deref())?;
        let sets = about.as_ref().is_some_and(|a| a.sets_sequence_values);
        if about
            .as_ref()
            .is_some_and(|a| a.reads_earlier_sequence_values)
            && self.sequence_values_foreign()
        {
            return Err(earlier_sequence_values());
        }
        self.note_sequences(sets);
        match portal {
            "" => self.unnamed_portal = about,
            named => {
                if self.portals.len() >= MAX_PORTALS && !self.portals.contains_key(named) {
                    // Forget one: its Execute is then recorded as of an unknown portal.
                    if let Some(old) = self.portals.keys().next().cloned() {
                        self.portals.remove(&old);
                    }
                }
                if let Some(about) = about {
                    self.portals.insert(named.to_string(), about);
                }
            }
        }
        Ok(())
    }

    /// The decision for a request, from the cache when the same statement (up to numeric
    /// literals, see `decision_key`) was decided before in the same scope. When it tokenizes
    /// the statement and the audit log wants it redacted, the redaction comes from the same
    /// pass: the audit writer need not tokenize it again.
    fn decide_cached(
        &self,
        request: &Request<'_>,
        catalog: Option<&Catalog>,
    ) -> (Verdict, Option<Arc<str>>) {
        let principal = Principal {
            user: self.user,
            role: self.role,
            policy: &self.policy,
            search_path: &self.search_path,
            catalog,
        };
        let (kind, sql) = match request {
            Request::Query(sql) => (b'Q', *sql),
            Request::Parse { query, .. } => (b'P', *query),
            Request::FunctionCall { .. } => {
                return (Arc::new(decide_with_effects(&principal, request)), None)
            }
        };
        let scope = Scope {
            kind,
            policy: &self.policy_key,
            search_path: &self.search_path,
            catalog: catalog.map_or(0, |c| c.version),
        };
        let decisions = &self.shared.decisions;
        if let Some(verdict) = decisions.get(&scope, KeyKind::Text, sql) {
            return (verdict, None);
        }
        let (key, redacted) = match self.audit.is_some() && self.shared.auditor.redacts() {
            true => match decision_key_and_redacted(sql) {
                Some((key, redacted)) => (Some(key), Some(Arc::from(redacted))),
                None => (None, None),
            },
            false => (decision_key(sql), None),
        };
        let Some(key) = key else {
            return (Arc::new(decide_with_effects(&principal, request)), None);
        };
        if let Some(verdict) = decisions.get(&scope, KeyKind::Tokens, &key) {
            // Seen before with other numbers: its numbers vary, and filing each text would
            // only churn the exact-text map.
            return (verdict, redacted);
        }
        let verdict = Arc::new(decide_with_effects(&principal, request));
        decisions.insert(&scope, KeyKind::Tokens, &key, verdict.clone());
        decisions.insert(&scope, KeyKind::Text, sql, verdict.clone());
        (verdict, redacted)
    }

    /// The audit record of a statement that was not run.
    async fn audit_denial(
        &mut self,
        kind: &'static str,
        text: &str,
        statement: Option<String>,
        report: &Report,
    ) {
        let Some(session) = &self.audit else {
            return;
        };
        let (classes, relations) = match self.last_verdict.take() {
            Some(verdict) => (verdict.1.classes.clone(), verdict.1.relations.clone()),
            None => Default::default(),
        };
        let rule = report.detail.as_deref().map(|d| {
            d.strip_prefix("rule: ")
                .or_else(|| d.strip_prefix("limit: "))
                .unwrap_or(d)
                .to_string()
        });
        let event = Event::Statement(StatementRecord {
            kind,
            text: text.into(),
            redact: true,
            statement,
            classes,
            relations,
            decision: "deny",
            policy: self.policy.name.as_str().into(),
            policy_version: self.policy.version.as_str().into(),
            rule,
            message: Some(report.message.clone()),
            status: StatementStatus::Denied,
            duration_us: 0,
            rows: None,
            sqlstate: Some(report.code.to_string()),
        });
        self.shared
            .audit(self.conn, Some(session.clone()), || event)
            .await;
    }

    /// A refused Bind: audited with the statement it named, then denied like a Parse.
    /// Transaction pooling: a client's Parse, under the statement's upstream name, or a
    /// stand-in when the connection already holds it.
    async fn forward_parse(
        &mut self,
        buf: &mut BytesMut,
        ready: &mut usize,
        total: usize,
        name: &str,
        definition: Arc<Definition>,
    ) -> std::io::Result<()> {
        self.statements
            .define(statement_name(name), definition.clone());
        let mut out = BytesMut::new();
        {
            let mut ledger = self.ledger.lock().expect("ledger lock");
            let ledger = &mut *ledger;
            let group = ledger.sent;
            if !definition.upstream.is_empty() && ledger.connection.holds(&definition.upstream) {
                close_message(NO_STATEMENT, &mut out);
                ledger.owed.close_sent(group, true);
            } else {
                out.extend_from_slice(&definition.parse);
                ledger
                    .owed
                    .parse_sent(group, false, &definition, &mut ledger.connection);
            }
        }
        self.replace(buf, ready, total, &out).await
    }

    /// Transaction pooling: the statement `name` is about to be used; the Parse that prepares
    /// it on this connection if it lacks it, and its upstream name (None: a name the session
    /// has not defined).
    fn prepare_here(&mut self, name: &str, out: &mut BytesMut) -> Option<String> {
        let mut ledger = self.ledger.lock().expect("ledger lock");
        let ledger = &mut *ledger;
        let (definition, missing) = self
            .statements
            .lookup(statement_name(name), &ledger.connection)?;
        if missing {
            out.extend_from_slice(&definition.parse);
            let group = ledger.sent;
            ledger
                .owed
                .parse_sent(group, true, &definition, &mut ledger.connection);
        }
        Some(definition.upstream.clone())
    }

    /// Transaction pooling: a Bind of `name` under its upstream name. `tail`: the rest of the
    /// message (formats and parameters) when it is whole; None when it streams after this.
    async fn forward_bind(
        &mut self,
        buf: &mut BytesMut,
        ready: &mut usize,
        total: usize,
        portal: &str,
        name: &str,
        tail: Option<&[u8]>,
    ) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        let upstream = self
            .prepare_here(name, &mut out)
            .unwrap_or_else(|| NO_STATEMENT.to_string());
        let head = HEADER_LEN + portal.len() + name.len() + 2;
        let length = 4 + portal.len() + 1 + upstream.len() + 1 + (total - head);
        out.extend_from_slice(b"B");
        out.extend_from_slice(&(length as u32).to_be_bytes());
        out.extend_from_slice(portal.as_bytes());
        out.extend_from_slice(&[0]);
        out.extend_from_slice(upstream.as_bytes());
        out.extend_from_slice(&[0]);
        match tail {
            Some(tail) => {
                out.extend_from_slice(tail);
                self.replace(buf, ready, total, &out).await
            }
            None => self.replace(buf, ready, head, &out).await,
        }
    }

    /// Transaction pooling: a Describe of statement `name` under its upstream name.
    async fn forward_describe(
        &mut self,
        buf: &mut BytesMut,
        ready: &mut usize,
        total: usize,
        name: &str,
    ) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        let upstream = self
            .prepare_here(name, &mut out)
            .unwrap_or_else(|| NO_STATEMENT.to_string());
        out.extend_from_slice(b"D");
        out.extend_from_slice(&(4 + 1 + upstream.len() as u32 + 1).to_be_bytes());
        out.extend_from_slice(b"S");
        out.extend_from_slice(upstream.as_bytes());
        out.extend_from_slice(&[0]);
        self.replace(buf, ready, total, &out).await
    }

    async fn deny_bind(&mut self, names: (String, String), report: Report) -> std::io::Result<()> {
        let (_portal, name) = names;
        self.shared.metrics.statement(false, &[]);
        let text = {
            let mut ledger = self.ledger.lock().expect("ledger lock");
            ledger
                .book
                .candidates(&name)
                .last()
                .map(|a| a.about.text.to_string())
                .unwrap_or_default()
        };
        self.audit_denial("execute", &text, Some(name), &report)
            .await;
        let sentinel = self.sentinel.to_string();
        self.deny(b'P', &sentinel, report).await
    }

    /// Sends the sentinel in place of the denied message and records the denial. A denied
    /// Parse becomes a Parse of the sentinel under the same statement name: it fails before
    /// anything is stored, so that name stays undefined upstream and other statements, the
    /// unnamed one included, are untouched.
    async fn deny(&mut self, tag: u8, statement: &str, report: Report) -> std::io::Result<()> {
        tracing::info!(policy = %self.policy.name, code = report.code, message = %report.message, "statement refused");
        let mut out = BytesMut::new();
        {
            let mut ledger = self.ledger.lock().expect("ledger lock");
            let group = ledger.sent;
            ledger.denials.push_back(PendingDenial { group, report });
            match tag {
                b'P' => {
                    if self.transaction_pool && statement.is_empty() {
                        // The failing Parse drops the unnamed statement upstream too.
                        ledger.connection.lose_unnamed();
                        self.statements.forget("");
                    }
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
        self.write(&out).await
    }
}

/// A Bind's portal and statement names, for the audit of a refused one.
fn names_text(body: &[u8]) -> (String, String) {
    let mut fields = Fields::new(body);
    let portal = fields.cstr().unwrap_or_default().to_string();
    let name = statement_name(fields.cstr().unwrap_or_default()).to_string();
    (portal, name)
}

/// The client's ErrorResponse for a denial.
fn denial_report(denial: pgbastion_policy::Denial) -> Report {
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
    .detail("rule: catalog_unavailable")
    .hint("try again shortly; if it persists, tell the pgbastion operator")
}

/// The refusal of `currval`/`lastval` under transaction pooling before the session set
/// sequence values on its connection: the values the upstream session last saw are
/// whichever client's ran there.
fn earlier_sequence_values() -> Report {
    Report::new(
        Severity::Error,
        codes::FEATURE_NOT_SUPPORTED,
        "currval() and lastval() here would read sequence values another client set: this \
         session is transaction-pooled and has set none on the connection it has now (its \
         earlier nextval() may have run on another connection)",
    )
    .detail("rule: transaction_pooling")
    .hint(
        "use INSERT ... RETURNING, or call it in a later statement of the same transaction or \
         query string as the nextval() it reads; or use session pooling for this role",
    )
}
