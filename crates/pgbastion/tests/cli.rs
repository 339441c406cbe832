//! The command line as an operator uses it: check, policy explain, policy test, --version.

use std::path::PathBuf;
use std::process::{Command, Output};

fn pgbastion(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgbastion"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("the binary runs")
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_demo_policy_cases_pass() {
    let output = pgbastion(&[
        "policy",
        "test",
        "--config",
        "config/demo.toml",
        "config/demo-policy-tests.toml",
    ]);
    assert!(output.status.success(), "{}", stdout(&output));
    assert!(
        stdout(&output).contains("10 passed, 0 failed"),
        "{}",
        stdout(&output)
    );
}

#[test]
fn a_policy_case_that_no_longer_holds_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("cases.toml");
    std::fs::write(
        &cases,
        r#"
[[cases]]
claims = { preferred_username = "alice", groups = ["analysts"] }
sql = "SELECT * FROM secrets"
expect = "allow"
"#,
    )
    .unwrap();
    let output = pgbastion(&[
        "policy",
        "test",
        "--config",
        "config/demo.toml",
        cases.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(
        text.contains("FAIL  SELECT * FROM secrets: expected allow, got deny by deny_read"),
        "{text}"
    );
    assert!(text.contains("0 passed, 1 failed"), "{text}");
}

#[test]
fn policy_explain_shows_the_decision_and_the_analysis() {
    let output = pgbastion(&[
        "policy",
        "explain",
        "--config",
        "config/demo.toml",
        "--claims",
        r#"{"preferred_username": "bob", "groups": ["engineers"]}"#,
        "WITH moved AS (DELETE FROM orders WHERE id = 1 RETURNING *) INSERT INTO orders SELECT * FROM moved",
    ]);
    assert!(output.status.success());
    let text = stdout(&output);
    assert!(
        text.contains("-> mapping 'engineers' -> role engineer, policy 'engineers'"),
        "{text}"
    );
    assert!(text.contains("decision:  allow"), "{text}");
    assert!(text.contains("classes:   read, write"), "{text}");
    assert!(text.contains("writes:    orders"), "{text}");
}

#[test]
fn check_lists_every_problem_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(repo_root().join("config/demo.toml"))
        .unwrap()
        .replace("audiences = [\"pgbastion\"]", "audiences = []")
        .replace("policy = \"engineers\"", "policy = \"missing\"");
    let audiences_line = text.lines().position(|l| l == "audiences = []").unwrap() + 1;
    std::fs::write(&config, text).unwrap();
    let output = pgbastion(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    let expected = format!(": line {audiences_line}: issuers[0].audiences: list the audience(s)");
    assert!(text.contains(&expected), "{text}");
    assert!(
        text.contains("mappings[1].policy: policy 'missing' is not defined"),
        "{text}"
    );
}

#[test]
fn check_reads_the_files_the_config_names() {
    let output = pgbastion(&["check", "--config", "config/demo.toml"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stdout(&output).contains("tls.cert_file server.crt"),
        "{}",
        stdout(&output)
    );
}

#[test]
fn version_is_printed() {
    let output = pgbastion(&["--version"]);
    assert!(output.status.success());
    assert!(stdout(&output).starts_with("pgbastion "));
}
