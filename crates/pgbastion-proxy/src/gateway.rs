//! Gateway mode: one login role upstream, each session running as its mapped role with the
//! verified identity readable by row-level security.
//!
//! Both are startup parameters, not SET commands: a startup value is the session's default,
//! so RESET ROLE, RESET ALL, DISCARD ALL and SET SESSION AUTHORIZATION DEFAULT all return to
//! it. Only an explicit SET ROLE or a change of a `pgbastion.` setting could move away from
//! it, and the policy denies both for every principal.

use crate::reply::Refusal;
use pgbastion_auth::{Grant, Identity};

/// PostgreSQL accepts startup packets up to 10,000 bytes; the claims must leave room for the
/// rest of the packet.
pub const MAX_CLAIMS_JSON: usize = 8 * 1024;

/// The startup parameters that make the gateway login run as `grant.role` with `identity`.
pub fn session_parameters(
    identity: &Identity,
    grant: &Grant,
) -> Result<Vec<(String, String)>, Refusal> {
    let claims = identity.claims.to_string();
    if claims.len() > MAX_CLAIMS_JSON {
        return Err(Refusal::ClaimsTooLarge {
            size: claims.len(),
            limit: MAX_CLAIMS_JSON,
        });
    }
    let groups = serde_json::Value::from(identity.groups.clone()).to_string();
    Ok(vec![
        ("role".into(), grant.role.clone()),
        ("pgbastion.user".into(), identity.user.clone()),
        ("pgbastion.subject".into(), identity.subject.clone()),
        ("pgbastion.issuer".into(), identity.issuer.clone()),
        ("pgbastion.groups".into(), groups),
        ("pgbastion.claims".into(), claims),
    ])
}
