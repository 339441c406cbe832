//! The audit file end to end: records chained across rotations and restarts, and verification
//! naming the first broken record.

use pgbastion_audit::{verify_files, Auditor, Event, Outcome, Record, Redactor};
use pgbastion_config::{Audit, AuditSink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

fn config(path: &Path, max_file_bytes: u64) -> Audit {
    Audit {
        sink: AuditSink::File,
        path: Some(path.to_path_buf()),
        max_file_bytes,
        ..Audit::default()
    }
}

fn redactor() -> Redactor {
    Arc::new(|text: &str| text.replace(|c: char| c.is_ascii_digit(), "#"))
}

async fn write(config: &Audit, records: usize) {
    let (auditor, writer) = Auditor::start(config, redactor()).unwrap();
    for i in 0..records {
        auditor
            .record(Record {
                time: SystemTime::now(),
                conn: i as u64 + 1,
                session: None,
                event: Event::Reload {
                    outcome: Outcome::Success,
                    error: Some(format!("record {i} {}", "x".repeat(200))),
                },
            })
            .await;
    }
    drop(auditor);
    tokio::task::spawn_blocking(move || writer.finish())
        .await
        .unwrap();
}

/// Rotated files oldest first, then the current file.
fn files(path: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<PathBuf> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p != path)
        .collect();
    rotated.sort();
    rotated.push(path.to_path_buf());
    rotated
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_holds_across_rotations_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let config = config(&path, 4096);
    write(&config, 40).await;
    // A restart continues the chain where the files end.
    write(&config, 25).await;
    let files = files(&path);
    assert!(files.len() >= 4, "rotated into {files:?}");
    for file in &files {
        assert!(std::fs::metadata(file).unwrap().len() <= 4096, "{file:?}");
    }
    let verified = verify_files(&files).unwrap();
    assert_eq!(verified.records, 65);
    assert!(verified.from_start);
    // A suffix of the files verifies too, as a continuation.
    let tail = verify_files(&files[1..]).unwrap();
    assert!(!tail.from_start);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_names_the_first_changed_removed_or_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write(&config(&path, 1024 * 1024), 10).await;
    let original = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    let at = |n: usize| format!("{}:{n}: ", path.display());

    let edited = original.replacen("record 4 ", "record 9 ", 1);
    std::fs::write(&path, edited).unwrap();
    let err = verify_files(std::slice::from_ref(&path)).unwrap_err();
    assert!(err.starts_with(&at(6)), "{err}");

    let mut removed = lines.clone();
    removed.remove(2);
    std::fs::write(&path, removed.join("\n")).unwrap();
    let err = verify_files(std::slice::from_ref(&path)).unwrap_err();
    assert!(err.starts_with(&at(3)), "{err}");

    let mut reordered = lines.clone();
    reordered.swap(7, 8);
    std::fs::write(&path, reordered.join("\n")).unwrap();
    let err = verify_files(std::slice::from_ref(&path)).unwrap_err();
    assert!(err.starts_with(&at(8)), "{err}");

    std::fs::write(&path, &original).unwrap();
    assert_eq!(
        verify_files(std::slice::from_ref(&path)).unwrap().records,
        10
    );
}

fn statement(text: &str, redact: bool) -> Record {
    Record {
        time: SystemTime::now(),
        conn: 1,
        session: None,
        event: Event::Statement(pgbastion_audit::StatementRecord {
            kind: "query",
            text: text.into(),
            redact,
            statement: None,
            classes: Arc::from(["read"]),
            relations: Arc::from([]),
            decision: "allow",
            policy: "p".into(),
            policy_version: "v".into(),
            rule: None,
            message: None,
            status: pgbastion_audit::StatementStatus::Ok,
            duration_us: 1,
            rows: Some(1),
            sqlstate: None,
        }),
    }
}

/// The texts of the statement records in `path`.
async fn texts_written(config: &Audit, records: Vec<Record>) -> Vec<String> {
    let (auditor, writer) = Auditor::start(config, redactor()).unwrap();
    for record in records {
        auditor.record(record).await;
    }
    drop(auditor);
    tokio::task::spawn_blocking(move || writer.finish())
        .await
        .unwrap();
    std::fs::read_to_string(config.path.as_ref().unwrap())
        .unwrap()
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            value["text"].as_str().unwrap().to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_text_is_redacted_unless_configured_full() {
    let dir = tempfile::tempdir().unwrap();
    let redacted = config(&dir.path().join("redacted.log"), 1 << 20);
    assert_eq!(
        texts_written(
            &redacted,
            vec![
                statement("SELECT 42", true),
                // Redacted by the session already (with its decision key): kept as handed in.
                statement("SELECT $0 /* pre */", false),
            ]
        )
        .await,
        ["SELECT ##", "SELECT $0 /* pre */"]
    );
    let full = Audit {
        statement_text: pgbastion_config::StatementText::Full,
        ..config(&dir.path().join("full.log"), 1 << 20)
    };
    assert_eq!(
        texts_written(&full, vec![statement("SELECT 42", true)]).await,
        ["SELECT 42"]
    );
}
