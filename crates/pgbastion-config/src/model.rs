//! The configuration model. Every struct denies unknown keys; every field has a documented default.
//! config/pgbastion.example.toml documents each key for operators.

use crate::operations::{Admin, Audit, IdentityLimits, Limits, Runtime, Shutdown};
use crate::pool::Pool;
use crate::secret::SecretSource;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listen: Listen,
    pub tls: Option<Tls>,
    #[serde(default)]
    pub client: Client,
    #[serde(default)]
    pub session: Session,
    #[serde(default)]
    pub issuers: Vec<Issuer>,
    pub upstream: Upstream,
    #[serde(default)]
    pub mappings: Vec<Mapping>,
    /// Statement policies by name, referenced by mapping rules.
    #[serde(default)]
    pub policies: BTreeMap<String, Policy>,
    #[serde(default)]
    pub audit: Audit,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub shutdown: Shutdown,
    #[serde(default)]
    pub pool: Pool,
    #[serde(default)]
    pub runtime: Runtime,
}

/// Where clients connect.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    #[serde(default = "defaults::listen_address")]
    pub address: SocketAddr,
    /// Accept clients without TLS. Tokens then cross the network in clear text, so `check`
    /// refuses it unless `address` is a loopback address.
    #[serde(default)]
    pub allow_plaintext: bool,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            address: defaults::listen_address(),
            allow_plaintext: false,
        }
    }
}

/// The certificate clients see.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Limits on what a client may send before and while it is authenticated.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Client {
    /// Time from accepting the connection to receiving the password (the token); verifying
    /// it is then bounded by the key fetch's HTTP timeouts.
    #[serde(default = "defaults::auth_timeout", with = "crate::duration")]
    pub auth_timeout: Duration,
    /// Largest PasswordMessage (the token). Cloud tokens reach about 7 KB.
    #[serde(default = "defaults::max_password_bytes")]
    pub max_password_bytes: usize,
    /// Largest Query, Parse or FunctionCall message; these are held whole to be analysed.
    #[serde(default = "defaults::max_statement_bytes")]
    pub max_statement_bytes: usize,
    /// Startup parameters (and `options=-c name=value` settings) passed upstream in addition
    /// to the built-in harmless set (see `DEFAULT_STARTUP_PARAMETERS`).
    #[serde(default)]
    pub extra_startup_parameters: Vec<String>,
}

impl Default for Client {
    fn default() -> Self {
        Client {
            auth_timeout: defaults::auth_timeout(),
            max_password_bytes: defaults::max_password_bytes(),
            max_statement_bytes: defaults::max_statement_bytes(),
            extra_startup_parameters: Vec::new(),
        }
    }
}

/// Settings a client may pass at startup without changing who it is upstream.
pub const DEFAULT_STARTUP_PARAMETERS: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "extra_float_digits",
    "intervalstyle",
    "search_path",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "default_transaction_isolation",
    "bytea_output",
    "geqo",
    "jit",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
];

/// Settings that would change who the session is upstream: never passable, whatever the config.
pub const FORBIDDEN_STARTUP_PARAMETERS: &[&str] = &[
    "role",
    "session_authorization",
    "replication",
    "user",
    "database",
    "options",
    // These change how PostgreSQL reads string literals; the policy's parser must read every
    // statement exactly as PostgreSQL does, so they stay at their defaults.
    "standard_conforming_strings",
    "backslash_quote",
    "escape_string_warning",
];

/// Settings under this prefix carry the verified identity in gateway mode; clients can neither
/// pass nor change them.
pub const RESERVED_SETTING_PREFIX: &str = "pgbastion.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTokenExpiry {
    /// End the session with a FATAL asking to reconnect with a fresh token.
    Disconnect,
    /// Let the session run past the token's expiry.
    Continue,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Session {
    #[serde(default = "defaults::on_token_expiry")]
    pub on_token_expiry: OnTokenExpiry,
    /// How long before expiry a NoticeResponse warns the client.
    #[serde(default = "defaults::expiry_warning", with = "crate::duration")]
    pub expiry_warning: Duration,
}

impl Default for Session {
    fn default() -> Self {
        Session {
            on_token_expiry: defaults::on_token_expiry(),
            expiry_warning: defaults::expiry_warning(),
        }
    }
}

