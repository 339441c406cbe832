//! Development and test kit: a throwaway PostgreSQL cluster, a development OIDC issuer and
//! self-signed certificates. Used by `pgbastion demo` and the integration tests only;
//! `serve` never uses it, so the development issuer can never be trusted in production.
//! Depends only on the configuration model among pgbastion crates.

pub mod cert;
pub mod cluster;
pub mod demo;
pub mod issuer;
mod process;

pub use cert::SelfSigned;
pub use cluster::{ClusterRole, PgCluster};
pub use issuer::DevIssuer;
