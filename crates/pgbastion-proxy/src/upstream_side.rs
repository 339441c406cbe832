//! Upstream to client: the upstream's messages relayed as they are, except the errors of
//! denial sentinels (replaced by the denial) and our own messages between whole messages:
//! the token-expiry warning, and the FATAL that ends a session (expiry, shutdown).

use crate::executions::Finished;
use crate::listener::Shared;
use crate::relay::{Ended, Ledger, READ_BUFFER, WHOLE_MESSAGE};
use crate::reply::Refusal;
use bytes::{Buf, BytesMut};
use pgbastion_config::OnTokenExpiry;
use pgbastion_wire::codes;
use pgbastion_wire::frame::{header, HEADER_LEN};
use pgbastion_wire::messages::{self, Report, Severity};
use pgbastion_wire::stream::{ClientStream, UpstreamStream};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

pub(crate) struct UpstreamToClient<'a> {
    shared: &'a Shared,
    /// None between transactions of a transaction-pooled session.
    upstream: Option<ReadHalf<UpstreamStream>>,
    client: &'a mut WriteHalf<ClientStream>,
    ledger: &'a Mutex<Ledger>,
    sentinel: &'a str,
    passthrough: usize,
    expiry: Expiry,
    terminate: watch::Receiver<bool>,
    conn: u64,
    session_json: Arc<str>,
    /// Bytes read and not yet relayed.
    buf: BytesMut,
    /// Our own message (the expiry warning) not yet written whole.
    own: BytesMut,
    /// Inside `process`: when the relay stops there, the stream is mid-message.
    processing: bool,
    /// The expiry timer, created once for the session (`run` is entered again after each
    /// transaction under transaction pooling): due at the warning, then at the end. One timer
    /// rather than two: every wake-up of the relay polls it.
    alarm: Pin<Box<Sleep>>,
    warn_fired: bool,
    end_fired: bool,
    /// Completed executions, reported after each batch.
    pub finished: Vec<Finished>,
    /// Bytes relayed to the client.
    pub bytes: u64,
}

