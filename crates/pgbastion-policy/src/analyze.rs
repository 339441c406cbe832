//! Statement analysis: SQL text in, for each statement what it is (classes), what it reads
//! and writes, which functions it calls, which columns and settings it touches.
//! Parsing uses sqlparser's PostgreSQL dialect; anything it cannot parse is an error, and the
//! caller denies it.

use crate::fallback;
use crate::names::{ident, Name};
use pgbastion_config::StatementClass;
use sqlparser::ast::{
    CopySource, CopyTarget, Expr, FromTable, FunctionArg, FunctionArgExpr, FunctionArguments,
    ObjectType, Query, Reset, Select, SelectItem, SelectItemQualifiedWildcardKind, Set, SetExpr,
    Statement, TableFactor, TableObject, TransactionAccessMode, TransactionMode, Value, Visit,
    Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;

/// One function call found in a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub name: Name,
    /// The first argument when it is a string literal (set_config's setting name).
    pub first_literal: Option<String>,
    /// The second argument when it is a string literal (set_config's value).
    pub second_literal: Option<String>,
    /// Whether a first argument exists at all.
    pub has_args: bool,
}

/// What one statement does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatementInfo {
    pub classes: BTreeSet<StatementClass>,
    pub reads: BTreeSet<Name>,
    pub writes: BTreeSet<Name>,
    pub calls: Vec<Call>,
    /// Column references as written: `col`, `t.col`, `s.t.col` (normalised parts).
    pub columns: Vec<Vec<String>>,
    /// `*` (None) and `q.*` (Some(q)) in select lists and as expressions.
    pub wildcards: Vec<Option<String>>,
    /// Bare names that match a CTE of the statement. Usually they mean the CTE, but a CTE is
    /// not visible everywhere in the statement (in its own body, in earlier siblings, outside
    /// its subquery), so deny rules still apply to them; allow lists do not.
    pub shadowed: BTreeSet<Name>,
    /// Table alias (or bare table name) -> relation, for qualified columns and whole-row references.
    pub aliases: BTreeMap<String, Name>,
    /// Settings the statement changes (SET, RESET, SET ROLE, ...), lower-cased.
    pub settings: Vec<String>,
    /// "UPDATE", "DELETE" or "MERGE" when it has no WHERE (ON, for MERGE) referencing a column.
    pub unfiltered: Option<&'static str>,
    /// BEGIN or SET TRANSACTION asking for READ WRITE.
    pub read_write: bool,
    /// search_path values the statement sets (SET, SET SCHEMA, set_config), schemas normalised;
    /// None for a value the analysis cannot read (an expression), which is denied.
    pub search_paths: Vec<Option<Vec<String>>>,
    /// client_encoding values the statement sets (SET, SET NAMES, set_config); None for a
    /// value that is not a literal.
    pub client_encodings: Vec<Option<String>>,
    /// Prepared statements the statement creates (PREPARE name), names normalised.
    pub prepares: Vec<String>,
    /// Prepared statements it runs (EXECUTE name).
    pub executes: Vec<String>,
    /// Prepared statements it removes (DEALLOCATE name); None: DEALLOCATE ALL.
    pub deallocates: Vec<Option<String>>,
}

/// Parses `sql` and analyses every statement in it.
pub fn analyze(sql: &str) -> Result<Vec<StatementInfo>, String> {
    if digit_dollar_tag(sql) {
        // `$1abc$`: a dollar-quote tag to sqlparser, a parameter `$1` with an alias to
        // PostgreSQL 14 and older, which then run what the proxy took for a string.
        return Err("a dollar-quote tag may not start with a digit".into());
    }
    let parsed = if fallback::has_unicode_identifier(sql) {
        let tokens = fallback::tokens(sql)?;
        Parser::new(&PostgreSqlDialect {})
            .with_tokens(tokens)
            .parse_statements()
    } else {
        Parser::parse_sql(&PostgreSqlDialect {}, sql)
    };
    match parsed {
        Ok(statements) => Ok(statements.iter().map(analyze_statement).collect()),
        Err(err) => {
            // A few forms real clients send are beyond sqlparser; see `fallback`.
            fallback::analyze_pieces(sql).ok_or_else(|| err.to_string())
        }
    }
}

