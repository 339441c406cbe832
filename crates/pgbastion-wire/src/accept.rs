//! The first bytes of a client connection: SSLRequest, GSSENCRequest, direct SSL (PostgreSQL
//! 17+), CancelRequest or StartupMessage.
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-SSL>

use crate::frame::{read_exact_or_closed, Fields};
use crate::stream::{ClientStream, MaybeTls};
use crate::tls::ALPN_POSTGRESQL;
use crate::{Result, WireError};
use rustls::ServerConfig;
use std::mem::MaybeUninit;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

pub const PROTOCOL_3_0: i32 = 196_608;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
/// The first byte of a TLS ClientHello record: a PostgreSQL 17+ client using `sslnegotiation=direct`.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What the client wants once the connection is set up.
#[derive(Debug)]
pub enum FirstContact {
    Startup {
        stream: ClientStream,
        startup: StartupMessage,
    },
    /// A CancelRequest: the connection carries nothing else.
    Cancel { pid: i32, secret: i32 },
}

/// A StartupMessage's protocol version and parameters, in the order sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    pub parameters: Vec<(String, String)>,
}

impl StartupMessage {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.parameters
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug)]
pub struct AcceptSettings {
    /// None: TLS is not configured and every SSLRequest is answered 'N'.
    pub tls: Option<Arc<ServerConfig>>,
    /// Startup packets larger than this are refused (PostgreSQL uses 10000).
    pub max_startup_packet: usize,
}

/// Why a connection could not be set up. `stream` is returned when a FATAL can still be sent.
#[derive(Debug)]
pub struct AcceptError {
    pub stream: Option<ClientStream>,
    pub error: WireError,
}

fn fail<T>(stream: Option<ClientStream>, error: WireError) -> std::result::Result<T, AcceptError> {
    Err(AcceptError { stream, error })
}

pub async fn accept(
    tcp: TcpStream,
    settings: &AcceptSettings,
) -> std::result::Result<FirstContact, AcceptError> {
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(0) => return fail(None, WireError::Closed),
        Ok(_) => {}
        Err(err) => return fail(None, err.into()),
    }
    let mut stream = if first[0] == TLS_HANDSHAKE_RECORD {
        let Some(tls) = &settings.tls else {
            return fail(
                None,
                WireError::Tls("direct SSL attempted but TLS is not configured".into()),
            );
        };
        let stream = upgrade(tcp, tls).await.map_err(|error| AcceptError {
            stream: None,
            error,
        })?;
        // Direct SSL skips the SSLRequest exchange, so ALPN is the only sign the client speaks
        // PostgreSQL: required, as PostgreSQL itself requires it.
        let alpn_ok = match &stream {
            MaybeTls::Tls(tls) => tls.get_ref().1.alpn_protocol() == Some(ALPN_POSTGRESQL),
            MaybeTls::Plain(_) => false,
        };
        if !alpn_ok {
            return fail(
                None,
                WireError::Tls("direct SSL connection without ALPN \"postgresql\"".into()),
            );
        }
        stream
    } else {
        MaybeTls::Plain(tcp)
    };

    loop {
        let packet = match read_packet(&mut stream, settings.max_startup_packet).await {
            Ok(packet) => packet,
            Err(error) => return fail(Some(stream), error),
        };
        let mut fields = Fields::new(&packet);
        let code = fields.i32().expect("packet holds at least a code");
        match code {
            SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if stream.is_tls() => {
                return fail(
                    None,
                    WireError::protocol("SSL or GSS negotiation requested inside TLS"),
                );
            }
            GSSENC_REQUEST_CODE => {
                // No GSSAPI encryption; the client may follow with an SSLRequest.
                if let Err(err) = stream.write_all(b"N").await {
                    return fail(None, err.into());
                }
            }
            SSL_REQUEST_CODE => {
                let MaybeTls::Plain(tcp) = stream else {
                    unreachable!("TLS streams were handled above")
                };
                let Some(tls) = &settings.tls else {
                    stream = MaybeTls::Plain(tcp);
                    if let Err(err) = stream.write_all(b"N").await {
                        return fail(None, err.into());
                    }
                    continue;
                };
                // Anything sent after the SSLRequest but before our 'S' was sent in clear
                // text and must never be taken as if it came over TLS (CVE-2021-23214).
                if has_pending_bytes(&tcp) {
                    return fail(
                        None,
                        WireError::protocol("unencrypted data received after SSL request"),
                    );
                }
                let mut tcp = tcp;
                if let Err(err) = tcp.write_all(b"S").await {
                    return fail(None, err.into());
                }
                stream = upgrade(tcp, tls).await.map_err(|error| AcceptError {
                    stream: None,
                    error,
                })?;
            }
            CANCEL_REQUEST_CODE => {
                let (Ok(pid), Ok(secret)) = (fields.i32(), fields.i32()) else {
                    return fail(None, WireError::protocol("malformed cancel request"));
                };
                return Ok(FirstContact::Cancel { pid, secret });
            }
            version => {
                let (major, minor) = ((version >> 16) as u16, (version & 0xffff) as u16);
                if major != 3 {
                    return fail(
                        Some(stream),
                        WireError::protocol(format!(
                            "unsupported frontend protocol {major}.{minor}: pgbastion supports 3.0"
                        )),
                    );
                }
                match parse_parameters(fields.remaining()) {
                    Ok(parameters) => {
                        return Ok(FirstContact::Startup {
                            stream,
                            startup: StartupMessage {
                                major,
                                minor,
                                parameters,
                            },
                        })
                    }
                    Err(error) => return fail(Some(stream), error),
                }
            }
        }
    }
}

