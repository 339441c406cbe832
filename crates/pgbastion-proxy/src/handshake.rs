//! From a new TCP connection to an authenticated session: TLS, startup checks, the token,
//! the mapping, the upstream login, and the startup messages the client expects.

use crate::limits::{ConnectionSlot, Limited};
use crate::listener::Shared;
use crate::options;
use crate::pool::AcquireError;
use crate::relay::Session;
use crate::reply::Refusal;
use bytes::BytesMut;
use pgbastion_audit::{Event, Outcome};
use pgbastion_auth::{Grant, Identity};
use pgbastion_config::PoolMode;
use pgbastion_wire::accept::{accept, AcceptSettings, FirstContact, StartupMessage, PROTOCOL_3_0};
use pgbastion_wire::frame::read_message;
use pgbastion_wire::stream::ClientStream;
use pgbastion_wire::upstream::{self, Login, UpstreamError};
use pgbastion_wire::WireError;
use pgbastion_wire::{codes, messages};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// PostgreSQL's own cap on startup packets (MAX_STARTUP_PACKET_LENGTH).
const MAX_STARTUP_PACKET: usize = 10_000;
/// How long a connection over `max_client_connections` may take to send its startup packet
/// (to be refused with 53300): it holds a socket and a task, uncounted, meanwhile.
const OVER_LIMIT_STARTUP: std::time::Duration = std::time::Duration::from_secs(2);

type Refused = (Option<ClientStream>, Refusal);

pub(crate) async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, conn: u64) {
    // Request/response traffic: Nagle's algorithm would delay every small reply.
    let _ = tcp.set_nodelay(true);
    let metrics = &shared.metrics;
    metrics.connections_total.fetch_add(1, Ordering::Relaxed);
    metrics.connections_active.fetch_add(1, Ordering::Relaxed);
    let max = shared.settings().config.limits.max_client_connections;
    let slot = shared.limits.connection(max);
    match handshake(&shared, tcp, peer, conn, slot).await {
        Ok(Some(session)) => session.run().await,
        Ok(None) => {}
        Err((stream, refusal)) => {
            tracing::info!(reason = refusal.reason(), detail = ?refusal, "connection refused");
            if let Some(mut stream) = stream {
                let mut out = BytesMut::new();
                refusal.encode(&mut out);
                let _ = stream.write_all(&out).await;
                let _ = stream.shutdown().await;
            }
        }
    }
    metrics.connections_active.fetch_sub(1, Ordering::Relaxed);
}

/// A refused authentication: counted and audited.
async fn refused(
    shared: &Shared,
    conn: u64,
    audit: &AuthAudit<'_>,
    identity: Option<&Identity>,
    grant: Option<&Grant>,
    refusal: Refusal,
) -> Refusal {
    shared.metrics.auth_failure(refusal.reason());
    shared
        .audit(conn, None, || audit.event(identity, grant, Some(&refusal)))
        .await;
    refusal
}

/// What the audit log says about a refused or accepted authentication.
struct AuthAudit<'a> {
    peer: SocketAddr,
    tls: Option<&'a str>,
    user: &'a str,
    database: &'a str,
    application_name: Option<&'a str>,
}

impl AuthAudit<'_> {
    fn event(
        &self,
        identity: Option<&Identity>,
        grant: Option<&Grant>,
        refusal: Option<&Refusal>,
    ) -> Event {
        Event::Authentication {
            outcome: match refusal {
                None => Outcome::Success,
                Some(_) => Outcome::Failure,
            },
            peer: self.peer.to_string(),
            tls: self.tls.map(str::to_string),
            user: self.user.to_string(),
            database: self.database.to_string(),
            application_name: self.application_name.map(str::to_string),
            issuer: identity.map(|i| i.issuer.clone()),
            subject: identity.map(|i| i.subject.clone()),
            groups: identity.map(|i| i.groups.clone()).unwrap_or_default(),
            role: grant.map(|g| g.role.clone()),
            policy: grant.map(|g| g.policy.clone()),
            reason: refusal.map(|r| match r {
                Refusal::Auth(err) => err.to_string(),
                Refusal::Mapping(err) => err.to_string(),
                Refusal::Limited(limited) => limited.message.clone(),
                other => other.reason().to_string(),
            }),
            sqlstate: refusal.map(|r| {
                let mut out = BytesMut::new();
                r.encode(&mut out);
                let fields = pgbastion_wire::messages::error_fields(&out[5..]).unwrap_or_default();
                pgbastion_wire::messages::error_field(&fields, b'C')
                    .unwrap_or_default()
                    .to_string()
            }),
        }
    }
}

