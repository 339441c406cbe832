//! Logging in upstream as the mapped role: TCP, optional TLS, StartupMessage with the
//! client's allowed parameters, then the authentication `upstream.auth_methods` allows
//! (SCRAM-SHA-256 by default, at least 4,096 iterations); any other method, or
//! AuthenticationOk unasked without `trust`, ends the login before a credential is sent.
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP>

use crate::accept::has_pending_bytes;
use crate::frame::{read_exact_or_closed, read_message, Fields};
use crate::messages::{error_field, error_fields, raw};
use crate::scram;
use crate::stream::{MaybeTls, UpstreamStream};
use crate::tls::UpstreamTlsMode;
use crate::WireError;
use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::SCRAM_SHA_256;
use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use std::io;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Where the upstream PostgreSQL is and how to reach it.
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    pub host: String,
    pub port: u16,
    pub tls: UpstreamTlsMode,
    pub connect_timeout: Duration,
    pub auth_methods: AuthMethods,
}

/// The authentication methods pgbastion answers when it logs in (`upstream.auth_methods`).
/// An upstream asking for another gets no credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthMethods {
    pub scram_sha_256: bool,
    pub md5: bool,
    pub password: bool,
    /// AuthenticationOk with no authentication asked for.
    pub trust: bool,
}

impl AuthMethods {
    /// `upstream.auth_methods`' default.
    pub const SCRAM_ONLY: AuthMethods = AuthMethods {
        scram_sha_256: true,
        md5: false,
        password: false,
        trust: false,
    };

