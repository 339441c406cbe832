//! Against a real OpenID Provider implementation: the `oidc-provider` npm package, started by
//! the test, issues an RFC 9068 JWT access token by client_credentials with a resource
//! indicator, and that token logs in through pgbastion.

use integration_tests::{npm_ci, Harness};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

const CLIENT_ID: &str = "reporting-service";
const CLIENT_SECRET: &str = "a-client-secret-for-tests-only-0123456789";

/// The provider process; killed when dropped.
struct Provider {
    child: Child,
    issuer: String,
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_provider() -> Provider {
    let dir = npm_ci("oidc-provider", "oidc-provider");
    let mut child = Command::new("node")
        .arg("provider.mjs")
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("node is needed for this test (Node.js 20 or newer)");
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("provider output");
    let issuer = line
        .trim()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("unexpected provider output: {line:?}"))
        .to_string();
    Provider { child, issuer }
}

/// POST /token with client_credentials and the resource indicator; returns the JSON answer.
fn token_response(issuer: &str, resource: &str) -> serde_json::Value {
    let output = Command::new("curl")
        .args(["-s", "-u", &format!("{CLIENT_ID}:{CLIENT_SECRET}")])
        .args([
            "-d",
            "grant_type=client_credentials",
            "-d",
            "scope=postgres",
        ])
        .args(["-d", &format!("resource={resource}")])
        .arg(format!("{issuer}/token"))
        .output()
        .expect("curl is needed for this test");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!(
            "token endpoint answered: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_a_real_openid_provider_logs_in() {
    let provider = tokio::task::block_in_place(start_provider);
    let issuer = provider.issuer.clone();
    let h = Harness::start_with(|c| {
        let mut trusted = c.issuers[0].clone();
        trusted.issuer = issuer.clone();
        // Client-credentials tokens name the client, not a person.
        trusted.user_claim = "client_id".into();
        trusted.required_scopes = vec!["postgres".into()];
        c.issuers.push(trusted);
        let mut rule = c.mappings[0].clone();
        rule.name = "reporting".into();
        rule.issuer = Some(issuer.clone());
        rule.groups_any.clear();
        rule.claims.insert("client_id".into(), CLIENT_ID.into());
        c.mappings.insert(0, rule);
    })
    .await;

    let answer = tokio::task::block_in_place(|| token_response(&provider.issuer, "urn:pgbastion"));
    let token = answer["access_token"]
        .as_str()
        .expect("an access token")
        .to_string();
    assert_eq!(token.split('.').count(), 3, "a JWT access token");

    let client = h.connect(CLIENT_ID, &token).await.unwrap();
    let row = client.query_one("SELECT current_user", &[]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "analyst");

    // The provider refuses resources it does not know, so no token is minted for them.
    let refused = tokio::task::block_in_place(|| token_response(&provider.issuer, "urn:elsewhere"));
    assert_eq!(refused["error"], "invalid_target", "{refused}");

    // The same token presented under another user name is refused.
    let (code, message) = h.connect_error("someone-else", "demo", &token).await;
    assert_eq!(code, "28000");
    assert!(
        message.contains("does not match the token's client_id 'reporting-service'"),
        "{message}"
    );
}
