//! The one door to the client: every way a connection can be refused or ended becomes an
//! ErrorResponse here, with the right SQLSTATE, in one exhaustive match.

use bytes::BytesMut;
use pgbastion_auth::{AuthError, FailureKind, MappingError};
use pgbastion_wire::codes;
use pgbastion_wire::messages::{Report, Severity};
use pgbastion_wire::upstream::UpstreamError;
use pgbastion_wire::WireError;

/// Why pgbastion ends a connection.
#[derive(Debug)]
pub enum Refusal {
    PlaintextNotAllowed,
    NoUser,
    Protocol(String),
    UnsupportedProtocol(String),
    StartupParameter(String),
    Auth(AuthError),
    Mapping(MappingError),
    Upstream {
        role: String,
        error: UpstreamError,
    },
    StatementTooLarge {
        size: usize,
        limit: usize,
    },
    TokenExpired,
    /// Gateway mode: the verified claims do not fit in PostgreSQL's startup packet.
    ClaimsTooLarge {
        size: usize,
        limit: usize,
    },
    /// Gateway mode: the upstream refused to let the gateway role become the mapped role.
    GatewayRole {
        gateway: String,
        role: String,
    },
    /// A connection limit (53300).
    Limited(crate::limits::Limited),
    /// The upstream pool of (role, database) stayed full for `pool.acquire_timeout` (53300).
    PoolExhausted {
        role: String,
        database: String,
        max: usize,
        waited: std::time::Duration,
    },
    /// The proxy is shutting down and the drain timeout passed.
    Shutdown,
    /// Something that should not happen; details are only in the log, under the connection id.
    Internal {
        conn: u64,
    },
}

impl From<WireError> for Refusal {
    fn from(err: WireError) -> Self {
        Refusal::Protocol(err.to_string())
    }
}

