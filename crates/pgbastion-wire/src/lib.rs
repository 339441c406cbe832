//! The PostgreSQL wire protocol, both ways: the only crate that touches pgwire.
//!
//! Owns: framing of client and upstream messages with size caps, the SQLSTATE constants,
//! encoding of the messages pgbastion itself sends, TLS negotiation with clients (SSLRequest,
//! GSSENCRequest, direct SSL) and logging in upstream (TLS; SCRAM-SHA-256, and md5, cleartext
//! or trust only where `upstream.auth_methods` lists them).
//! Must not depend on any other pgbastion crate: it knows bytes, not identities or policies.
//!
//! Protocol reference: <https://www.postgresql.org/docs/current/protocol-message-formats.html>

pub mod accept;
pub mod codes;
pub mod frame;
pub mod messages;
pub mod query;
pub mod stream;
pub mod tls;
pub mod upstream;

mod error;
pub mod scram;

pub use error::{Result, WireError};