pub(crate) fn analyze_statement(statement: &Statement) -> StatementInfo {
    let mut collector = Collector {
        info: StatementInfo::default(),
        ctes: BTreeSet::new(),
    };
    let _ = statement.visit(&mut collector);
    let mut info = collector.info;
    // A bare name that is a CTE of the statement is not a relation.
    let ctes = collector.ctes;
    let (shadowed, reads): (BTreeSet<Name>, BTreeSet<Name>) = std::mem::take(&mut info.reads)
        .into_iter()
        .partition(|n| n.schema.is_none() && ctes.contains(&n.name));
    info.reads = reads;
    info.shadowed = shadowed;
    // Class of the top-level statement (nested DML was classed while visiting).
    top_level(statement, &mut info);
    for call in &info.calls {
        let set_config = call.name.name == "set_config"
            && call
                .name
                .schema
                .as_deref()
                .is_none_or(|s| s == "pg_catalog");
        if set_config
            && call
                .first_literal
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case("search_path"))
        {
            let path = call.second_literal.as_deref().map(path_from_string);
            info.search_paths.push(path);
        }
        if set_config
            && call
                .first_literal
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case("client_encoding"))
        {
            info.client_encodings.push(call.second_literal.clone());
        }
    }
    if info.classes.is_empty() {
        info.classes.insert(StatementClass::Admin);
    }
    info
}

/// Whether the text holds `$`, a digit, letters/digits/underscores and `$`.
fn digit_dollar_tag(sql: &str) -> bool {
    let bytes = sql.as_bytes();
    bytes.windows(2).enumerate().any(|(i, w)| {
        w[0] == b'$'
            && w[1].is_ascii_digit()
            && bytes[i + 1..]
                .iter()
                .find(|b| !(b.is_ascii_alphanumeric() || **b == b'_'))
                == Some(&b'$')
    })
}

