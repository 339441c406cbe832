//! The statement policy: (Principal, Request) -> Decision.
//!
//! Owns: the one decision point every Query, Parse and FunctionCall passes through before
//! anything is forwarded upstream; statement analysis with sqlparser; the policy rules.
//! Pure and synchronous: no I/O, no clock, no global state. Reads only the configuration model.
//! Must not depend on the wire, auth or proxy crates.

mod analyze;
mod cache_key;
mod catalog;
mod decide;
mod fallback;
mod functions;
mod names;
mod plain_text;
mod redact;

pub use analyze::{analyze, Call, StatementInfo};
pub use cache_key::{decision_key, decision_key_and_redacted, tokenizer_key};
pub use catalog::{Catalog, Fact, Reached};
pub use decide::{
    decide, decide_with_effects, CompiledPolicy, Decision, Denial, Effects, PreparedOp, Principal,
    Request,
};
pub use functions::safe_client_encoding;
pub use names::Name;
pub use redact::{redact, UNREADABLE};
