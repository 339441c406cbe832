//! Deciding: a statement's analysis against a policy's rules, first failing rule wins.

use crate::analyze::{analyze, StatementInfo};
use crate::catalog::Catalog;
use crate::functions::{always_guarded, safe_client_encoding, DANGEROUS};
use crate::names::{glob, Name};
use pgbastion_config::{Policy, StatementClass};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Who is asking, as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Principal<'a> {
    pub user: &'a str,
    /// The upstream role the session runs as.
    pub role: &'a str,
    pub policy: &'a CompiledPolicy,
    /// Every schema the session's search_path has held (the session may change it, and a
    /// SET that fails upstream must not let the proxy's idea of it drift from PostgreSQL's),
    /// `$user` already replaced by the role.
    pub search_path: &'a [String],
    /// The upstream catalog: resolves names exactly and expands views and inheritance.
    /// Without it (policy tooling), names are resolved by their possible schemas alone.
    pub catalog: Option<&'a Catalog>,
}

/// What an allowed request changes in how later ones are decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// Schemas the session's search_path may now hold.
    pub search_path: Vec<String>,
    /// A relation named was not in the catalog: a newer catalog may know it.
    pub unknown_relations: bool,
    /// Statement classes found, for the audit log (also for denials).
    pub classes: Arc<[&'static str]>,
    /// Relations named, as written (normalised), for the audit log (also for denials).
    pub relations: Arc<[String]>,
    /// SQL-level prepared statements created, run and removed, in statement order: the
    /// proxy keeps a book of what each name holds.
    pub prepared: Vec<PreparedOp>,
    /// The request may leave state that outlives its transaction (a setting, a temporary
    /// table, a prepared statement or cursor, LISTEN, a session advisory lock, anything not
    /// analysed): a transaction pool then keeps the session on its connection.
    pub session_state: bool,
    /// The request reads the sequence values its session last saw (`currval`, `lastval`)
    /// before anything in it could have set them (a write, `nextval`, `setval`): under
    /// transaction pooling, at the start of a transaction, those are another client's.
    pub reads_earlier_sequence_values: bool,
    /// The request may set sequence values (a write, through a column default; `nextval`,
    /// `setval`).
    pub sets_sequence_values: bool,
}

/// A statement's use of a prepared statement, by normalised name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreparedOp {
    Prepare(String),
    Execute(String),
    /// None: DEALLOCATE ALL.
    Deallocate(Option<String>),
}

/// What the client asks the upstream to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// A simple Query message: one or more statements run as one implicit transaction.
    Query(&'a str),
    /// An extended-protocol Parse: decided here, before any Bind can run it.
    Parse { statement: &'a str, query: &'a str },
    /// A FunctionCall message: calls a function by OID, with no SQL text to analyse.
    FunctionCall { oid: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(Denial),
}

/// Why a request was denied, in words for the person who sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub policy: String,
    /// The ErrorResponse message, e.g. "policy 'analysts' denies writing to public.orders".
    pub message: String,
    /// The rule that decided, for DETAIL and the audit.
    pub rule: String,
    /// What would be allowed instead.
    pub hint: Option<String>,
}

/// A policy from the configuration, prepared for deciding.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub name: String,
    /// Identifies the policy's rules (a hash of them, set by whoever loads the configuration):
    /// decisions cached under one version are not reused under another.
    pub version: String,
    allow: BTreeSet<StatementClass>,
    read_only: bool,
    require_where: bool,
    deny_read: Vec<String>,
    deny_write: Vec<String>,
    allow_read: Vec<String>,
    allow_write: Vec<String>,
    /// "schema.table" -> denied column names.
    deny_columns: BTreeMap<String, BTreeSet<String>>,
    deny_functions: Vec<String>,
    allow_functions: Vec<String>,
    guard_search_path: bool,
    allow_unparsed: bool,
}

impl CompiledPolicy {
    pub fn new(name: &str, policy: &Policy) -> Self {
        let mut deny_columns: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for column in &policy.deny_columns {
            if let Some((table, column)) = column.rsplit_once('.') {
                deny_columns
                    .entry(table.to_string())
                    .or_default()
                    .insert(column.to_string());
            }
        }
        CompiledPolicy {
            name: name.to_string(),
            version: String::new(),
            allow: policy.allow.iter().copied().collect(),
            read_only: policy.read_only,
            require_where: policy.require_where,
            deny_read: policy.deny_read.clone(),
            deny_write: policy.deny_write.clone(),
            allow_read: policy.allow_read.clone(),
            allow_write: policy.allow_write.clone(),
            deny_columns,
            deny_functions: policy.deny_functions.clone(),
            allow_functions: policy.allow_functions.clone(),
            guard_search_path: policy.guard_search_path,
            allow_unparsed: policy.allow_unparsed,
        }
    }

