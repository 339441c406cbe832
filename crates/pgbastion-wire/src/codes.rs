//! SQLSTATE codes pgbastion sends. Named here so no code is ever an inline string.
//! <https://www.postgresql.org/docs/current/errcodes-appendix.html>

pub const SUCCESSFUL_COMPLETION: &str = "00000";
pub const WARNING: &str = "01000";
pub const CONNECTION_EXCEPTION: &str = "08000";
pub const SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION: &str = "08001";
pub const CONNECTION_FAILURE: &str = "08006";
pub const PROTOCOL_VIOLATION: &str = "08P01";
pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
pub const INVALID_PASSWORD: &str = "28P01";
pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
pub const SYNTAX_ERROR: &str = "42601";
pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
pub const TOO_MANY_CONNECTIONS: &str = "53300";
pub const CONFIGURATION_LIMIT_EXCEEDED: &str = "53400";
pub const ADMIN_SHUTDOWN: &str = "57P01";
pub const INTERNAL_ERROR: &str = "XX000";
