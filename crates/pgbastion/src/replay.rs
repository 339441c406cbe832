//! `pgbastion policy replay`: decide every statement of an audit log again under a new
//! configuration and report, per identity, what would change. Redacted statements are decided
//! with their `$0` placeholders; no policy rule depends on a literal's value except settings'
//! values (search_path, client_encoding), which redaction hides — give `--baseline` to compare
//! like with like.

use crate::policy::{evaluate, load};
use anyhow::{Context, Result};
use pgbastion_config::Config;
use pgbastion_policy::Decision;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Examples shown per identity and direction.
const EXAMPLES: usize = 5;

#[derive(Default)]
struct Changes {
    statements: u64,
    newly_denied: Vec<String>,
    newly_allowed: Vec<String>,
}

pub fn replay(
    config: &Path,
    baseline: Option<&Path>,
    allow_changes: bool,
    files: &[PathBuf],
) -> Result<ExitCode> {
    let new = load(config)?;
    let old = baseline.map(load).transpose()?;
    let mut by_identity: BTreeMap<String, Changes> = BTreeMap::new();
    let (mut statements, mut skipped) = (0u64, 0u64);
    for path in files {
        let file = std::fs::File::open(path).with_context(|| path.display().to_string())?;
        for (index, line) in BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("{}:{}", path.display(), index + 1))?;
            let Ok(record) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if record["event"] != "statement" || record["kind"] == "function_call" {
                continue;
            }
            let (Some(text), Some(session)) = (record["text"].as_str(), record.get("session"))
            else {
                skipped += 1;
                continue;
            };
            if text == pgbastion_policy::UNREADABLE {
                skipped += 1;
                continue;
            }
            statements += 1;
            let before = match &old {
                Some(old) => allowed(old, session, text),
                None => record["decision"] == "allow",
            };
            let after = allowed(&new, session, text);
            let user = session["user"].as_str().unwrap_or("?").to_string();
            let changes = by_identity.entry(user).or_default();
            changes.statements += 1;
            match (before, after) {
                (true, false) => changes.newly_denied.push(text.to_string()),
                (false, true) => changes.newly_allowed.push(text.to_string()),
                _ => {}
            }
        }
    }
    let mut changed = 0;
    for (user, changes) in &by_identity {
        let (denied, allowed) = (changes.newly_denied.len(), changes.newly_allowed.len());
        if denied + allowed == 0 {
            continue;
        }
        changed += denied + allowed;
        println!(
            "{user}: {} statements, {denied} newly denied, {allowed} newly allowed",
            changes.statements
        );
        for (label, texts) in [
            ("newly denied", &changes.newly_denied),
            ("newly allowed", &changes.newly_allowed),
        ] {
            for text in texts.iter().take(EXAMPLES) {
                println!("  {label}: {}", text.replace('\n', " "));
            }
            if texts.len() > EXAMPLES {
                println!("  {label}: ... and {} more", texts.len() - EXAMPLES);
            }
        }
    }
    println!(
        "replayed {statements} statements of {} identities{}: {changed} decisions would change",
        by_identity.len(),
        if skipped > 0 {
            format!(" ({skipped} records without replayable text skipped)")
        } else {
            String::new()
        }
    );
    Ok(if changed > 0 && !allow_changes {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Whether the session recorded in the audit would get `text` allowed under `config`. An
/// identity that no longer maps (or to a database no longer allowed) is denied everything.
fn allowed(config: &Config, session: &Value, text: &str) -> bool {
    let issuer = session["issuer"].as_str().unwrap_or_default();
    let Some(trusted) = config.issuers.iter().find(|i| i.issuer == issuer) else {
        return false;
    };
    let mut claims = json!({ "iss": issuer, "sub": session["subject"] });
    set_path(&mut claims, &trusted.user_claim, session["user"].clone());
    set_path(
        &mut claims,
        &trusted.groups_claim,
        session["groups"].clone(),
    );
    let database = session["database"].as_str();
    match evaluate(config, claims, database, text) {
        Ok(outcome) => outcome.decision == Decision::Allow,
        Err(_) => false,
    }
}

/// Sets a dotted claim path (`realm_access.roles`) in a JSON object.
fn set_path(object: &mut Value, path: &str, value: Value) {
    let mut target = object;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            target[part] = value;
            return;
        }
        if !target[part].is_object() {
            target[part] = json!({});
        }
        target = &mut target[part];
    }
}