    /// Refuses `method` unless it is allowed, with what to do about it.
    fn allow(&self, allowed: bool, method: &str, asks: &str) -> Result<(), UpstreamError> {
        if allowed {
            return Ok(());
        }
        let listed: Vec<&str> = [
            (self.scram_sha_256, "scram-sha-256"),
            (self.md5, "md5"),
            (self.password, "password"),
            (self.trust, "trust"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        let remedy = match method {
            "scram-sha-256" => String::new(),
            "trust" => "require scram-sha-256 for this role in pg_hba.conf, or ".into(),
            _ => "store the role's password as SCRAM upstream (password_encryption = \
                  'scram-sha-256', then ALTER ROLE ... PASSWORD) with scram-sha-256 in \
                  pg_hba.conf, or "
                .into(),
        };
        Err(UpstreamError::MethodNotAllowed(format!(
            "upstream {asks}, which upstream.auth_methods does not allow (it lists {}); \
             pgbastion sent no credential: {remedy}add \"{method}\" to upstream.auth_methods",
            listed.join(", ")
        )))
    }
}

impl UpstreamTarget {
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Who to log in as. `parameters` are extra startup parameters (application_name, ...).
#[derive(Debug, Clone, Copy)]
pub struct Login<'a> {
    pub user: &'a str,
    pub password: &'a str,
    pub database: &'a str,
    pub parameters: &'a [(String, String)],
}

/// A logged-in upstream connection, ready for queries.
#[derive(Debug)]
pub struct UpstreamConnection {
    pub stream: UpstreamStream,
    /// ParameterStatus and NoticeResponse messages from the login, as sent, to relay to the client.
    pub relay: BytesMut,
    pub pid: i32,
    pub secret: i32,
    /// Transaction status from the first ReadyForQuery.
    pub status: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream PostgreSQL at {address} is unreachable: {source}")]
    Unreachable { address: String, source: io::Error },
    #[error("upstream PostgreSQL at {address} did not answer within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
    #[error("TLS with upstream PostgreSQL failed: {0}")]
    Tls(String),
    /// The upstream answered with an ErrorResponse (to the login, or to a query the pool
    /// runs itself).
    #[error("upstream PostgreSQL refused: {message}")]
    Refused {
        sqlstate: String,
        message: String,
        /// The ErrorResponse as sent.
        response: BytesMut,
    },
    #[error("authentication with upstream PostgreSQL failed: {0}")]
    Auth(String),
    /// The upstream asked for an authentication method `upstream.auth_methods` leaves out.
    #[error("authentication with upstream PostgreSQL refused: {0}")]
    MethodNotAllowed(String),
    #[error("upstream PostgreSQL: {0}")]
    Wire(#[from] WireError),
}

/// Largest message accepted from the upstream during login (ParameterStatus, notices, errors).
const MAX_LOGIN_MESSAGE: usize = 1024 * 1024;

pub async fn connect(
    target: &UpstreamTarget,
    login: Login<'_>,
) -> Result<UpstreamConnection, UpstreamError> {
    let timeout = target.connect_timeout;
    tokio::time::timeout(timeout, connect_inner(target, login))
        .await
        .unwrap_or_else(|_| {
            Err(UpstreamError::Timeout {
                address: target.address(),
                timeout,
            })
        })
}

async fn connect_inner(
    target: &UpstreamTarget,
    login: Login<'_>,
) -> Result<UpstreamConnection, UpstreamError> {
    let mut stream = open(target).await?;
    let mut out = BytesMut::new();
    let mut parameters: Vec<(&str, &str)> =
        vec![("user", login.user), ("database", login.database)];
    parameters.extend(
        login
            .parameters
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    frontend::startup_message(parameters, &mut out).map_err(WireError::from)?;
    stream.write_all(&out).await.map_err(WireError::from)?;
    authenticate(&mut stream, login, target.auth_methods).await?;
    finish_startup(stream).await
}

/// TCP connect, then SSLRequest and the TLS handshake when configured.
async fn open(target: &UpstreamTarget) -> Result<UpstreamStream, UpstreamError> {
    let address = target.address();
    let mut tcp =
        TcpStream::connect(&address)
            .await
            .map_err(|source| UpstreamError::Unreachable {
                address: address.clone(),
                source,
            })?;
    // Small request/response messages: Nagle's delay would add latency to every round trip.
    tcp.set_nodelay(true).map_err(WireError::from)?;
    let config = match &target.tls {
        UpstreamTlsMode::Disable => return Ok(MaybeTls::Plain(tcp)),
        UpstreamTlsMode::Require(config) | UpstreamTlsMode::VerifyFull(config) => config.clone(),
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await.map_err(WireError::from)?;
    let mut answer = [0u8; 1];
    read_exact_or_closed(&mut tcp, &mut answer).await?;
    if answer[0] != b'S' {
        return Err(UpstreamError::Tls(format!(
            "upstream at {address} does not accept TLS connections"
        )));
    }
    // Bytes after 'S' but before the handshake were not protected by TLS (CVE-2021-23222).
    if has_pending_bytes(&tcp) {
        return Err(UpstreamError::Tls(
            "upstream sent unencrypted data after accepting TLS".into(),
        ));
    }
    let name = ServerName::try_from(target.host.clone())
        .map_err(|err| UpstreamError::Tls(format!("invalid host name {}: {err}", target.host)))?;
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|err| UpstreamError::Tls(err.to_string()))?;
    Ok(MaybeTls::Tls(Box::new(tls)))
}

/// Runs the authentication exchange the upstream asks for, up to AuthenticationOk.
async fn authenticate(
    stream: &mut UpstreamStream,
    login: Login<'_>,
    methods: AuthMethods,
) -> Result<(), UpstreamError> {
    let mut exchange: Option<scram::Exchange> = None;
    // Whether pgbastion answered a request for a credential: AuthenticationOk before that
    // is a login without authentication.
    let mut answered = false;
    loop {
        let (tag, body) = read_message(stream, "upstream message", MAX_LOGIN_MESSAGE).await?;
        match tag {
            b'E' => return Err(refused(&body)),
            b'R' => {}
            other => {
                return Err(UpstreamError::Auth(format!(
                    "unexpected message '{}' during authentication",
                    other.escape_ascii()
                )))
            }
        }
        let mut fields = Fields::new(&body);
        let mut out = BytesMut::new();
        let code = fields.i32().map_err(UpstreamError::Wire)?;
        // Once SCRAM has started, the server must finish it: AuthenticationOk before it has
        // proven it knows the password, or a switch to a method that sends the password
        // (or its md5), is what an impostor would do.
        if let Some(started) = &exchange {
            let expected = match started.verified() {
                false => matches!(code, 11 | 12),
                true => code == 0,
            };
            if !expected {
                return Err(UpstreamError::Auth(format!(
                    "upstream sent authentication message {code} in the middle of SCRAM-SHA-256; \
                     pgbastion refuses to continue (is this the configured server?)"
                )));
            }
        }
        match code {
            0 => {
                if !answered {
                    methods.allow(
                        methods.trust,
                        "trust",
                        "lets pgbastion in without any authentication (trust)",
                    )?;
                }
                return Ok(());
            }
            3 => {
                methods.allow(
                    methods.password,
                    "password",
                    "asks for the password in clear (method password)",
                )?;
                frontend::password_message(login.password.as_bytes(), &mut out)
                    .map_err(WireError::from)?
            }
            5 => {
                methods.allow(
                    methods.md5,
                    "md5",
                    "asks for an md5 hash of the password (method md5)",
                )?;
                let salt: [u8; 4] = fields.take(4)?.try_into().expect("4 bytes");
                let hash = md5_hash(login.user.as_bytes(), login.password.as_bytes(), salt);
                frontend::password_message(hash.as_bytes(), &mut out).map_err(WireError::from)?;
            }
            10 => {
                methods.allow(
                    methods.scram_sha_256,
                    "scram-sha-256",
                    "asks for SCRAM-SHA-256",
                )?;
                let mut offered = Vec::new();
                loop {
                    let mechanism = fields.cstr()?;
                    if mechanism.is_empty() {
                        break;
                    }
                    offered.push(mechanism);
                }
                if !offered.contains(&SCRAM_SHA_256) {
                    return Err(UpstreamError::Auth(format!(
                        "upstream offers SASL mechanisms {offered:?}, pgbastion needs SCRAM-SHA-256"
                    )));
                }
                let started = scram::Exchange::new(login.password);
                frontend::sasl_initial_response(
                    SCRAM_SHA_256,
                    started.client_first().as_bytes(),
                    &mut out,
                )
                .map_err(WireError::from)?;
                exchange = Some(started);
            }
            11 => {
                let started = exchange.as_mut().ok_or_else(|| {
                    UpstreamError::Auth("SASL continue without SASL start".into())
                })?;
                let first = started
                    .read_server_first(fields.remaining())
                    .map_err(|err| UpstreamError::Auth(format!("SCRAM: {err}")))?;
                // A role's first login derives the salted password: milliseconds of HMACs,
                // kept off the thread that runs sessions.
                let salted = match started.remembered(&first) {
                    Some(salted) => salted,
                    None => tokio::task::spawn_blocking(started.salting(&first))
                        .await
                        .map_err(|err| UpstreamError::Auth(format!("SCRAM: {err}")))?,
                };
                let client_final = started.answer(&first, &salted);
                frontend::sasl_response(client_final.as_bytes(), &mut out)
                    .map_err(WireError::from)?;
            }
            12 => {
                // Verifies the server's signature: the upstream proves it knows the password too.
                let started = exchange
                    .as_mut()
                    .ok_or_else(|| UpstreamError::Auth("SASL final without SASL start".into()))?;
                started
                    .verify(fields.remaining())
                    .map_err(|err| UpstreamError::Auth(format!("SCRAM server signature: {err}")))?;
                answered = true;
                continue;
            }
            code => {
                return Err(UpstreamError::Auth(format!(
                    "upstream asks for authentication method {code}, which pgbastion does not \
                     support (upstream.auth_methods can allow scram-sha-256, md5, password or \
                     trust)"
                )))
            }
        }
        answered |= matches!(code, 3 | 5);
        stream.write_all(&out).await.map_err(WireError::from)?;
    }
}

/// After AuthenticationOk: collect ParameterStatus, notices and BackendKeyData up to ReadyForQuery.
async fn finish_startup(mut stream: UpstreamStream) -> Result<UpstreamConnection, UpstreamError> {
    let mut relay = BytesMut::new();
    let mut key = None;
    loop {
        let (tag, body) = read_message(&mut stream, "upstream message", MAX_LOGIN_MESSAGE).await?;
        match tag {
            b'S' | b'N' => raw(tag, &body, &mut relay),
            b'K' => {
                let mut fields = Fields::new(&body);
                key = Some((fields.i32()?, fields.i32()?));
            }
            b'E' => return Err(refused(&body)),
            b'Z' => {
                let (pid, secret) = key.ok_or_else(|| {
                    UpstreamError::Wire(WireError::protocol("upstream sent no BackendKeyData"))
                })?;
                return Ok(UpstreamConnection {
                    stream,
                    relay,
                    pid,
                    secret,
                    status: body.first().copied().unwrap_or(b'I'),
                });
            }
            other => {
                return Err(UpstreamError::Wire(WireError::protocol(format!(
                    "unexpected message '{}' after authentication",
                    other.escape_ascii()
                ))))
            }
        }
    }
}

/// The error an ErrorResponse body from the upstream stands for.
pub fn refused(body: &[u8]) -> UpstreamError {
    let fields = error_fields(body).unwrap_or_default();
    let mut response = BytesMut::new();
    raw(b'E', body, &mut response);
    UpstreamError::Refused {
        sqlstate: error_field(&fields, b'C').unwrap_or("").to_string(),
        message: error_field(&fields, b'M').unwrap_or("").to_string(),
        response,
    }
}

/// Sends a CancelRequest for (pid, secret) on a fresh connection, over TLS when configured.
/// <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-CANCELING-REQUESTS>
pub async fn cancel(target: &UpstreamTarget, pid: i32, secret: i32) -> Result<(), UpstreamError> {
    let work = async {
        let mut stream = open(target).await?;
        let mut out = BytesMut::new();
        frontend::cancel_request(pid, secret, &mut out);
        stream.write_all(&out).await.map_err(WireError::from)?;
        stream.flush().await.map_err(WireError::from)?;
        // The server closes the connection when done; waiting for it keeps the order intact.
        let mut sink = [0u8; 1];
        let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await;
        Ok(())
    };
    tokio::time::timeout(target.connect_timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(UpstreamError::Timeout {
                address: target.address(),
                timeout: target.connect_timeout,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A server that reads the StartupMessage, asks for authentication `code` (with `extra`
    /// bytes), then reports the client's next message (empty if it hangs up instead).
    async fn impostor(
        code: i32,
        extra: &'static [u8],
    ) -> (UpstreamTarget, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let len = socket.read_i32().await.unwrap() as usize;
            let mut startup = vec![0; len - 4];
            socket.read_exact(&mut startup).await.unwrap();
            let mut body = code.to_be_bytes().to_vec();
            body.extend_from_slice(extra);
            let mut out = BytesMut::new();
            raw(b'R', &body, &mut out);
            socket.write_all(&out).await.unwrap();
            // The client's next message, if it sends one before hanging up.
            let mut after = vec![0; 5];
            if socket.read_exact(&mut after).await.is_err() {
                return Vec::new();
            }
            let len = i32::from_be_bytes(after[1..5].try_into().unwrap()) as usize;
            after.resize(1 + len, 0);
            socket.read_exact(&mut after[5..]).await.unwrap();
            after
        });
        let target = UpstreamTarget {
            host: "127.0.0.1".into(),
            port,
            tls: UpstreamTlsMode::Disable,
            connect_timeout: Duration::from_secs(5),
            auth_methods: AuthMethods::SCRAM_ONLY,
        };
        (target, server)
    }

    const LOGIN: Login<'static> = Login {
        user: "app",
        password: "the-role-password",
        database: "app",
        parameters: &[],
    };

    #[tokio::test]
    async fn a_method_not_allowed_gets_no_credential_and_says_what_to_change() {
        for (code, extra, asks, method) in [
            (3, &b""[..], "the password in clear", "password"),
            (5, &b"salt"[..], "an md5 hash of the password", "md5"),
        ] {
            let (target, server) = impostor(code, extra).await;
            let err = connect(&target, LOGIN).await.unwrap_err().to_string();
            assert!(err.contains(&format!("upstream asks for {asks}")), "{err}");
            assert!(err.contains("it lists scram-sha-256"), "{err}");
            assert!(
                err.contains(&format!("add \"{method}\" to upstream.auth_methods")),
                "{err}"
            );
            assert_eq!(
                server.await.unwrap(),
                b"",
                "nothing may follow the StartupMessage"
            );
        }
    }

    #[tokio::test]
    async fn a_login_without_authentication_needs_trust_allowed() {
        let (target, server) = impostor(0, b"").await;
        let err = connect(&target, LOGIN).await.unwrap_err();
        assert!(matches!(err, UpstreamError::MethodNotAllowed(_)), "{err}");
        let err = err.to_string();
        assert!(
            err.contains("upstream lets pgbastion in without any authentication"),
            "{err}"
        );
        assert!(
            err.contains("require scram-sha-256 for this role in pg_hba.conf"),
            "{err}"
        );
        assert_eq!(server.await.unwrap(), b"");
        // Allowed, the login goes on (and waits for the startup messages this server never sends).
        let (mut target, _server) = impostor(0, b"").await;
        target.auth_methods.trust = true;
        target.connect_timeout = Duration::from_millis(200);
        let err = connect(&target, LOGIN).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn scram_left_out_is_refused_too() {
        let (mut target, server) = impostor(10, b"SCRAM-SHA-256\0\0").await;
        target.auth_methods = AuthMethods {
            scram_sha_256: false,
            md5: true,
            password: false,
            trust: false,
        };
        let err = connect(&target, LOGIN).await.unwrap_err().to_string();
        assert!(err.contains("upstream asks for SCRAM-SHA-256"), "{err}");
        assert!(
            err.contains("(it lists md5); pgbastion sent no credential: add \"scram-sha-256\""),
            "{err}"
        );
        assert_eq!(server.await.unwrap(), b"");
    }

    #[tokio::test]
    async fn an_allowed_method_is_answered() {
        let (mut target, server) = impostor(3, b"").await;
        target.auth_methods.password = true;
        // The impostor hangs up after the answer: the login fails, the answer was sent.
        assert!(connect(&target, LOGIN).await.is_err());
        let sent = server.await.unwrap();
        assert!(sent.starts_with(b"p"), "{sent:?}");
        assert!(sent.ends_with(b"the-role-password\0"), "{sent:?}");
    }
}