impl Refusal {
    /// Appends the FATAL message the client gets.
    pub fn encode(&self, out: &mut BytesMut) {
        let fatal = |code, message: String| Report::new(Severity::Fatal, code, message);
        let report = match self {
            Refusal::PlaintextNotAllowed => fatal(
                codes::INVALID_AUTHORIZATION_SPECIFICATION,
                "pgbastion requires SSL; connect with sslmode=require or stronger".into(),
            )
            .hint("the access token is a password: it must not cross the network unencrypted"),
            Refusal::NoUser => fatal(
                codes::INVALID_AUTHORIZATION_SPECIFICATION,
                "no PostgreSQL user name specified in startup packet".into(),
            ),
            Refusal::Protocol(message) => fatal(codes::PROTOCOL_VIOLATION, message.clone()),
            Refusal::UnsupportedProtocol(message) => fatal(codes::FEATURE_NOT_SUPPORTED, message.clone()),
            Refusal::StartupParameter(message) => fatal(codes::INSUFFICIENT_PRIVILEGE, message.clone())
                .hint("remove it from the connection string or PGOPTIONS; the session's role and settings come from your identity"),
            Refusal::Auth(err) => {
                let code = match err.kind() {
                    FailureKind::BadToken => codes::INVALID_PASSWORD,
                    FailureKind::NotAllowed => codes::INVALID_AUTHORIZATION_SPECIFICATION,
                };
                let report = fatal(code, err.to_string());
                match err {
                    AuthError::NotJwt(_) | AuthError::Expired(_) => {
                        report.hint("give a fresh OIDC access token from your identity provider as the password")
                    }
                    _ => report,
                }
            }
            Refusal::Mapping(err) => fatal(codes::INVALID_AUTHORIZATION_SPECIFICATION, err.to_string()),
            Refusal::Upstream { role, error } => match error {
                // The upstream's own refusal (database does not exist, too many connections, ...)
                // means what it says and is relayed as sent, except a failed login of our own
                // configured credential: that is pgbastion's misconfiguration, not the client's.
                UpstreamError::Refused { sqlstate, response, .. } if !sqlstate.starts_with("28") => {
                    out.extend_from_slice(response);
                    return;
                }
                UpstreamError::Refused { .. } | UpstreamError::Auth(_) => fatal(
                    codes::CONNECTION_FAILURE,
                    format!("pgbastion could not log in to the upstream PostgreSQL as role '{role}'"),
                )
                .hint("the proxy's credential for this role is wrong or missing upstream; tell the pgbastion operator"),
                UpstreamError::MethodNotAllowed(_) => fatal(
                    codes::CONNECTION_FAILURE,
                    format!(
                        "the upstream PostgreSQL asks pgbastion to log in as role '{role}' by an \
                         authentication method it does not answer"
                    ),
                )
                .hint("tell the pgbastion operator: the upstream's pg_hba.conf and upstream.auth_methods disagree (the proxy's log says how)"),
                UpstreamError::Unreachable { .. } | UpstreamError::Timeout { .. } => fatal(
                    codes::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                    "the upstream PostgreSQL is unreachable".into(),
                )
                .hint("try again shortly; if it persists, tell the pgbastion operator"),
                UpstreamError::Tls(_) | UpstreamError::Wire(_) => fatal(
                    codes::CONNECTION_FAILURE,
                    "the connection to the upstream PostgreSQL failed".into(),
                ),
            },
            Refusal::StatementTooLarge { size, limit } => fatal(
                codes::PROGRAM_LIMIT_EXCEEDED,
                format!("statement of {size} bytes exceeds pgbastion's limit of {limit} bytes"),
            )
            .hint("pass large values as parameters of a prepared statement instead of inline"),
            Refusal::TokenExpired => fatal(
                codes::INVALID_AUTHORIZATION_SPECIFICATION,
                "the access token of this session has expired".into(),
            )
            .hint("reconnect with a fresh access token"),
            Refusal::ClaimsTooLarge { size, limit } => fatal(
                codes::PROGRAM_LIMIT_EXCEEDED,
                format!("the access token's claims ({size} bytes as JSON) are too large to pass to PostgreSQL (limit {limit} bytes)"),
            )
            .hint("ask the identity provider's administrator for a token with fewer claims for this audience"),
            Refusal::GatewayRole { gateway, role } => fatal(
                codes::CONNECTION_FAILURE,
                format!("pgbastion's gateway role '{gateway}' may not become role '{role}' upstream"),
            )
            .hint(format!("tell the pgbastion operator: GRANT {role} TO {gateway} is missing")),
            Refusal::Limited(limited) => fatal(codes::TOO_MANY_CONNECTIONS, limited.message.clone()),
            Refusal::PoolExhausted { role, database, max, waited } => fatal(
                codes::TOO_MANY_CONNECTIONS,
                format!(
                    "no upstream connection available: all {max} connections of role '{role}' to database '{database}' are in use (waited {} ms)",
                    waited.as_millis()
                ),
            )
            .hint("retry shortly; if it persists, the pgbastion operator can raise pool.max_size"),
            Refusal::Shutdown => fatal(
                codes::ADMIN_SHUTDOWN,
                "terminating connection because pgbastion is shutting down".into(),
            )
            .hint("reconnect: another pgbastion instance may take the connection"),
            Refusal::Internal { conn } => fatal(
                codes::INTERNAL_ERROR,
                format!("pgbastion internal error (connection {conn})"),
            ),
        };
        report.encode(out);
    }

    /// A short label for logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::PlaintextNotAllowed => "plaintext_not_allowed",
            Refusal::NoUser => "no_user",
            Refusal::Protocol(_) => "protocol",
            Refusal::UnsupportedProtocol(_) => "unsupported_protocol",
            Refusal::StartupParameter(_) => "startup_parameter",
            Refusal::Auth(err) => err.reason(),
            Refusal::Mapping(_) => "mapping",
            Refusal::Upstream { .. } => "upstream",
            Refusal::StatementTooLarge { .. } => "statement_too_large",
            Refusal::TokenExpired => "token_expired",
            Refusal::ClaimsTooLarge { .. } => "claims_too_large",
            Refusal::GatewayRole { .. } => "gateway_role",
            Refusal::Limited(limited) => limited.limit,
            Refusal::PoolExhausted { .. } => "pool_exhausted",
            Refusal::Shutdown => "shutdown",
            Refusal::Internal { .. } => "internal",
        }
    }
}