/// A trusted OpenID Connect issuer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Issuer {
    /// The issuer URL, exactly as in the tokens' `iss` claim and the discovery document.
    pub issuer: String,
    /// The token's `aud` must contain at least one of these.
    pub audiences: Vec<String>,
    /// Scopes the token must carry (in `scope` or `scp`).
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// Claim (dotted path) that must equal the startup `user`.
    #[serde(default = "defaults::user_claim")]
    pub user_claim: String,
    /// Claim (dotted path, e.g. `realm_access.roles`) holding the identity's groups.
    #[serde(default = "defaults::groups_claim")]
    pub groups_claim: String,
    /// Signature algorithms accepted. `none` and HMAC (HS*) are never accepted.
    #[serde(default = "defaults::algorithms")]
    pub algorithms: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(default = "defaults::leeway", with = "crate::duration")]
    pub leeway: Duration,
    /// How often signing keys are refreshed in the background.
    #[serde(default = "defaults::jwks_refresh", with = "crate::duration")]
    pub jwks_refresh: Duration,
    /// A token with an unknown `kid` triggers a key refetch at most this often.
    #[serde(default = "defaults::jwks_min_refetch", with = "crate::duration")]
    pub jwks_min_refetch: Duration,
    /// Timeout of each HTTP request to the identity provider.
    #[serde(default = "defaults::http_timeout", with = "crate::duration")]
    pub http_timeout: Duration,
    /// Extra CA certificate (PEM) to trust for the identity provider's HTTPS.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    Disable,
    /// Encrypt, but do not verify the certificate.
    Require,
    /// Encrypt and verify the certificate chain and host name.
    VerifyFull,
}

/// An authentication method the upstream may ask pgbastion for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum UpstreamAuthMethod {
    /// SCRAM-SHA-256: the password never crosses the wire and the server proves it knows it.
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// md5: a salted hash of the password crosses the wire; whoever receives it can guess
    /// the password offline, and the server proves nothing.
    #[serde(rename = "md5")]
    Md5,
    /// The password itself crosses the wire.
    #[serde(rename = "password")]
    Password,
    /// No authentication at all: the upstream says AuthenticationOk at once (a trust rule
    /// in pg_hba.conf). Anyone who can pose as the upstream gets the sessions.
    #[serde(rename = "trust")]
    Trust,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    #[serde(default = "defaults::upstream_host")]
    pub host: String,
    #[serde(default = "defaults::upstream_port")]
    pub port: u16,
    #[serde(default = "defaults::upstream_tls")]
    pub tls: UpstreamTls,
    /// CA certificate (PEM) for `verify-full`.
    pub ca_file: Option<PathBuf>,
    #[serde(default = "defaults::connect_timeout", with = "crate::duration")]
    pub connect_timeout: Duration,
    /// The methods pgbastion answers when it logs in; an upstream (or an impostor) asking
    /// for another, or letting pgbastion in unasked without "trust" listed, gets no
    /// credential and no session. Default: SCRAM-SHA-256 only.
    #[serde(default = "defaults::upstream_auth_methods")]
    pub auth_methods: Vec<UpstreamAuthMethod>,
    /// Credentials of the roles pgbastion logs in as, by role name.
    #[serde(default)]
    pub roles: BTreeMap<String, SecretSource>,
    /// How old the upstream catalog facts policies use (views, partitions, which relations
    /// exist) may be; a relation they do not know triggers a reload sooner.
    #[serde(default = "defaults::catalog_refresh", with = "crate::duration")]
    pub catalog_refresh: Duration,
    /// Gateway mode: every session logs in as this one role and runs as its mapped role,
    /// set at connection start, with the verified identity in `pgbastion.*` settings.
    pub gateway: Option<Gateway>,
}

/// Gateway mode's login role. It should be NOINHERIT and a member of every mapped role, so
/// that it holds no privileges of its own and can become exactly the roles it is granted.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    /// The login role; its credential is the `[upstream.roles]` entry of the same name.
    pub role: String,
}

/// One rule mapping verified claims to an upstream role. Rules are tried in order;
/// the first whose conditions all hold wins.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// A name for logs and audit.
    pub name: String,
    /// Only tokens from this issuer match.
    pub issuer: Option<String>,
    /// The identity must be in at least one of these groups.
    #[serde(default)]
    pub groups_any: Vec<String>,
    /// Each claim (dotted path) must equal the value, or contain it if the claim is a list.
    #[serde(default)]
    pub claims: BTreeMap<String, String>,
    /// The PostgreSQL role the session runs as upstream.
    pub role: String,
    /// Databases this rule allows; `"*"` allows any.
    pub databases: Vec<String>,
    /// The statement policy applied to the session: a key of `[policies]`.
    pub policy: String,
}