async fn handshake(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    conn: u64,
    slot: Result<ConnectionSlot, Limited>,
) -> Result<Option<Session>, Refused> {
    // Read before the settings: a reload in between is then picked up by the session.
    let generation = shared.generation();
    let settings = shared.settings();
    // One deadline from accept to the password: a client trickling bytes holds its place for
    // auth_timeout at most. A connection over the limit only gets long enough to be told so.
    // (A timeout too large to add means no deadline to speak of: a year.)
    let deadline = Instant::now()
        .checked_add(settings.config.client.auth_timeout)
        .unwrap_or_else(|| Instant::now() + std::time::Duration::from_secs(365 * 86_400));
    let accept_deadline = match &slot {
        Ok(_) => deadline,
        Err(_) => deadline.min(Instant::now() + OVER_LIMIT_STARTUP),
    };
    let accept_settings = AcceptSettings {
        tls: settings.client_tls.clone(),
        max_startup_packet: MAX_STARTUP_PACKET,
    };
    let first = tokio::time::timeout_at(accept_deadline, accept(tcp, &accept_settings))
        .await
        .map_err(|_| {
            (
                None,
                Refusal::Protocol("timed out waiting for the startup packet".into()),
            )
        })?
        .map_err(|err| {
            let refusal = match &err.error {
                WireError::Protocol(message)
                    if message.starts_with("unsupported frontend protocol") =>
                {
                    Refusal::UnsupportedProtocol(message.clone())
                }
                _ => Refusal::from(err.error),
            };
            (err.stream, refusal)
        })?;
    let (mut stream, startup) = match first {
        FirstContact::Cancel { pid, secret } => {
            forward_cancel(shared, pid, secret).await;
            return Ok(None);
        }
        FirstContact::Startup { stream, startup } => (stream, startup),
    };
    let tls = stream.tls_version();
    shared
        .audit(conn, None, || Event::Connection {
            peer: peer.to_string(),
            tls: tls.map(str::to_string),
        })
        .await;
    let slot = match slot {
        Ok(slot) => slot,
        Err(limited) => {
            shared.metrics.limited(limited.limit);
            shared
                .audit(conn, None, || Event::Limit {
                    limit: limited.limit.to_string(),
                    message: limited.message.clone(),
                    sqlstate: codes::TOO_MANY_CONNECTIONS.to_string(),
                })
                .await;
            return Err((Some(stream), Refusal::Limited(limited)));
        }
    };
    if !stream.is_tls() && !settings.config.listen.allow_plaintext {
        return Err((Some(stream), Refusal::PlaintextNotAllowed));
    }
    let Some(user) = startup.get("user").map(str::to_string) else {
        return Err((Some(stream), Refusal::NoUser));
    };
    let database = startup
        .get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .to_string();
    let mut parameters = match options::filter(&startup.parameters, &settings.startup_parameters) {
        Ok(parameters) => parameters,
        Err(message) => return Err((Some(stream), Refusal::StartupParameter(message))),
    };
    let mut out = BytesMut::new();
    negotiate_version(&startup, &mut out);
    messages::auth_cleartext_password(&mut out);
    let token = match tokio::time::timeout_at(
        deadline,
        request_password(&mut stream, &out, settings.config.client.max_password_bytes),
    )
    .await
    {
        Ok(Ok(token)) => token,
        Ok(Err(WireError::Closed)) => {
            // psql first connects without a password, then asks for one and reconnects.
            tracing::debug!("client closed the connection at the password prompt");
            return Ok(None);
        }
        Ok(Err(err)) => return Err((Some(stream), Refusal::from(err))),
        Err(_) => {
            return Err((
                Some(stream),
                Refusal::Protocol("timed out waiting for the password (access token)".into()),
            ))
        }
    };
    let application_name = startup.get("application_name").map(str::to_string);
    let audit = AuthAudit {
        peer,
        tls,
        user: &user,
        database: &database,
        application_name: application_name.as_deref(),
    };
    if let Err(limited) = shared.limits.may_authenticate(peer.ip()) {
        shared.metrics.limited(limited.limit);
        let refusal = refused(shared, conn, &audit, None, None, Refusal::Limited(limited)).await;
        return Err((Some(stream), refusal));
    }
    let identity = match shared.verifier.verify(&token, &user).await {
        Ok(identity) => identity,
        Err(err) => {
            // Counted against the client only when the token is at fault, not when the
            // issuer's keys could not be had.
            if !err.issuer_at_fault() {
                shared.limits.authentication_failed(peer.ip());
            }
            let refusal = refused(shared, conn, &audit, None, None, Refusal::Auth(err)).await;
            return Err((Some(stream), refusal));
        }
    };
    drop(token);
    let grant = match settings.mapper.map(&identity, &database) {
        Ok(grant) => grant,
        Err(err) => {
            let refusal = refused(
                shared,
                conn,
                &audit,
                Some(&identity),
                None,
                Refusal::Mapping(err),
            )
            .await;
            return Err((Some(stream), refusal));
        }
    };
    let (Some(policy), Some(policy_config)) = (
        settings.policies.get(&grant.policy).cloned(),
        settings.config.policies.get(&grant.policy),
    ) else {
        tracing::error!(policy = %grant.policy, "mapping names an undefined policy");
        return Err((Some(stream), Refusal::Internal { conn }));
    };
    let session_slot =
        match shared
            .limits
            .session(&identity.issuer, &identity.user, &policy_config.limits)
        {
            Ok(slot) => slot,
            Err(limited) => {
                shared.metrics.limited(limited.limit);
                let refusal = refused(
                    shared,
                    conn,
                    &audit,
                    Some(&identity),
                    Some(&grant),
                    Refusal::Limited(limited),
                )
                .await;
                return Err((Some(stream), refusal));
            }
        };
    let statement_rate =
        shared
            .limits
            .statement_rate(&identity.issuer, &identity.user, &policy_config.limits);
    if policy.read_only() {
        // Defence in depth: PostgreSQL itself refuses writes in a read-only session.
        parameters.retain(|(name, _)| !name.eq_ignore_ascii_case("default_transaction_read_only"));
        parameters.push(("default_transaction_read_only".into(), "on".into()));
    }
    let search_path = options::search_path(&parameters, &grant.role);
    // Who pgbastion logs in as: the mapped role itself, or in gateway mode the gateway role,
    // which becomes the mapped role through startup parameters.
    let login_role = match &settings.gateway {
        Some(gateway) => {
            match crate::gateway::session_parameters(&identity, &grant) {
                Ok(identity_parameters) => parameters.extend(identity_parameters),
                Err(refusal) => return Err((Some(stream), refusal)),
            }
            gateway
        }
        None => &grant.role,
    };
    let Some(password) = settings.role_passwords.get(login_role) else {
        tracing::error!(role = %login_role, "no credential for the upstream login role");
        return Err((Some(stream), Refusal::Internal { conn }));
    };
    let login = Login {
        user: login_role,
        password: password.expose(),
        database: &database,
        parameters: &parameters,
    };
    let (mode, _) = settings.config.pool.for_role(login_role);
    let target = shared.pools.target(login);
    // A transaction-pooled client starts without a connection when the pool already knows
    // what the server reports to a session with its parameters.
    let known = match mode {
        PoolMode::Transaction => shared
            .pools
            .known_statuses(login_role, &database, &parameters),
        PoolMode::Session => None,
    };
    let acquired = match known {
        Some(startup) => Ok(Startup::Known(startup)),
        None => shared
            .pools
            .acquire(&target, &settings, login, generation, &shared.metrics)
            .await
            .map(Startup::Connected),
    };
    let upstream = match acquired {
        Ok(upstream) => upstream,
        Err(error) => {
            let refusal = match error {
                AcquireError::Exhausted { max, waited } => Refusal::PoolExhausted {
                    role: login_role.to_string(),
                    database: database.clone(),
                    max,
                    waited,
                },
                AcquireError::Upstream(error) => {
                    tracing::warn!(role = %login_role, error = %error, "upstream login failed");
                    match (&settings.gateway, &error) {
                        (Some(gateway), UpstreamError::Refused { sqlstate, .. })
                            if sqlstate == codes::INSUFFICIENT_PRIVILEGE =>
                        {
                            Refusal::GatewayRole {
                                gateway: gateway.clone(),
                                role: grant.role.clone(),
                            }
                        }
                        _ => Refusal::Upstream {
                            role: login_role.to_string(),
                            error,
                        },
                    }
                }
            };
            shared
                .audit(conn, None, || {
                    audit.event(Some(&identity), Some(&grant), Some(&refusal))
                })
                .await;
            return Err((Some(stream), refusal));
        }
    };
    tracing::info!(
        user = %identity.user,
        subject = %identity.subject,
        issuer = %identity.issuer,
        rule = %grant.rule,
        role = %grant.role,
        database = %database,
        tls = stream.tls_version().unwrap_or("none"),
        upstream_pid = upstream.key().map(|(pid, _)| pid),
        reused = !matches!(&upstream, Startup::Connected(c) if !c.reused),
        "session started"
    );
    shared
        .audit(conn, None, || {
            audit.event(Some(&identity), Some(&grant), None)
        })
        .await;
    // Who the session is, for its audit records (nothing to build with the audit log off).
    let session_json: Arc<str> = match shared.auditor.enabled() {
        false => Arc::from(""),
        true => pgbastion_audit::Session {
            user: &identity.user,
            subject: &identity.subject,
            issuer: &identity.issuer,
            groups: &identity.groups,
            role: &grant.role,
            database: &database,
            application_name: application_name.as_deref(),
        }
        .json(),
    };
    let login_role = login_role.to_string();
    // Under transaction pooling the login's connection goes back to the pool below: a cancel
    // request must not find it.
    let cancel = shared.cancels.register(
        match mode {
            PoolMode::Session => upstream.key(),
            _ => None,
        },
        settings.upstream.clone(),
    );
    let mut out = BytesMut::with_capacity(512);
    messages::auth_ok(&mut out);
    // The upstream's real ParameterStatus values (server_version, session_authorization, ...)
    // and any startup notices, exactly as sent.
    out.extend_from_slice(&upstream.startup());
    messages::backend_key_data(cancel.pid, cancel.secret, &mut out);
    messages::ready_for_query(b'I', &mut out);
    if let Err(err) = stream.write_all(&out).await {
        tracing::debug!(error = %err, "client went away during startup");
        // Nothing was sent upstream yet: the connection goes back as it came.
        if let Startup::Connected(checkout) = upstream {
            crate::pool::Pools::give_back(checkout.stream, checkout.lease, true, shared.clone());
        }
        return Ok(None);
    }
    let upstream = match (mode, upstream) {
        (PoolMode::Session, Startup::Connected(checkout)) => {
            Some((checkout.stream, checkout.lease))
        }
        (_, Startup::Connected(checkout)) => {
            // Taken for the login's ParameterStatus values; each transaction takes its own.
            crate::pool::Pools::release(checkout.stream, checkout.lease, shared);
            None
        }
        (_, Startup::Known(_)) => None,
    };
    Ok(Some(Session {
        client: stream,
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
        shared: shared.clone(),
        conn,
        session_json,
        statement_rate,
        slots: (slot, session_slot),
        generation,
    }))
}

