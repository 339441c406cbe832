//! `pgbastion policy explain` and `policy test`: decide hypothetical sessions offline, so a
//! policy change can be reviewed and tested like code before it is rolled out.

use anyhow::{anyhow, Context, Result};
use pgbastion_auth::{Identity, Mapper};
use pgbastion_config::Config;
use pgbastion_policy::{analyze, decide, CompiledPolicy, Decision, Principal, Request};
use serde::Deserialize;
use std::path::Path;
use std::process::ExitCode;

/// The outcome of one hypothetical statement.
pub(crate) struct Outcome {
    user: String,
    groups: Vec<String>,
    rule_name: String,
    role: String,
    policy: String,
    pub decision: Decision,
}

pub(crate) fn load(config: &Path) -> Result<Config> {
    pgbastion_config::load(config).map_err(|problems| anyhow!("{}:\n{problems}", config.display()))
}

/// Maps the claims like a real session would, then decides `sql`.
pub(crate) fn evaluate(
    config: &Config,
    claims: serde_json::Value,
    database: Option<&str>,
    sql: &str,
) -> Result<Outcome> {
    let identity =
        Identity::from_unverified_claims(&config.issuers, claims).map_err(|e| anyhow!(e))?;
    let mapper = Mapper::new(config.mappings.clone());
    let database = match database {
        Some(database) => database.to_string(),
        None => config
            .mappings
            .iter()
            .flat_map(|m| m.databases.iter())
            .find(|d| *d != "*")
            .cloned()
            .unwrap_or_else(|| identity.user.clone()),
    };
    let grant = mapper
        .map(&identity, &database)
        .map_err(|e| anyhow!("{e}"))?;
    let policy = config
        .policies
        .get(&grant.policy)
        .ok_or_else(|| anyhow!("policy '{}' is not defined", grant.policy))?;
    let compiled = CompiledPolicy::new(&grant.policy, policy);
    let search_path = vec![grant.role.clone(), "public".to_string()];
    let principal = Principal {
        user: &identity.user,
        role: &grant.role,
        policy: &compiled,
        search_path: &search_path,
        catalog: None,
    };
    Ok(Outcome {
        decision: decide(&principal, &Request::Query(sql)),
        user: identity.user,
        groups: identity.groups,
        rule_name: grant.rule,
        role: grant.role,
        policy: grant.policy,
    })
}

pub fn explain(config: &Path, claims: &str, database: Option<&str>, sql: &str) -> Result<ExitCode> {
    let config = load(config)?;
    let claims: serde_json::Value = serde_json::from_str(claims).context("--claims is not JSON")?;
    let outcome = evaluate(&config, claims, database, sql)?;
    println!(
        "identity:  {} (groups: {}) -> mapping '{}' -> role {}, policy '{}'",
        outcome.user,
        if outcome.groups.is_empty() {
            "none".into()
        } else {
            outcome.groups.join(", ")
        },
        outcome.rule_name,
        outcome.role,
        outcome.policy
    );
    match &outcome.decision {
        Decision::Allow => println!("decision:  allow"),
        Decision::Deny(denial) => {
            println!("decision:  deny (rule {})", denial.rule);
            println!("message:   {}", denial.message);
            if let Some(hint) = &denial.hint {
                println!("hint:      {hint}");
            }
        }
    }
    match analyze(sql) {
        Ok(statements) => {
            for (i, info) in statements.iter().enumerate() {
                let list = |items: Vec<String>| {
                    if items.is_empty() {
                        "-".to_string()
                    } else {
                        items.join(", ")
                    }
                };
                println!("statement {}:", i + 1);
                println!(
                    "  classes:   {}",
                    list(
                        info.classes
                            .iter()
                            .map(|c| c.as_str().to_string())
                            .collect()
                    )
                );
                println!(
                    "  reads:     {}",
                    list(info.reads.iter().map(|n| n.to_string()).collect())
                );
                println!(
                    "  writes:    {}",
                    list(info.writes.iter().map(|n| n.to_string()).collect())
                );
                println!(
                    "  functions: {}",
                    list(info.calls.iter().map(|c| format!("{}()", c.name)).collect())
                );
                println!(
                    "  columns:   {}",
                    list(info.columns.iter().map(|c| c.join(".")).collect())
                );
                if !info.wildcards.is_empty() {
                    println!(
                        "  wildcards: {}",
                        list(
                            info.wildcards
                                .iter()
                                .map(|w| w.as_ref().map_or("*".into(), |q| format!("{q}.*")))
                                .collect()
                        )
                    );
                }
                if !info.settings.is_empty() {
                    println!("  settings:  {}", list(info.settings.clone()));
                }
            }
        }
        Err(err) => println!("analysis:  cannot parse: {err}"),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    /// Shown in the report; defaults to the SQL.
    name: Option<String>,
    claims: toml::Value,
    database: Option<String>,
    sql: String,
    /// "allow" or "deny".
    expect: String,
    /// When denied, the rule that must decide (e.g. "deny_read").
    rule: Option<String>,
}

pub fn test(config: &Path, cases: &Path) -> Result<ExitCode> {
    let config = load(config)?;
    let text =
        std::fs::read_to_string(cases).with_context(|| format!("reading {}", cases.display()))?;
    let cases: Cases = toml::from_str(&text).with_context(|| format!("{}", cases.display()))?;
    let (mut passed, mut failed) = (0, 0);
    for case in &cases.cases {
        let name = case.name.clone().unwrap_or_else(|| case.sql.clone());
        let claims = serde_json::to_value(&case.claims)?;
        let verdict = match evaluate(&config, claims, case.database.as_deref(), &case.sql) {
            Ok(outcome) => match outcome.decision {
                Decision::Allow => ("allow".to_string(), None),
                Decision::Deny(denial) => ("deny".to_string(), Some(denial.rule)),
            },
            // A session that could not be mapped runs nothing: a denial of its own kind.
            Err(err) => ("deny".to_string(), Some(format!("mapping: {err}"))),
        };
        let ok = verdict.0 == case.expect
            && case
                .rule
                .as_ref()
                .is_none_or(|rule| verdict.1.as_ref() == Some(rule));
        if ok {
            passed += 1;
            println!("ok    {name}");
        } else {
            failed += 1;
            println!(
                "FAIL  {name}: expected {}{}, got {}{}",
                case.expect,
                case.rule
                    .as_ref()
                    .map(|r| format!(" by {r}"))
                    .unwrap_or_default(),
                verdict.0,
                verdict.1.map(|r| format!(" by {r}")).unwrap_or_default()
            );
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
