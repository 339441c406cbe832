//! The proxy: listener, per-connection handshake, the relay loop, cancel routing.
//!
//! Owns: turning a configuration into a running listener, the life of each client connection
//! (TLS, startup checks, token verification, mapping, upstream login, relay, cancel, expiry)
//! and the single place where failures become messages to the client (`reply`).
//! Depends on the config, wire, auth and policy crates; nothing depends on it but the binary
//! and the integration tests.

mod cancel;
mod catalog;
pub mod decision_cache;
mod gateway;
mod handshake;
mod listener;
mod options;
mod prepared;
mod relay;
mod reply;
mod settings;

pub use listener::{Proxy, ProxyError};
pub use settings::Settings;