/// Classes that depend on the statement as a whole rather than on its parts.
fn top_level(statement: &Statement, info: &mut StatementInfo) {
    use StatementClass::*;
    let class = match statement {
        Statement::Query(_) => Read,
        Statement::Explain {
            analyze,
            options,
            statement,
            ..
        } => {
            // PostgreSQL's grammar accepts the British spelling too.
            let analyze = *analyze
                || options
                    .iter()
                    .flatten()
                    .any(|o| matches!(ident(&o.name).as_str(), "analyze" | "analyse"));
            if analyze {
                // The statement runs: it is everything it would be on its own.
                top_level(statement, info);
            } else {
                // Without ANALYZE nothing runs: what the inner statement would do is not done.
                info.classes.clear();
                info.writes.clear();
                // But EXPLAIN EXECUTE plans a prepared statement, which must be one the
                // session may run (under transaction pooling, its own).
                if let Statement::Execute {
                    name: Some(name), ..
                } = statement.as_ref()
                {
                    if let Some(name) = Name::from_object(name) {
                        info.executes.push(name.name);
                    }
                }
            }
            Read
        }
        Statement::ExplainTable { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. } => Read,
        Statement::Fetch { .. } | Statement::Close { .. } => Read,
        Statement::Insert(_)
        | Statement::Update(_)
        | Statement::Delete(_)
        | Statement::Merge(_) => Write,
        Statement::Truncate(truncate) => {
            for target in &truncate.table_names {
                if let Some(name) = Name::from_object(&target.name) {
                    info.writes.insert(name);
                }
            }
            Write
        }
        Statement::Copy {
            source, to, target, ..
        } => {
            let table = match source {
                CopySource::Table { table_name, .. } => Name::from_object(table_name),
                CopySource::Query(_) => None,
            };
            match (to, target) {
                (true, CopyTarget::Stdout) => {
                    info.reads.extend(table);
                    Read
                }
                (false, CopyTarget::Stdin) => {
                    info.writes.extend(table);
                    Write
                }
                // Server-side files and programs: the server's filesystem and shell. COPY FROM
                // STDOUT means the client too, as FROM STDIN does.
                _ => {
                    if *to {
                        info.reads.extend(table);
                    } else {
                        info.writes.extend(table);
                    }
                    Admin
                }
            }
        }
        Statement::CreateTable(create) => {
            if create.query.is_some() {
                info.classes.insert(Write);
                info.writes.extend(Name::from_object(&create.name));
            }
            Ddl
        }
        Statement::StartTransaction { modes, .. }
        | Statement::Set(Set::SetTransaction { modes, .. }) => {
            info.read_write |= modes.iter().any(|m| {
                matches!(
                    m,
                    TransactionMode::AccessMode(TransactionAccessMode::ReadWrite)
                )
            });
            // SET SESSION CHARACTERISTICS AS TRANSACTION ...: the session's defaults.
            match statement {
                Statement::Set(Set::SetTransaction { session: true, .. }) => Session,
                _ => Transaction,
            }
        }
        Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. } => Transaction,
        Statement::Set(set) => {
            settings_of(set, &mut info.settings);
            if info.settings.iter().any(|s| s == "client_encoding") {
                let value = match set {
                    Set::SingleAssignment { values, .. } => match values.as_slice() {
                        [Expr::Identifier(i)] => Some(i.value.clone()),
                        [other] => literal_string(other),
                        _ => None,
                    },
                    Set::SetNames { charset_name, .. } => Some(charset_name.value.clone()),
                    _ => None,
                };
                info.client_encodings.push(value);
            }
            if info.settings.iter().any(|s| s == "search_path") {
                let path = match set {
                    Set::SingleAssignment { values, .. } => path_from_values(values),
                    _ => None,
                };
                info.search_paths.push(path);
            }
            Session
        }
        Statement::Reset(reset) => {
            match &reset.reset {
                Reset::ALL => {}
                Reset::SessionAuthorization => info.settings.push("session_authorization".into()),
                Reset::ConfigurationParameter(name) => info.settings.push(setting_name(name)),
            }
            Session
        }
        Statement::Discard { .. } => Session,
        // UNLISTEN only stops notifications: clients reset sessions with it.
        Statement::UNLISTEN { .. } => Session,
        Statement::LISTEN { .. } | Statement::NOTIFY { .. } => Listen,
        Statement::Prepare { name, .. } => {
            info.prepares.push(ident(name));
            Prepared
        }
        Statement::Execute { name, .. } => {
            if let Some(name) = name.as_ref().and_then(Name::from_object) {
                info.executes.push(name.name);
            }
            Prepared
        }
        Statement::Deallocate { name, .. } => {
            let all = name.quote_style.is_none() && name.value.eq_ignore_ascii_case("all");
            info.deallocates.push((!all).then(|| ident(name)));
            Prepared
        }
        Statement::Declare { .. } => Prepared,
        Statement::Call(function) => {
            if let Some(name) = Name::from_object(&function.name) {
                let args = match &function.args {
                    FunctionArguments::List(list) => list.args.as_slice(),
                    _ => &[],
                };
                info.calls.push(call(name, args));
            }
            Procedural
        }
        Statement::Grant(_)
        | Statement::Revoke(_)
        | Statement::GrantRole(_)
        | Statement::RevokeRole(_)
        | Statement::CreateRole(_)
        | Statement::AlterRole { .. }
        | Statement::CreateUser(_)
        | Statement::AlterUser(_) => Dcl,
        Statement::Drop {
            object_type: ObjectType::Role | ObjectType::User,
            ..
        } => Dcl,
        Statement::Vacuum(_) | Statement::Analyze(_) | Statement::Load { .. } => Admin,
        other => {
            // Everything else is schema work or administration; unknown means admin.
            let text = other.to_string();
            let first = text
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            let upper = text.to_ascii_uppercase();
            let words: Vec<&str> = upper.split_whitespace().take(3).collect();
            match (first.as_str(), words.get(1).copied(), words.get(2).copied()) {
                // Privileges and roles by other names.
                ("ALTER", Some("DEFAULT"), Some("PRIVILEGES")) => Dcl,
                ("CREATE" | "ALTER" | "DROP", Some("GROUP" | "ROLE" | "USER"), _) => Dcl,
                ("CREATE" | "ALTER" | "DROP" | "COMMENT" | "REFRESH", _, _) => Ddl,
                _ => Admin,
            }
        }
    };
    info.classes.insert(class);
}