async fn upgrade(tcp: TcpStream, config: &Arc<ServerConfig>) -> Result<ClientStream> {
    let tls = TlsAcceptor::from(config.clone())
        .accept(tcp)
        .await
        .map_err(|err| WireError::Tls(format!("handshake failed: {err}")))?;
    Ok(MaybeTls::Tls(Box::new(tls)))
}

/// True when the client has already sent more bytes than the packet we read.
pub(crate) fn has_pending_bytes(tcp: &TcpStream) -> bool {
    let mut probe = [MaybeUninit::<u8>::uninit(); 1];
    // The socket is non-blocking: a peek returns at once, WouldBlock when nothing is there.
    matches!(socket2::SockRef::from(tcp).peek(&mut probe), Ok(n) if n > 0)
}

/// Reads one length-prefixed startup-phase packet; returns it without the length.
async fn read_packet(stream: &mut ClientStream, max: usize) -> Result<Vec<u8>> {
    let mut len = [0u8; 4];
    read_exact_or_closed(stream, &mut len).await?;
    let len = i32::from_be_bytes(len);
    if len < 8 || len as usize > max {
        return Err(WireError::protocol(format!(
            "invalid length of startup packet: {len}"
        )));
    }
    let mut packet = vec![0u8; len as usize - 4];
    read_exact_or_closed(stream, &mut packet).await?;
    Ok(packet)
}

fn parse_parameters(body: &[u8]) -> Result<Vec<(String, String)>> {
    let mut fields = Fields::new(body);
    let mut parameters = Vec::new();
    loop {
        let name = fields.cstr()?;
        if name.is_empty() {
            return Ok(parameters);
        }
        let value = fields.cstr()?;
        if parameters.iter().any(|(k, _)| k == name) {
            return Err(WireError::protocol(format!(
                "startup parameter \"{name}\" is repeated"
            )));
        }
        parameters.push((name.to_string(), value.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_parameters_end_at_an_empty_name() {
        let parameters = parse_parameters(b"user\0alice\0database\0app\0\0").unwrap();
        assert_eq!(
            parameters,
            [
                ("user".into(), "alice".into()),
                ("database".into(), "app".into())
            ]
        );
    }

    #[test]
    fn unterminated_or_repeated_parameters_are_refused() {
        assert!(parse_parameters(b"user\0alice\0").is_err());
        assert!(parse_parameters(b"user\0a\0user\0b\0\0").is_err());
    }
}
