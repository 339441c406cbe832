//! Development and test kit: a throwaway PostgreSQL cluster, a development OIDC issuer and
//! self-signed certificates. Used by `pgbastion demo` and the integration tests only;
//! `serve` never uses it, so the development issuer can never be trusted in production.
//! Must not depend on other pgbastion crates.

pub mod cert;
pub mod cluster;
pub mod issuer;
mod process;

pub use cert::SelfSigned;
pub use cluster::{ClusterRole, PgCluster};
pub use issuer::DevIssuer;

/// The demo's statement policies, used by `pgbastion demo` and the integration tests:
/// analysts read (not `public.secrets`, not `customers.ssn`), engineers read and write with a
/// WHERE clause but no DDL, dbadmins may do anything.
pub const DEMO_POLICIES: &str = r#"
[policies.analysts]
allow = ["read", "prepared", "session"]
read_only = true
deny_read = ["public.secrets"]
deny_columns = ["public.customers.ssn"]

[policies.engineers]
allow = ["read", "write", "prepared", "session", "listen"]
require_where = true

[policies.dbadmins]
allow = ["read", "write", "ddl", "dcl", "admin", "procedural", "listen", "prepared", "session"]
"#;