/// Kinds of statement a policy allows. Transaction control is always allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatementClass {
    /// SELECT, VALUES, SHOW, EXPLAIN without ANALYZE, COPY TO STDOUT, FETCH.
    Read,
    /// INSERT, UPDATE, DELETE, MERGE, TRUNCATE, COPY FROM STDIN, SELECT INTO.
    Write,
    /// CREATE, ALTER, DROP, COMMENT and other schema changes.
    Ddl,
    /// GRANT, REVOKE, roles.
    Dcl,
    /// VACUUM, ANALYZE, LOAD, COPY to or from server files or programs, and anything unrecognised.
    Admin,
    /// CALL (and DO, which cannot be analysed).
    Procedural,
    /// LISTEN, UNLISTEN, NOTIFY.
    Listen,
    /// SQL-level PREPARE, EXECUTE, DEALLOCATE, DECLARE CURSOR (their bodies are analysed too).
    Prepared,
    /// SET, RESET, DISCARD of settings that are not guarded.
    Session,
    /// BEGIN, COMMIT, ROLLBACK, SAVEPOINT: always allowed.
    Transaction,
}

impl StatementClass {
    pub fn as_str(self) -> &'static str {
        match self {
            StatementClass::Read => "read",
            StatementClass::Write => "write",
            StatementClass::Ddl => "ddl",
            StatementClass::Dcl => "dcl",
            StatementClass::Admin => "admin",
            StatementClass::Procedural => "procedural",
            StatementClass::Listen => "listen",
            StatementClass::Prepared => "prepared",
            StatementClass::Session => "session",
            StatementClass::Transaction => "transaction",
        }
    }
}

/// A statement policy: what the sessions it applies to may run.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Statement classes allowed (transaction control always is).
    pub allow: Vec<StatementClass>,
    /// Refuse every statement that could change data or schema, whatever `allow` says.
    #[serde(default)]
    pub read_only: bool,
    /// UPDATE and DELETE need a WHERE clause that references a column.
    #[serde(default)]
    pub require_where: bool,
    /// Relation patterns (`schema.table`, `*` matches any run of characters) this policy may
    /// not read. A view or table function counts by its own name.
    #[serde(default)]
    pub deny_read: Vec<String>,
    /// Relation patterns this policy may not write.
    #[serde(default)]
    pub deny_write: Vec<String>,
    /// If not empty, only these relation patterns may be read.
    #[serde(default)]
    pub allow_read: Vec<String>,
    /// If not empty, only these relation patterns may be written.
    #[serde(default)]
    pub allow_write: Vec<String>,
    /// Columns (`schema.table.column`) that may not be read in any way: by name, by `*`, by a
    /// whole-row reference, or in a condition.
    #[serde(default)]
    pub deny_columns: Vec<String>,
    /// Functions (`name` or `schema.name`) to refuse besides the built-in dangerous ones.
    #[serde(default)]
    pub deny_functions: Vec<String>,
    /// Built-in dangerous functions this policy may call anyway.
    #[serde(default)]
    pub allow_functions: Vec<String>,
    /// Refuse changing search_path (pin it). When false (the default), SET search_path is
    /// allowed and every schema the session's path has held counts when resolving names.
    #[serde(default)]
    pub guard_search_path: bool,
    /// Forward statements pgbastion cannot parse, unchecked. Dangerous: anything the parser
    /// does not understand then reaches PostgreSQL without a decision.
    #[serde(default)]
    pub allow_unparsed: bool,
    /// Rate and connection limits for each identity this policy applies to.
    #[serde(default)]
    pub limits: IdentityLimits,
}

mod defaults {
    use super::*;

    pub fn listen_address() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 6432))
    }
    pub fn auth_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_password_bytes() -> usize {
        64 * 1024
    }
    pub fn max_statement_bytes() -> usize {
        64 * 1024 * 1024
    }
    pub fn on_token_expiry() -> OnTokenExpiry {
        OnTokenExpiry::Disconnect
    }
    pub fn expiry_warning() -> Duration {
        Duration::from_secs(300)
    }
    pub fn user_claim() -> String {
        "preferred_username".into()
    }
    pub fn groups_claim() -> String {
        "groups".into()
    }
    pub fn algorithms() -> Vec<String> {
        crate::validate::ASYMMETRIC_ALGORITHMS
            .iter()
            .map(|a| a.to_string())
            .collect()
    }
    pub fn leeway() -> Duration {
        Duration::from_secs(60)
    }
    pub fn jwks_refresh() -> Duration {
        Duration::from_secs(15 * 60)
    }
    pub fn jwks_min_refetch() -> Duration {
        Duration::from_secs(30)
    }
    pub fn http_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn upstream_host() -> String {
        "127.0.0.1".into()
    }
    pub fn upstream_port() -> u16 {
        5432
    }
    pub fn upstream_tls() -> UpstreamTls {
        UpstreamTls::VerifyFull
    }
    pub fn upstream_auth_methods() -> Vec<UpstreamAuthMethod> {
        vec![UpstreamAuthMethod::ScramSha256]
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn catalog_refresh() -> Duration {
        Duration::from_secs(10)
    }
}