impl<'a> UpstreamToClient<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shared: &'a Shared,
        upstream: Option<ReadHalf<UpstreamStream>>,
        client: &'a mut WriteHalf<ClientStream>,
        ledger: &'a Mutex<Ledger>,
        sentinel: &'a str,
        expiry: Expiry,
        conn: u64,
        session_json: Arc<str>,
    ) -> Self {
        let alarm = Box::pin(tokio::time::sleep_until(
            expiry.warn_at.or(expiry.end_at).unwrap_or_else(far_future),
        ));
        let (warn_fired, end_fired) = (expiry.warn_at.is_none(), expiry.end_at.is_none());
        UpstreamToClient {
            shared,
            upstream,
            client,
            ledger,
            sentinel,
            passthrough: 0,
            expiry,
            terminate: shared.terminate.clone(),
            conn,
            session_json,
            // Allocated at the first read: a transaction-pooled session spends most of its
            // life without a connection.
            buf: BytesMut::new(),
            own: BytesMut::new(),
            processing: false,
            alarm,
            warn_fired,
            end_fired,
            finished: Vec::new(),
            bytes: 0,
        }
    }

    /// The upstream stream's read half, if the relay stopped between whole messages with
    /// nothing unread: then the connection can serve another session.
    pub fn into_idle_upstream(mut self) -> Option<ReadHalf<UpstreamStream>> {
        match !self.processing && self.passthrough == 0 && self.buf.is_empty() {
            true => self.upstream.take(),
            false => None,
        }
    }

    /// Starts relaying from a connection (transaction pooling).
    pub fn attach(&mut self, upstream: ReadHalf<UpstreamStream>) {
        self.upstream = Some(upstream);
    }

    /// Gives the connection back after a release: nothing of it is unread.
    pub fn detach(&mut self) -> Option<ReadHalf<UpstreamStream>> {
        self.upstream.take()
    }

    /// Writes our own pending message. Cancel-safe: what was written is taken off `own`, so
    /// when the relay stops in between (a transaction-pooled session releasing its
    /// connection), the next `run` finishes the message before anything else.
    async fn write_own(&mut self) -> std::io::Result<()> {
        if self.own.is_empty() {
            return Ok(());
        }
        while !self.own.is_empty() {
            if self.client.write_buf(&mut self.own).await? == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
        }
        self.client.flush().await
    }

    pub async fn run(&mut self) -> Ended {
        if self.write_own().await.is_err() {
            return Ended::ClientGone;
        }
        let mut terminating = *self.terminate.borrow();
        loop {
            tokio::select! {
                read = read_some(self.upstream.as_mut(), &mut self.buf) => {
                    match read {
                        Ok(0) | Err(_) => return Ended::UpstreamClosed,
                        Ok(n) => self.bytes += n as u64,
                    }
                    self.processing = true;
                    let mut buf = std::mem::take(&mut self.buf);
                    let processed = self.process(&mut buf).await;
                    self.buf = buf;
                    self.processing = false;
                    match processed {
                        Ok(None) => {}
                        Ok(Some(ended)) => return ended,
                        Err(_) => return Ended::ClientGone,
                    }
                }
                _ = &mut self.alarm, if !(self.warn_fired && self.end_fired) => {
                    if !self.warn_fired {
                        self.warn_fired = true;
                        self.expiry.warning_due = true;
                        if let Some(end) = self.expiry.end_at.filter(|_| !self.end_fired) {
                            self.alarm.as_mut().reset(end);
                        }
                    } else {
                        self.end_fired = true;
                        self.expiry.expired = true;
                    }
                }
                changed = self.terminate.changed(), if !terminating => {
                    terminating = changed.is_err() || *self.terminate.borrow();
                }
            }
            // Our own messages go out only between whole messages of the upstream's.
            if self.passthrough == 0 {
                if terminating {
                    return Ended::Refused(Refusal::Shutdown);
                }
                if self.expiry.expired {
                    return Ended::Refused(Refusal::TokenExpired);
                }
                if self.expiry.warning_due {
                    self.expiry.warning_due = false;
                    Report::new(
                        Severity::Warning,
                        codes::WARNING,
                        format!(
                            "the access token of this session expires at {}; the session will then end",
                            humantime::format_rfc3339_seconds(self.expiry.expires_at)
                        ),
                    )
                    .hint("reconnect with a fresh access token before then")
                    .encode(&mut self.own);
                    if self.write_own().await.is_err() {
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
        let (mut pending, releasing) = {
            let mut ledger = self.ledger.lock().expect("ledger lock");
            ledger.upstream_between = false;
            (!ledger.denials.is_empty(), ledger.releasing)
        };
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
            let inspect = matches!(tag, b'Z' | b'1' | b'3' | b'C' | b'I' | b's' | b'G')
                || (tag == b'E' && total <= WHOLE_MESSAGE);
            if available < total {
                if inspect || total <= WHOLE_MESSAGE {
                    buf.reserve(total - available);
                    break;
                }
                if tag == b'E' {
                    // A huge error (a value in its message): relayed as it streams; sentinel
                    // errors are small, so only the bookkeeping is needed.
                    let mut ledger = self.ledger.lock().expect("ledger lock");
                    ledger.book.error();
                    let group = ledger.ready;
                    ledger.executions.error(group, "", &mut self.finished);
                }
                self.passthrough = total;
                continue;
            }
            let body = &buf[ready + HEADER_LEN..ready + total];
            match tag {
                b'Z' => {
                    let mut ledger = self.ledger.lock().expect("ledger lock");
                    let group = ledger.ready;
                    ledger.status = body.first().copied().unwrap_or(b'E');
                    let ledger = &mut *ledger;
                    ledger.owed.ready(group, &mut ledger.connection);
                    // A denial whose sentinel was skipped (an earlier error in the same
                    // pipeline) ends here unanswered, as a skipped message would.
                    while ledger.denials.front().is_some_and(|d| d.group <= group) {
                        ledger.denials.pop_front();
                    }
                    ledger.book.ready(group);
                    ledger.executions.ready(group, &mut self.finished);
                    ledger.ready += 1;
                    ready += total;
                }
                b'1' => {
                    let injected = {
                        let mut ledger = self.ledger.lock().expect("ledger lock");
                        let injected = ledger.owed.parse_complete();
                        if !injected {
                            ledger.book.parse_complete();
                        }
                        injected
                    };
                    if injected {
                        // A Parse the proxy injected (transaction pooling): not the client's.
                        self.replace(buf, &mut ready, total, &[]).await?;
                    } else {
                        ready += total;
                    }
                }
                b'3' => {
                    let stand_in = {
                        let mut ledger = self.ledger.lock().expect("ledger lock");
                        let stand_in = ledger.owed.close_complete();
                        match stand_in {
                            true => ledger.book.parse_complete(),
                            false => ledger.book.close_complete(),
                        }
                        stand_in
                    };
                    if stand_in {
                        // The stand-in for a Parse of a statement the connection held.
                        self.replace(buf, &mut ready, total, &[b'1', 0, 0, 0, 4])
                            .await?;
                    } else {
                        ready += total;
                    }
                }
                b'C' => {
                    let mut ledger = self.ledger.lock().expect("ledger lock");
                    let group = ledger.ready;
                    if matches!(body, b"DISCARD ALL\0" | b"DEALLOCATE ALL\0") {
                        // The connection's prepared statements are gone, the proxy's too:
                        // they are prepared again when next bound.
                        ledger.connection.clear();
                    }
                    ledger
                        .executions
                        .command_complete(group, body, &mut self.finished);
                    ready += total;
                }
                b'G' => {
                    // COPY FROM STDIN started by an Execute: PostgreSQL ignores the Syncs the
                    // client sends until the copy ends, so ReadyForQuery messages may no
                    // longer pair with what was sent. The book then only ever grows.
                    let mut ledger = self.ledger.lock().expect("ledger lock");
                    let group = ledger.ready;
                    if ledger.executions.front_kind(group) == Some("execute") {
                        ledger.book.uncertain();
                        // Answers no longer pair with what was sent, so the proxy's own
                        // Parse and Close answers (transaction pooling) cannot be told
                        // apart either: the session keeps this connection to its end.
                        ledger.releasing = false;
                    }
                    ready += total;
                }
                b'I' | b's' => {
                    let mut ledger = self.ledger.lock().expect("ledger lock");
                    let group = ledger.ready;
                    ledger.executions.execute_done(group, &mut self.finished);
                    ready += total;
                }
                b'E' => {
                    let fields = messages::error_fields(body).unwrap_or_default();
                    let sqlstate = messages::error_field(&fields, b'C').unwrap_or_default();
                    let is_sentinel = pending
                        && sqlstate == codes::SYNTAX_ERROR
                        && messages::error_field(&fields, b'M')
                            .is_some_and(|m| m.contains(self.sentinel));
                    let replacement = {
                        let mut ledger = self.ledger.lock().expect("ledger lock");
                        ledger.book.error();
                        if is_sentinel {
                            let denial = ledger.denials.pop_front();
                            pending = !ledger.denials.is_empty();
                            denial
                        } else {
                            let group = ledger.ready;
                            ledger.executions.error(group, sqlstate, &mut self.finished);
                            None
                        }
                    };
                    match replacement {
                        Some(denial) => {
                            let mut out = BytesMut::new();
                            denial.report.encode(&mut out);
                            self.replace(buf, &mut ready, total, &out).await?;
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
        self.shared.forwarded();
        self.report_finished().await;
        if releasing {
            let mut ledger = self.ledger.lock().expect("ledger lock");
            ledger.upstream_between = buf.is_empty() && self.passthrough == 0;
            if ledger.releasable() {
                return Ok(Some(Ended::Release));
            }
        }
        Ok(None)
    }

    /// Relays what is ready, then `replacement` in place of the `total` bytes that follow.
    async fn replace(
        &mut self,
        buf: &mut BytesMut,
        ready: &mut usize,
        total: usize,
        replacement: &[u8],
    ) -> std::io::Result<()> {
        if *ready > 0 {
            self.client.write_all(&buf[..*ready]).await?;
            buf.advance(*ready);
            *ready = 0;
        }
        buf.advance(total);
        if !replacement.is_empty() {
            self.client.write_all(replacement).await?;
        }
        Ok(())
    }

    /// Latency metrics and audit records of the executions completed in this batch.
    pub async fn report_finished(&mut self) {
        if self.finished.is_empty() {
            return;
        }
        for finished in std::mem::take(&mut self.finished) {
            let execution = &finished.execution;
            self.shared
                .metrics
                .statement_latency
                .observe(finished.ended.duration_since(execution.started));
            if let Some(event) = execution.event(finished.ended) {
                self.shared
                    .audit(self.conn, Some(self.session_json.clone()), || event)
                    .await;
            }
        }
    }
}

/// When to warn about and end a session whose token expires.
pub(crate) struct Expiry {
    expires_at: SystemTime,
    warn_at: Option<Instant>,
    end_at: Option<Instant>,
    warning_due: bool,
    expired: bool,
}

impl Expiry {
    pub fn new(
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

/// Reads from the upstream; with no connection attached, waits forever (the other branches
/// of the caller's select still run).
async fn read_some(
    upstream: Option<&mut ReadHalf<UpstreamStream>>,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    match upstream {
        Some(upstream) => {
            if buf.capacity() - buf.len() < READ_BUFFER / 4 {
                buf.reserve(READ_BUFFER);
            }
            upstream.read_buf(buf).await
        }
        None => std::future::pending().await,
    }
}

/// A deadline for a timer that is never polled (its branch is disabled).
fn far_future() -> Instant {
    Instant::now() + std::time::Duration::from_secs(86_400 * 365)
}