    /// Whether the policy requires read-only sessions (the proxy also opens them read-only).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether deciding needs the upstream catalog: relation or column rules.
    pub fn needs_catalog(&self) -> bool {
        !(self.deny_read.is_empty()
            && self.deny_write.is_empty()
            && self.allow_read.is_empty()
            && self.allow_write.is_empty()
            && self.deny_columns.is_empty())
    }

    fn deny(&self, reason: impl Into<String>, rule: &str, hint: Option<String>) -> Decision {
        Decision::Deny(Denial {
            policy: self.name.clone(),
            message: format!("policy '{}' denies {}", self.name, reason.into()),
            rule: rule.to_string(),
            hint,
        })
    }

    fn allowed_classes(&self) -> String {
        let classes: Vec<&str> = self.allow.iter().map(|c| c.as_str()).collect();
        format!("this policy allows {} statements", classes.join(", "))
    }
}

pub fn decide(principal: &Principal<'_>, request: &Request<'_>) -> Decision {
    decide_with_effects(principal, request).0
}

/// The decision, and for an allowed request what it changes for later ones.
pub fn decide_with_effects(
    principal: &Principal<'_>,
    request: &Request<'_>,
) -> (Decision, Effects) {
    let mut effects = Effects::default();
    let decision = decide_request(principal, request, &mut effects);
    if decision != Decision::Allow {
        effects = Effects {
            classes: std::mem::take(&mut effects.classes),
            relations: std::mem::take(&mut effects.relations),
            ..Effects::default()
        };
    }
    (decision, effects)
}

fn decide_request(
    principal: &Principal<'_>,
    request: &Request<'_>,
    effects: &mut Effects,
) -> Decision {
    let policy = principal.policy;
    let sql = match request {
        Request::Query(sql) | Request::Parse { query: sql, .. } => sql,
        Request::FunctionCall { oid } => {
            return policy.deny(
                format!("the fast-path function call of function OID {oid}"),
                "function_call",
                Some("call the function from SQL instead, e.g. SELECT f(...)".into()),
            )
        }
    };
    // Unknown until the analysis says otherwise.
    effects.session_state = true;
    let statements =
        match analyze(sql) {
            Ok(statements) => statements,
            Err(_) if policy.allow_unparsed => return Decision::Allow,
            Err(err) => return Decision::Deny(Denial {
                policy: policy.name.clone(),
                message: format!(
                    "pgbastion could not analyse this statement, so it was not run: {err}"
                ),
                rule: "unparsed".into(),
                hint: Some(
                    "rewrite the statement in a more common form, or ask for it to be supported"
                        .into(),
                ),
            }),
        };
    if let Request::Parse { .. } = request {
        if statements.len() > 1 {
            // PostgreSQL refuses this too; deciding only the first would be unsafe.
            return policy.deny(
                "more than one statement in a prepared statement",
                "multiple_statements",
                None,
            );
        }
    }
    let mut classes = BTreeSet::new();
    let mut relations = BTreeSet::new();
    for statement in &statements {
        classes.extend(statement.classes.iter().map(|c| c.as_str()));
        relations.extend(statement.reads.iter().chain(&statement.writes));
    }
    effects.session_state = statements.iter().any(leaves_session_state);
    effects.reads_earlier_sequence_values = reads_earlier_sequence_values(&statements);
    effects.sets_sequence_values = statements.iter().any(sets_sequence_values);
    effects.classes = classes.into_iter().collect();
    effects.relations = relations.into_iter().map(|r| r.to_string()).collect();
    for statement in &statements {
        let decision = decide_statement(principal, statement);
        if decision != Decision::Allow {
            return decision;
        }
        for path in statement.search_paths.iter().flatten() {
            for schema in path {
                if !effects.search_path.contains(schema) {
                    effects.search_path.push(schema.clone());
                }
            }
        }
        let ops = (statement.prepares.iter().cloned().map(PreparedOp::Prepare))
            .chain(statement.executes.iter().cloned().map(PreparedOp::Execute))
            .chain(
                statement
                    .deallocates
                    .iter()
                    .cloned()
                    .map(PreparedOp::Deallocate),
            );
        effects.prepared.extend(ops);
        if let Some(catalog) = principal.catalog {
            effects.unknown_relations |=
                statement.reads.iter().chain(&statement.writes).any(|name| {
                    !name
                        .candidates(principal.search_path)
                        .iter()
                        .any(|c| catalog.contains(c))
                });
        }
    }
    Decision::Allow
}

