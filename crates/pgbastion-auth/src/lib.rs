//! Token in, verified Identity out; Identity in, upstream role out.
//!
//! Owns: OIDC discovery and the signing-key cache of each trusted issuer, access-token
//! verification (signature, algorithm, issuer, audience, time, scopes, user claim) and the
//! ordered claim-to-role mapping rules.
//! Must not depend on the wire, policy or proxy crates; it reads only the configuration model.

mod claims;
mod error;
mod keys;
mod mapping;
mod verified;
mod verify;

pub use error::{AuthError, FailureKind};
pub use mapping::{Grant, Mapper, MappingError};
pub use verify::{Identity, KeyStatus, Verifier};