/// What a session starts with: a connection, or (transaction pooling) only what the server
/// reports at startup.
enum Startup {
    Connected(crate::pool::Checkout),
    Known(BytesMut),
}

impl Startup {
    /// The upstream BackendKeyData, for cancels.
    fn key(&self) -> Option<(i32, i32)> {
        match self {
            Startup::Connected(checkout) => Some((checkout.lease.pid, checkout.lease.secret)),
            Startup::Known(_) => None,
        }
    }

    fn startup(&self) -> BytesMut {
        match self {
            Startup::Connected(checkout) => checkout.startup_messages(),
            Startup::Known(startup) => startup.clone(),
        }
    }
}

/// A newer protocol minor version or `_pq_.` options: say what we speak (3.0) and continue.
fn negotiate_version(startup: &StartupMessage, out: &mut BytesMut) {
    let unknown: Vec<String> = startup
        .parameters
        .iter()
        .filter(|(name, _)| name.starts_with("_pq_."))
        .map(|(name, _)| name.clone())
        .collect();
    if startup.minor > 0 || !unknown.is_empty() {
        messages::negotiate_protocol_version(PROTOCOL_3_0, unknown, out);
    }
}

async fn request_password(
    stream: &mut ClientStream,
    request: &[u8],
    max: usize,
) -> Result<String, WireError> {
    stream.write_all(request).await?;
    let (tag, body) = read_message(stream, "password message", max).await?;
    if tag != b'p' {
        return Err(WireError::protocol(format!(
            "expected a password message, got message type '{}'",
            tag.escape_ascii()
        )));
    }
    messages::password(&body).map(str::to_string)
}

async fn forward_cancel(shared: &Shared, pid: i32, secret: i32) {
    match shared.cancels.lookup(pid, secret) {
        Some((forward, in_flight)) => {
            let mut result = upstream::cancel(&forward.target, forward.pid, forward.secret).await;
            if result.is_err() && in_flight.asked_again() {
                // The client asked again meanwhile: one more try for it.
                result = upstream::cancel(&forward.target, forward.pid, forward.secret).await;
            }
            match result {
                Err(err) => tracing::warn!(error = %err, "forwarding a cancel request failed"),
                Ok(()) => tracing::info!(pid, "cancel request forwarded upstream"),
            }
        }
        None => tracing::info!(
            pid,
            "cancel request ignored: unknown key, nothing running, or one already on its way \
             (tried again if that one fails)"
        ),
    }
}