/// Functions whose effect outlives the transaction: settings, session advisory locks, the
/// random seed, remote connections. (`currval` and `lastval` read state rather than leave
/// it: see `reads_earlier_sequence_values`.)
const SESSION_FUNCTIONS: &[&str] = &[
    "set_config",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "setseed",
    "dblink_connect",
    "dblink_connect_u",
    "dblink_open",
];

/// Whether a statement may leave state behind after its transaction. Reads, writes and
/// transaction control do not, unless they call a function that does; every other class
/// (SET, LISTEN, PREPARE, DECLARE, DDL such as CREATE TEMP TABLE, DO, CALL, ...) may.
fn leaves_session_state(info: &StatementInfo) -> bool {
    info.classes.iter().any(|c| {
        !matches!(
            c,
            StatementClass::Read | StatementClass::Write | StatementClass::Transaction
        )
    }) || info
        .calls
        .iter()
        .any(|call| SESSION_FUNCTIONS.contains(&call.name.name.as_str()))
}

/// Whether a statement calling `currval` or `lastval` comes before any that could set
/// sequence values (a write, through a column default; `nextval`, `setval`). Within one
/// statement the order of evaluation is not known, so one that reads counts as reading
/// first (`INSERT ... VALUES (currval(...))` after an `INSERT` in the same request is fine;
/// on its own it reads another client's value).
fn reads_earlier_sequence_values(statements: &[StatementInfo]) -> bool {
    for info in statements {
        if calls(info, &["currval", "lastval"]) {
            return true;
        }
        if sets_sequence_values(info) {
            return false;
        }
    }
    false
}

fn sets_sequence_values(info: &StatementInfo) -> bool {
    info.classes.contains(&StatementClass::Write) || calls(info, &["nextval", "setval"])
}

fn calls(info: &StatementInfo, names: &[&str]) -> bool {
    info.calls
        .iter()
        .any(|call| names.contains(&call.name.name.as_str()))
}

const WRITING: &[StatementClass] = &[
    StatementClass::Write,
    StatementClass::Ddl,
    StatementClass::Dcl,
    StatementClass::Admin,
    StatementClass::Procedural,
];

fn decide_statement(principal: &Principal<'_>, info: &StatementInfo) -> Decision {
    let policy = principal.policy;
    for class in &info.classes {
        if *class == StatementClass::Transaction {
            continue;
        }
        if policy.read_only && WRITING.contains(class) {
            return policy.deny(
                format!("{} statements: it is read-only", class.as_str()),
                "read_only",
                Some(policy.allowed_classes()),
            );
        }
        if !policy.allow.contains(class) {
            return policy.deny(
                format!("{} statements", class.as_str()),
                &format!("class:{}", class.as_str()),
                Some(policy.allowed_classes()),
            );
        }
    }
    if policy.read_only && info.read_write {
        return policy.deny(
            "read-write transactions: it is read-only",
            "read_only",
            None,
        );
    }
    for setting in &info.settings {
        if let Some(decision) = guarded(policy, setting) {
            return decision;
        }
    }
    for encoding in &info.client_encodings {
        if !encoding.as_deref().is_some_and(safe_client_encoding) {
            return policy.deny(
                format!(
                    "setting client_encoding to {}",
                    encoding.as_deref().unwrap_or("a value that is not a literal")
                ),
                "guarded_setting",
                Some("in this encoding PostgreSQL could read a statement differently from pgbastion; use UTF8".into()),
            );
        }
    }
    if info.search_paths.iter().any(Option::is_none) {
        return policy.deny(
            "setting search_path to a value that is not a literal",
            "guarded_setting",
            Some("name the schemas literally: SET search_path TO a, b".into()),
        );
    }
    for call in &info.calls {
        if let Some(decision) = check_call(principal, call) {
            return decision;
        }
    }
    for name in &info.writes {
        // UPDATE pg_settings is SET by another name.
        if name
            .candidates(principal.search_path)
            .iter()
            .any(|c| c == "pg_catalog.pg_settings")
        {
            return policy.deny(
                "changing settings through pg_settings",
                "guarded_setting",
                Some("use SET; guarded settings cannot be changed at all".into()),
            );
        }
        if let Some(decision) = check_relation(principal, name, Access::Write, true) {
            return decision;
        }
    }
    for name in &info.reads {
        if let Some(decision) = check_relation(principal, name, Access::Read, true) {
            return decision;
        }
    }
    // A name that may be a CTE may also be the relation: deny rules apply, allow lists do not.
    for name in &info.shadowed {
        if let Some(decision) = check_relation(principal, name, Access::Read, false) {
            return decision;
        }
    }
    if let Some(decision) = check_columns(principal, info) {
        return decision;
    }
    if let (true, Some(verb)) = (policy.require_where, info.unfiltered) {
        return policy.deny(
            format!("{verb} without a WHERE clause"),
            "require_where",
            Some(
                "add a WHERE clause that references a column; WHERE true or 1 = 1 does not count"
                    .into(),
            ),
        );
    }
    Decision::Allow
}

