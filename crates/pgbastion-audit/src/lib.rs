//! The audit log: one JSON line per event, each carrying the SHA-256 of the line before it, so
//! a removed, inserted or edited record breaks the chain (`pgbastion audit verify`).
//!
//! Owns: the record format, the hash chain, the sinks (stdout, a size-rotated file), the
//! bounded queue between sessions and the writer thread, and verification.
//! Must not depend on the wire, auth, policy or proxy crates: statement redaction is handed in.

mod chain;
mod json;
mod record;
mod sink;
mod verify;
mod writer;

pub use chain::{line_hash, ZERO_HASH};
pub use record::{Event, Outcome, Record, Session, StatementRecord, StatementStatus};
pub use verify::{verify_files, Verified};
pub use writer::WriterHandle;
pub use writer::{Auditor, Redactor};
