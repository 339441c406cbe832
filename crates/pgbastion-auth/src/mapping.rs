//! Ordered rules from verified claims to an upstream role, databases and policy.

use crate::claims;
use crate::verify::Identity;
use pgbastion_config::Mapping;

/// What a verified identity is granted for this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The rule that matched.
    pub rule: String,
    pub role: String,
    pub policy: String,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MappingError {
    #[error("no mapping rule matches user '{user}' (groups: {groups})")]
    NoRule { user: String, groups: String },
    #[error("database '{database}' is not allowed for user '{user}' by rule '{rule}' (allowed: {allowed})")]
    Database {
        database: String,
        user: String,
        rule: String,
        allowed: String,
    },
}

#[derive(Debug, Clone)]
pub struct Mapper {
    rules: Vec<Mapping>,
}

impl Mapper {
    pub fn new(rules: Vec<Mapping>) -> Self {
        Mapper { rules }
    }

    /// The first rule whose conditions all hold decides; a database it does not list is refused
    /// (later rules are not consulted, so rule order means what it says).
    pub fn map(&self, identity: &Identity, database: &str) -> Result<Grant, MappingError> {
        let rule = self
            .rules
            .iter()
            .find(|rule| matches(rule, identity))
            .ok_or_else(|| MappingError::NoRule {
                user: identity.user.clone(),
                groups: if identity.groups.is_empty() {
                    "none".into()
                } else {
                    identity.groups.join(", ")
                },
            })?;
        if !rule.databases.iter().any(|d| d == "*" || d == database) {
            return Err(MappingError::Database {
                database: database.to_string(),
                user: identity.user.clone(),
                rule: rule.name.clone(),
                allowed: rule.databases.join(", "),
            });
        }
        Ok(Grant {
            rule: rule.name.clone(),
            role: rule.role.clone(),
            policy: rule.policy.clone(),
        })
    }
}

fn matches(rule: &Mapping, identity: &Identity) -> bool {
    if rule.issuer.as_ref().is_some_and(|i| i != &identity.issuer) {
        return false;
    }
    if !rule.groups_any.is_empty() && !rule.groups_any.iter().any(|g| identity.groups.contains(g)) {
        return false;
    }
    rule.claims.iter().all(|(path, expected)| {
        claims::strings(claims::lookup(&identity.claims, path)).contains(expected)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::SystemTime;

    fn rule(name: &str, groups: &[&str], role: &str, databases: &[&str]) -> Mapping {
        Mapping {
            name: name.into(),
            issuer: None,
            groups_any: groups.iter().map(|g| g.to_string()).collect(),
            claims: Default::default(),
            role: role.into(),
            databases: databases.iter().map(|d| d.to_string()).collect(),
            policy: "default".into(),
        }
    }

    fn identity(groups: &[&str], claims: serde_json::Value) -> Identity {
        Identity {
            issuer: "https://idp".into(),
            subject: "sub-1".into(),
            user: "alice".into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            claims,
            expires_at: SystemTime::now(),
        }
    }

    #[test]
    fn the_first_matching_rule_wins() {
        let mapper = Mapper::new(vec![
            rule("admins", &["dbadmins"], "owner", &["*"]),
            rule("analysts", &["analysts"], "analyst", &["app"]),
        ]);
        let grant = mapper
            .map(&identity(&["analysts", "dbadmins"], json!({})), "app")
            .unwrap();
        assert_eq!(grant.role, "owner");
        let grant = mapper
            .map(&identity(&["analysts"], json!({})), "app")
            .unwrap();
        assert_eq!(grant.role, "analyst");
    }

    #[test]
    fn no_matching_rule_names_the_user_and_groups() {
        let mapper = Mapper::new(vec![rule("analysts", &["analysts"], "analyst", &["app"])]);
        let err = mapper
            .map(&identity(&["sales"], json!({})), "app")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no mapping rule matches user 'alice' (groups: sales)"
        );
    }

    #[test]
    fn a_database_the_rule_does_not_list_is_refused() {
        let mapper = Mapper::new(vec![rule("analysts", &["analysts"], "analyst", &["app"])]);
        let err = mapper
            .map(&identity(&["analysts"], json!({})), "payroll")
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("database 'payroll' is not allowed"),
            "{err}"
        );
    }

    #[test]
    fn claim_conditions_must_all_hold() {
        let mut r = rule("finance", &[], "fin", &["*"]);
        r.claims.insert("department".into(), "finance".into());
        r.claims.insert("tenant.id".into(), "t1".into());
        let mapper = Mapper::new(vec![r]);
        let ok = identity(
            &[],
            json!({"department": "finance", "tenant": {"id": "t1"}}),
        );
        assert_eq!(mapper.map(&ok, "x").unwrap().role, "fin");
        let wrong = identity(
            &[],
            json!({"department": "finance", "tenant": {"id": "t2"}}),
        );
        assert!(mapper.map(&wrong, "x").is_err());
    }
}