fn setting_name(name: &sqlparser::ast::ObjectName) -> String {
    let name = name
        .0
        .iter()
        .map(|part| match part {
            // PostgreSQL matches setting names case-insensitively, quoted or not.
            sqlparser::ast::ObjectNamePart::Identifier(i) => i.value.to_ascii_lowercase(),
            sqlparser::ast::ObjectNamePart::Function(_) => String::new(),
        })
        .collect::<Vec<_>>()
        .join(".");
    // SET SCHEMA 'x' is PostgreSQL's spelling of SET search_path TO 'x'.
    match name.as_str() {
        "schema" => "search_path".into(),
        _ => name,
    }
}

/// The schemas of `SET search_path TO a, "B", 'c'`: identifiers as PostgreSQL folds them,
/// string literals as they are; DEFAULT and anything else adds nothing readable. None when a
/// value is an expression the proxy cannot evaluate.
fn path_from_values(values: &[Expr]) -> Option<Vec<String>> {
    let mut path = Vec::new();
    for value in values {
        match value {
            Expr::Identifier(i) => path.push(ident(i)),
            other => {
                let text = literal_string(other)?;
                // A quoted value is one schema name to SET, but set_config reads a list:
                // count both readings, the union is what may be searched.
                path.push(text.clone());
                path.extend(path_from_string(&text));
            }
        }
    }
    Some(path)
}

/// The schemas of a search_path given as one string ('a, "B"'), parsed as PostgreSQL's
/// SplitIdentifierString does: commas separate, double quotes keep case, the rest folds.
pub fn path_from_string(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let Some(&first) = chars.peek() else { break };
        let mut name = String::new();
        if first == '"' {
            chars.next();
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        name.push('"');
                    } else {
                        break;
                    }
                } else {
                    name.push(c);
                }
            }
            while chars.peek().is_some_and(|c| *c != ',') {
                chars.next();
            }
            out.push(name);
        } else {
            while chars.peek().is_some_and(|c| *c != ',') {
                name.push(chars.next().unwrap_or_default());
            }
            out.push(ident(&sqlparser::ast::Ident::new(name.trim())));
        }
    }
    out
}

fn settings_of(set: &Set, out: &mut Vec<String>) {
    match set {
        Set::SingleAssignment { variable, .. } => out.push(setting_name(variable)),
        Set::ParenthesizedAssignments { variables, .. } => {
            out.extend(variables.iter().map(setting_name))
        }
        Set::MultipleAssignments { assignments } => {
            out.extend(assignments.iter().map(|a| setting_name(&a.name)))
        }
        Set::SetSessionAuthorization(_) => out.push("session_authorization".into()),
        Set::SetRole { .. } => out.push("role".into()),
        Set::SetTimeZone { .. } => out.push("timezone".into()),
        Set::SetNames { .. } => out.push("client_encoding".into()),
        Set::SetSessionParam(_) => out.push("session_param".into()),
        #[allow(unreachable_patterns)]
        _ => out.push("unknown".into()),
    }
}

