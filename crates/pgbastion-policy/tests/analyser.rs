//! The statement analyser, table-driven: tests/corpus/analyser.toml holds SQL texts and what
//! `analyze` must find in each (classes, relations read and written, functions called, settings
//! changed, an UPDATE or DELETE without a filtering WHERE, a READ WRITE transaction), or that it
//! must refuse the text. Every mismatch is collected and reported at once.

use pgbastion_policy::{analyze, StatementInfo};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::Path;

#[derive(Deserialize)]
struct Corpus {
    case: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    sql: String,
    /// Required unless `error`: the union of the statements' classes.
    classes: Option<Vec<String>>,
    /// Required unless `error`: the union of the relations read, as `Name` displays them.
    reads: Option<Vec<String>>,
    /// Required unless `error`: the union of the relations written.
    writes: Option<Vec<String>>,
    /// Bare names that may be a CTE or the relation (deny rules apply to them); checked when
    /// present.
    shadowed: Option<Vec<String>>,
    /// The union of the functions called, by name; checked when present.
    calls: Option<Vec<String>>,
    /// The union of the settings changed; checked when present.
    settings: Option<Vec<String>>,
    /// "UPDATE", "DELETE" or "": the first statement's `unfiltered`; checked when present.
    unfiltered: Option<String>,
    /// Whether any statement asks for a READ WRITE transaction; checked when present.
    read_write: Option<bool>,
    /// The text must be refused; nothing else is checked.
    #[serde(default)]
    error: bool,
}

/// One field of the analysis, compared as a set.
fn compare(
    problems: &mut Vec<String>,
    field: &str,
    expected: &[String],
    actual: impl IntoIterator<Item = String>,
) {
    let expected: BTreeSet<String> = expected.iter().cloned().collect();
    let actual: BTreeSet<String> = actual.into_iter().collect();
    if expected != actual {
        problems.push(format!("{field}: expected {expected:?}, found {actual:?}"));
    }
}

/// What differs between the case and the analysis of its text.
fn mismatches(case: &Case, statements: &[StatementInfo]) -> Vec<String> {
    let mut problems = Vec::new();
    let (Some(classes), Some(reads), Some(writes)) = (&case.classes, &case.reads, &case.writes)
    else {
        problems.push("the case needs classes, reads and writes (or error = true)".to_string());
        return problems;
    };
    compare(
        &mut problems,
        "classes",
        classes,
        statements
            .iter()
            .flat_map(|s| s.classes.iter().map(|c| c.as_str().to_string())),
    );
    compare(
        &mut problems,
        "reads",
        reads,
        statements
            .iter()
            .flat_map(|s| s.reads.iter().map(ToString::to_string)),
    );
    compare(
        &mut problems,
        "writes",
        writes,
        statements
            .iter()
            .flat_map(|s| s.writes.iter().map(ToString::to_string)),
    );
    if let Some(shadowed) = &case.shadowed {
        compare(
            &mut problems,
            "shadowed",
            shadowed,
            statements
                .iter()
                .flat_map(|s| s.shadowed.iter().map(ToString::to_string)),
        );
    }
    if let Some(calls) = &case.calls {
        compare(
            &mut problems,
            "calls",
            calls,
            statements
                .iter()
                .flat_map(|s| s.calls.iter().map(|c| c.name.to_string())),
        );
    }
    if let Some(settings) = &case.settings {
        compare(
            &mut problems,
            "settings",
            settings,
            statements.iter().flat_map(|s| s.settings.iter().cloned()),
        );
    }
    if let Some(expected) = &case.unfiltered {
        let found = statements.first().and_then(|s| s.unfiltered).unwrap_or("");
        if expected != found {
            problems.push(format!(
                "unfiltered: expected {expected:?}, found {found:?}"
            ));
        }
    }
    if let Some(expected) = case.read_write {
        let found = statements.iter().any(|s| s.read_write);
        if expected != found {
            problems.push(format!("read_write: expected {expected}, found {found}"));
        }
    }
    problems
}

#[test]
fn the_analyser_finds_what_each_corpus_case_says() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus: Corpus =
        toml::from_str(&std::fs::read_to_string(root.join("tests/corpus/analyser.toml")).unwrap())
            .expect("analyser.toml");
    let mut failures = Vec::new();
    for (index, case) in corpus.case.iter().enumerate() {
        let number = index + 1;
        let sql = &case.sql;
        let problems = match (analyze(sql), case.error) {
            (Err(_), true) => continue,
            (Ok(statements), true) => vec![format!(
                "expected the text to be refused, but it was analysed ({} statements)",
                statements.len()
            )],
            (Err(err), false) => vec![format!("refused: {err}")],
            (Ok(statements), false) => mismatches(case, &statements),
        };
        if !problems.is_empty() {
            failures.push(format!(
                "case {number}: {sql:?}\n    {}",
                problems.join("\n    ")
            ));
        }
    }
    let total = corpus.case.len();
    println!(
        "analyser corpus: {} of {total} cases do not match",
        failures.len()
    );
    assert!(total >= 200, "the corpus shrank to {total} cases");
    assert!(
        failures.is_empty(),
        "{} of {total} cases do not match:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
