//! `pgbastion policy replay` and `pgbastion audit verify` as an operator runs them.

use std::path::Path;
use std::process::Command;

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/demo.toml");

fn pgbastion(args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_pgbastion"))
        .args(args)
        .output()
        .expect("pgbastion runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

fn statement(user: &str, group: &str, text: &str, decision: &str) -> String {
    serde_json::json!({
        "time": "2026-11-29T08:00:00Z", "seq": 0, "prev": "", "conn": 1,
        "session": {
            "user": user, "subject": user, "issuer": "http://127.0.0.1:8080",
            "groups": [group], "role": "x", "database": "demo"
        },
        "event": "statement", "kind": "query", "text": text, "decision": decision,
    })
    .to_string()
}

fn write(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn replay_reports_per_identity_what_a_policy_change_would_change() {
    let dir = tempfile::tempdir().unwrap();
    let stricter = dir.path().join("stricter.toml");
    let demo = std::fs::read_to_string(DEMO).unwrap();
    let changed = demo.replace(
        "deny_read = [\"public.secrets\"]",
        "deny_read = [\"public.secrets\", \"public.orders\"]",
    );
    assert_ne!(demo, changed);
    std::fs::write(&stricter, changed).unwrap();
    let audit = dir.path().join("audit.log");
    write(
        &audit,
        &[
            statement(
                "alice",
                "analysts",
                "SELECT * FROM orders WHERE id = $0",
                "allow",
            ),
            statement("alice", "analysts", "SELECT name FROM customers", "allow"),
            statement("alice", "analysts", "SELECT * FROM secrets", "deny"),
            statement(
                "bob",
                "engineers",
                "UPDATE orders SET total = $0 WHERE id = $0",
                "allow",
            ),
            r#"{"event":"authentication","outcome":"success"}"#.to_string(),
        ],
    );
    let audit = audit.to_str().unwrap();
    let stricter = stricter.to_str().unwrap();
    for baseline in [None, Some(DEMO)] {
        let mut args = vec!["policy", "replay", "--config", stricter];
        if let Some(baseline) = baseline {
            args.extend(["--baseline", baseline]);
        }
        args.push(audit);
        let (code, out) = pgbastion(&args);
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains("alice: 3 statements, 1 newly denied, 0 newly allowed"),
            "{out}"
        );
        assert!(
            out.contains("  newly denied: SELECT * FROM orders WHERE id = $0"),
            "{out}"
        );
        assert!(!out.contains("bob:"), "{out}");
        assert!(
            out.contains("replayed 4 statements of 2 identities: 1 decisions would change"),
            "{out}"
        );
    }
    let (code, _) = pgbastion(&[
        "policy",
        "replay",
        "--config",
        stricter,
        "--allow-changes",
        audit,
    ]);
    assert_eq!(code, 0);
    let (code, out) = pgbastion(&["policy", "replay", "--config", DEMO, audit]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn audit_verify_names_the_first_broken_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write(
        &path,
        &[
            format!(
                r#"{{"time":"t","seq":0,"prev":"{}","event":"reload"}}"#,
                "0".repeat(64)
            ),
            format!(
                r#"{{"time":"t","seq":1,"prev":"{}","event":"reload"}}"#,
                "a".repeat(64)
            ),
        ],
    );
    let (code, out) = pgbastion(&["audit", "verify", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        out.contains("audit.log:2: record 1 is not chained to the record before it"),
        "{out}"
    );
}