fn guarded(policy: &CompiledPolicy, setting: &str) -> Option<Decision> {
    let guarded = always_guarded(setting)
        || (policy.guard_search_path && setting == "search_path")
        || (policy.read_only
            && matches!(
                setting,
                "default_transaction_read_only" | "transaction_read_only"
            ));
    guarded.then(|| {
        policy.deny(
            format!("changing the setting {setting}"),
            "guarded_setting",
            Some(
                "the session's identity and guarded settings come from your token and the policy"
                    .into(),
            ),
        )
    })
}

fn check_call(principal: &Principal<'_>, call: &crate::analyze::Call) -> Option<Decision> {
    let policy = principal.policy;
    let builtin = match &call.name.schema {
        None => true,
        Some(schema) => schema == "pg_catalog",
    };
    let display = format!("{}()", call.name);
    let listed = |entries: &[String]| {
        entries.iter().any(|entry| match entry.split_once('.') {
            Some(_) => call.name.candidates(principal.search_path).contains(entry),
            None => entry == &call.name.name,
        })
    };
    if listed(&policy.deny_functions) {
        return Some(policy.deny(format!("calling {display}"), "deny_functions", None));
    }
    if builtin && !listed(&policy.allow_functions) {
        if DANGEROUS.contains(&call.name.name.as_str()) {
            return Some(policy.deny(
                format!("calling {display}"),
                "dangerous_function",
                Some("it reaches outside PostgreSQL's privileges or runs SQL given as text".into()),
            ));
        }
        if call.name.name == "set_config" && call.has_args {
            return match &call.first_literal {
                Some(setting) => guarded(policy, &setting.to_ascii_lowercase()),
                None => Some(policy.deny(
                    "set_config() with a setting name that is not a literal",
                    "guarded_setting",
                    None,
                )),
            };
        }
    }
    None
}

#[derive(Clone, Copy)]
enum Access {
    Read,
    Write,
}

fn check_relation(
    principal: &Principal<'_>,
    name: &Name,
    access: Access,
    allow_lists: bool,
) -> Option<Decision> {
    let policy = principal.policy;
    let candidates = name.candidates(principal.search_path);
    let (deny, allow, verb, deny_rule, allow_rule) = match access {
        Access::Read => (
            &policy.deny_read,
            &policy.allow_read,
            "reading",
            "deny_read",
            "allow_read",
        ),
        Access::Write => (
            &policy.deny_write,
            &policy.allow_write,
            "writing to",
            "deny_write",
            "allow_write",
        ),
    };
    let denied = |relation: &str| deny.iter().any(|p| glob(p, relation));
    // An unqualified name is denied if any schema it could resolve to is denied...
    if let Some(hit) = candidates.iter().find(|c| denied(c)) {
        return Some(policy.deny(format!("{verb} {hit}"), deny_rule, None));
    }
    // ...and so is what it really reads: a view's relations, a table's inheritance tree.
    let existing: Vec<&String> = match principal.catalog {
        Some(catalog) => candidates.iter().filter(|c| catalog.contains(c)).collect(),
        None => Vec::new(),
    };
    if let Some(catalog) = principal.catalog {
        for candidate in &existing {
            if let Some(hit) = catalog
                .reaches(candidate)
                .into_iter()
                .find(|r| denied(&r.relation))
            {
                return Some(policy.deny(
                    format!("{verb} {} (through {})", hit.relation, hit.via),
                    deny_rule,
                    None,
                ));
            }
        }
    }
    if allow.is_empty() || !allow_lists {
        return None;
    }
    let allowed = |relation: &str| allow.iter().any(|p| glob(p, relation));
    let is_allowed = match principal.catalog {
        // Whichever existing relation the name resolves to must be allowed; a name the
        // catalog does not know (a temporary table, one created since) only if every schema
        // it could resolve to is.
        Some(_) if !existing.is_empty() => existing.iter().all(|c| allowed(c)),
        Some(_) => candidates.iter().all(|c| allowed(c)),
        // Policy tooling without a catalog: a schema it could resolve to is listed.
        None => candidates.iter().any(|c| allowed(c)),
    };
    if !is_allowed {
        let shown = existing
            .iter()
            .find(|c| !allowed(c))
            .map(|c| c.to_string())
            .or_else(|| candidates.last().cloned())
            .unwrap_or_default();
        return Some(policy.deny(
            format!("{verb} {shown}"),
            allow_rule,
            Some(format!(
                "this policy allows {verb} {} only",
                allow.join(", ")
            )),
        ));
    }
    None
}

