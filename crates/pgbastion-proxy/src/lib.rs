//! The proxy: listener, per-connection handshake, the relay loop, cancel routing.
//!
//! Owns: turning a configuration into a running listener, the life of each client connection
//! (TLS, startup checks, token verification, mapping, upstream login, relay, cancel, expiry)
//! and the single place where failures become messages to the client (`reply`).
//! Depends on the config, wire, auth and policy crates; nothing depends on it but the binary
//! and the integration tests.

mod admin;
mod busy_poll;
mod cancel;
mod catalog;
mod client_side;
pub mod decision_cache;
mod executions;
mod gateway;
mod handshake;
mod limits;
mod listener;
mod metrics;
mod options;
mod pool;
mod prepared;
mod relay;
mod renaming;
mod reply;
mod settings;
mod upstream_side;

pub use listener::{Proxy, ProxyError, ProxyHandle};
pub use settings::Settings;