struct Collector {
    info: StatementInfo,
    ctes: BTreeSet<String>,
}

impl Visitor for Collector {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.ctes.insert(ident(&cte.alias.name));
            }
        }
        self.select_items(&query.body);
        self.table_commands(&query.body);
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        if let Some(into) = &select.into {
            // SELECT INTO creates a table from the result.
            self.info.classes.insert(StatementClass::Ddl);
            self.info.classes.insert(StatementClass::Write);
            for target in &into.targets {
                let parts: Vec<String> = match target {
                    Expr::Identifier(i) => vec![ident(i)],
                    Expr::CompoundIdentifier(parts) => parts.iter().map(ident).collect(),
                    _ => continue,
                };
                let name = match parts.as_slice() {
                    [name] => Name {
                        schema: None,
                        name: name.clone(),
                    },
                    [.., schema, name] => Name {
                        schema: Some(schema.clone()),
                        name: name.clone(),
                    },
                    [] => continue,
                };
                self.info.writes.insert(name);
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            TableFactor::Table {
                name, alias, args, ..
            } => {
                let Some(name) = Name::from_object(name) else {
                    return ControlFlow::Continue(());
                };
                if args.is_some() {
                    // A set-returning function in FROM, e.g. generate_series(1, 3).
                    self.info.calls.push(Call {
                        name,
                        first_literal: None,
                        second_literal: None,
                        has_args: true,
                    });
                } else {
                    let key = match alias {
                        Some(alias) => ident(&alias.name),
                        None => name.name.clone(),
                    };
                    self.info.aliases.insert(key, name.clone());
                    self.info.reads.insert(name);
                }
            }
            TableFactor::Function { name, args, .. } => {
                if let Some(name) = Name::from_object(name) {
                    self.info.calls.push(call(name, args));
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        match expr {
            Expr::Identifier(i) => self.info.columns.push(vec![ident(i)]),
            Expr::CompoundIdentifier(parts) => {
                self.info.columns.push(parts.iter().map(ident).collect())
            }
            Expr::Wildcard(_) => self.info.wildcards.push(None),
            Expr::QualifiedWildcard(name, _) => self
                .info
                .wildcards
                .push(Name::from_object(name).map(|n| n.name)),
            Expr::Function(function) => {
                if let Some(name) = Name::from_object(&function.name) {
                    // NOTIFY by another name.
                    if name.name == "pg_notify"
                        && name.schema.as_deref().is_none_or(|s| s == "pg_catalog")
                    {
                        self.info.classes.insert(StatementClass::Listen);
                    }
                    let args = match &function.args {
                        FunctionArguments::List(list) => list.args.as_slice(),
                        _ => &[],
                    };
                    self.info.calls.push(call(name, args));
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        // Every data-modifying statement, at the top or nested in a CTE or PREPARE.
        match statement {
            Statement::Insert(insert) => {
                self.info.classes.insert(StatementClass::Write);
                if let TableObject::TableName(name) = &insert.table {
                    if let Some(name) = Name::from_object(name) {
                        if let Some(alias) = &insert.table_alias {
                            self.info.aliases.insert(ident(&alias.alias), name.clone());
                        }
                        // RETURNING and ON CONFLICT DO UPDATE read the table's rows.
                        if insert.returning.is_some() || insert.on.is_some() {
                            self.info.reads.insert(name.clone());
                        }
                        self.info.writes.insert(name);
                    }
                }
            }
            Statement::Update(update) => {
                self.info.classes.insert(StatementClass::Write);
                self.write_target(&update.table.relation);
                if !filters(update.selection.as_ref()) {
                    self.info.unfiltered = Some("UPDATE");
                }
            }
            Statement::Delete(delete) => {
                self.info.classes.insert(StatementClass::Write);
                let tables = match &delete.from {
                    FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => t,
                };
                for table in tables {
                    self.write_target(&table.relation);
                }
                if !filters(delete.selection.as_ref()) {
                    self.info.unfiltered = Some("DELETE");
                }
            }
            Statement::Merge(merge) => {
                self.info.classes.insert(StatementClass::Write);
                self.write_target(&merge.table);
                // ON true matches every row: as unfiltered as an UPDATE without WHERE.
                if !filters(Some(&merge.on)) {
                    self.info.unfiltered = Some("MERGE");
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

impl Collector {
    /// The target of UPDATE/DELETE/MERGE is written, and also read (its rows are scanned).
    fn write_target(&mut self, factor: &TableFactor) {
        if let TableFactor::Table { name, .. } = factor {
            if let Some(name) = Name::from_object(name) {
                self.info.reads.insert(name.clone());
                self.info.writes.insert(name);
            }
        }
    }

    /// `TABLE x` inside a query (a subquery, a CTE, a UNION branch): `SELECT * FROM x`.
    fn table_commands(&mut self, body: &SetExpr) {
        match body {
            SetExpr::Table(table) => {
                if let Some(name) = &table.table_name {
                    let name = Name {
                        schema: table.schema_name.as_ref().map(ident),
                        name: ident(name),
                    };
                    self.info.wildcards.push(None);
                    self.info.aliases.insert(name.name.clone(), name.clone());
                    self.info.reads.insert(name);
                }
            }
            SetExpr::SetOperation { left, right, .. } => {
                self.table_commands(left);
                self.table_commands(right);
            }
            _ => {}
        }
    }

    fn select_items(&mut self, body: &SetExpr) {
        match body {
            SetExpr::Select(select) => {
                for item in &select.projection {
                    match item {
                        SelectItem::Wildcard(_) => self.info.wildcards.push(None),
                        SelectItem::QualifiedWildcard(kind, _) => {
                            let qualifier = match kind {
                                SelectItemQualifiedWildcardKind::ObjectName(name) => {
                                    Name::from_object(name).map(|n| n.name)
                                }
                                // `(expr).*` expands a composite value: treat as unqualified.
                                _ => None,
                            };
                            self.info.wildcards.push(qualifier);
                        }
                        _ => {}
                    }
                }
            }
            SetExpr::SetOperation { left, right, .. } => {
                self.select_items(left);
                self.select_items(right);
            }
            _ => {}
        }
    }
}

fn call(name: Name, args: &[FunctionArg]) -> Call {
    let literal = |index: usize| {
        args.get(index).and_then(|arg| match arg {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(expr)) => literal_string(expr),
            FunctionArg::Named {
                arg: FunctionArgExpr::Expr(expr),
                ..
            } => literal_string(expr),
            _ => None,
        })
    };
    Call {
        name,
        first_literal: literal(0),
        second_literal: literal(1),
        has_args: !args.is_empty(),
    }
}

/// The text of a string literal in any of PostgreSQL's spellings.
fn literal_string(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s)
            | Value::EscapedStringLiteral(s)
            | Value::UnicodeStringLiteral(s)
            | Value::NationalStringLiteral(s) => Some(s.clone()),
            Value::DollarQuotedString(d) => Some(d.value.clone()),
            _ => None,
        },
        Expr::Nested(inner) => literal_string(inner),
        Expr::Cast { expr, .. } => literal_string(expr),
        _ => None,
    }
}

/// Whether a WHERE clause really filters: it must reference at least one column.
/// `WHERE true`, `WHERE 1 = 1` and `WHERE 'a' = 'a'` do not.
fn filters(selection: Option<&Expr>) -> bool {
    struct Columns(bool);
    impl Visitor for Columns {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            if matches!(expr, Expr::Identifier(_) | Expr::CompoundIdentifier(_)) {
                self.0 = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    }
    let Some(selection) = selection else {
        return false;
    };
    let mut columns = Columns(false);
    let _ = selection.visit(&mut columns);
    columns.0
}