/// Denied columns. Tables are matched conservatively: when a statement reads a table with
/// denied columns (or one of its inheritance tree), any `*`, any reference to a denied
/// column's name, and any whole-row reference to that table are refused. Through a view, the
/// columns the view's definition reads count; a view reading the whole row reads them all.
fn check_columns(principal: &Principal<'_>, info: &StatementInfo) -> Option<Decision> {
    let policy = principal.policy;
    if policy.deny_columns.is_empty() {
        return None;
    }
    let column_hint = Some(
        "name only the columns you need: *, whole-row references and conditions read a column too"
            .to_string(),
    );
    // Tables read by the statement that have denied columns: (name, table key, columns).
    let mut sensitive: Vec<(&Name, String, &BTreeSet<String>)> = Vec::new();
    for name in info.reads.iter().chain(&info.writes).chain(&info.shadowed) {
        for candidate in name.candidates(principal.search_path) {
            if let Some((key, columns)) = policy.deny_columns.get_key_value(&candidate) {
                sensitive.push((name, key.clone(), columns));
            }
            let Some(catalog) = principal.catalog else {
                continue;
            };
            if !catalog.contains(&candidate) {
                continue;
            }
            for reached in catalog.reaches(&candidate) {
                let Some((key, denied)) = policy.deny_columns.get_key_value(&reached.relation)
                else {
                    continue;
                };
                if !reached.by_view {
                    // A parent or child shares its columns with the table read.
                    sensitive.push((name, key.clone(), denied));
                    continue;
                }
                let hit = match &reached.columns {
                    Some(read) => read.intersection(denied).next(),
                    None => denied.iter().next(),
                };
                if let Some(column) = hit {
                    return Some(policy.deny(
                        format!("reading column {key}.{column} (through {})", reached.via),
                        "deny_columns",
                        Some(format!(
                            "{candidate} reads {key}.{column}; read the columns you need from a relation that does not"
                        )),
                    ));
                }
            }
        }
    }
    let (_, table, columns) = sensitive.first()?;
    let first_column = |cols: &BTreeSet<String>| cols.iter().next().cloned().unwrap_or_default();
    for wildcard in &info.wildcards {
        let hits_sensitive = match wildcard {
            None => true,
            Some(qualifier) => info
                .aliases
                .get(qualifier)
                .map(|n| sensitive.iter().any(|(s, _, _)| *s == n))
                .unwrap_or(true),
        };
        if hits_sensitive {
            return Some(policy.deny(
                format!("reading column {table}.{}", first_column(columns)),
                "deny_columns",
                column_hint,
            ));
        }
    }
    for parts in &info.columns {
        let last = parts.last().map(String::as_str).unwrap_or("");
        for (name, key, cols) in &sensitive {
            let qualifier_matches = match parts.len() {
                1 => true,
                _ => {
                    let qualifier = &parts[parts.len() - 2];
                    info.aliases.get(qualifier).is_none_or(|n| n == *name)
                }
            };
            if qualifier_matches && cols.contains(last) {
                return Some(policy.deny(
                    format!("reading column {key}.{last}"),
                    "deny_columns",
                    column_hint,
                ));
            }
            // A bare alias or table name is a whole-row reference: every column, denied ones included.
            if parts.len() == 1 && info.aliases.get(last).is_some_and(|n| n == *name) {
                return Some(policy.deny(
                    format!(
                        "reading column {key}.{} (a whole-row reference reads every column)",
                        first_column(cols)
                    ),
                    "deny_columns",
                    column_hint,
                ));
            }
        }
    }
    None
}
