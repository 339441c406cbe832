//! pgbastion's configuration: the TOML model, its validation and secret references.
//!
//! Owns: every configuration key, its type and default, and the rules that make a config valid.
//! Loading is pure (text in, `Config` or every problem out); reading secret files or environment
//! variables is a separate, explicit step (`SecretSource::resolve`).
//! Must not depend on any other pgbastion crate.

mod duration;
mod locate;
mod model;
mod operations;
mod pool;
mod secret;
mod validate;

pub use model::*;
pub use operations::*;
pub use pool::{Pool, PoolMode, RolePool};
pub use secret::{Secret, SecretError, SecretSource};
pub use validate::{Problem, Problems};

/// Parses and validates a configuration. Every problem is reported with its key path and line.
pub fn parse(text: &str) -> Result<Config, Problems> {
    let config: Config = match toml::from_str(text) {
        Ok(config) => config,
        Err(err) => {
            let line = err
                .span()
                .map(|span| locate::line_of_offset(text, span.start));
            return Err(Problems(vec![Problem {
                path: String::new(),
                line,
                message: err.message().trim().to_string(),
            }]));
        }
    };
    let mut problems = validate::validate(&config);
    if problems.is_empty() {
        Ok(config)
    } else {
        for problem in &mut problems {
            problem.line = locate::line_of_path(text, &problem.path);
        }
        Err(Problems(problems))
    }
}

/// Reads and parses a configuration file.
pub fn load(path: &std::path::Path) -> Result<Config, Problems> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        Problems(vec![Problem {
            path: String::new(),
            line: None,
            message: format!("cannot read {}: {err}", path.display()),
        }])
    })?;
    parse(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[listen]
address = "127.0.0.1:6432"
allow_plaintext = true

[[issuers]]
issuer = "https://idp.example.com"
audiences = ["pgbastion"]

[upstream]
host = "127.0.0.1"
tls = "disable"

[upstream.roles.analyst]
password_env = "ANALYST_PASSWORD"

[[mappings]]
name = "analysts"
groups_any = ["analysts"]
role = "analyst"
databases = ["app"]
policy = "analysts"

[policies.analysts]
allow = ["read", "session"]
"#;

    #[test]
    fn a_minimal_config_parses_with_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.issuers[0].user_claim, "preferred_username");
        assert_eq!(config.issuers[0].leeway, std::time::Duration::from_secs(60));
        assert_eq!(config.session.on_token_expiry, OnTokenExpiry::Disconnect);
        assert_eq!(config.client.max_password_bytes, 65536);
    }

    #[test]
    fn gateway_mode_needs_the_gateway_credential_and_no_mapped_role_credential() {
        let gateway = MINIMAL.replace(
            "[upstream.roles.analyst]",
            "[upstream.gateway]\nrole = \"gw\"\n\n[upstream.roles.gw]",
        );
        let config = parse(&gateway).unwrap();
        assert_eq!(config.upstream.gateway.unwrap().role, "gw");
        let missing = MINIMAL.replace(
            "[upstream.roles.analyst]",
            "[upstream.gateway]\nrole = \"gw\"\n\n[upstream.roles.analyst]",
        );
        let shown = parse(&missing).unwrap_err().to_string();
        assert!(
            shown.contains("upstream.gateway.role: the gateway role 'gw' has no credential"),
            "{shown}"
        );
    }

    #[test]
    fn reserved_settings_can_never_be_startup_parameters() {
        let text = MINIMAL.replace(
            "allow_plaintext = true",
            "allow_plaintext = true\n\n[client]\nextra_startup_parameters = [\"pgbastion.user\", \"work_mem\"]",
        );
        let shown = parse(&text).unwrap_err().to_string();
        assert!(
            shown.contains("client.extra_startup_parameters[0]"),
            "{shown}"
        );
        assert!(
            !shown.contains("client.extra_startup_parameters[1]"),
            "{shown}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_line() {
        let text = MINIMAL.replace("tls = \"disable\"", "tls = \"disable\"\nhots = \"x\"");
        let problems = parse(&text).unwrap_err();
        let shown = problems.to_string();
        assert!(shown.contains("unknown field `hots`"), "{shown}");
        assert!(shown.starts_with("line 13"), "{shown}");
    }

    #[test]
    fn every_problem_is_reported_at_once_with_key_paths() {
        let text = MINIMAL
            .replace("address = \"127.0.0.1:6432\"", "address = \"0.0.0.0:6432\"")
            .replace(
                "audiences = [\"pgbastion\"]",
                "audiences = []\nalgorithms = [\"HS256\"]",
            )
            .replace("role = \"analyst\"", "role = \"nobody\"")
            .replace("policy = \"analysts\"", "policy = \"missing\"");
        let problems = parse(&text).unwrap_err();
        let paths: Vec<_> = problems.0.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "listen.allow_plaintext",
                "issuers[0].audiences",
                "issuers[0].algorithms[0]",
                "mappings[0].role",
                "mappings[0].policy"
            ]
        );
        assert!(problems.0.iter().all(|p| p.line.is_some()), "{problems}");
        assert!(
            problems
                .to_string()
                .contains("line 4: listen.allow_plaintext"),
            "{problems}"
        );
    }

    #[test]
    fn upstream_auth_methods_default_to_scram_and_password_needs_tls_off_loopback() {
        assert_eq!(
            parse(MINIMAL).unwrap().upstream.auth_methods,
            [UpstreamAuthMethod::ScramSha256]
        );
        let with = |host: &str, tls: &str, methods: &str| {
            MINIMAL.replace(
                "host = \"127.0.0.1\"\ntls = \"disable\"",
                &format!("host = \"{host}\"\ntls = \"{tls}\"\nauth_methods = {methods}"),
            )
        };
        let refused = |text: &str| parse(text).unwrap_err().to_string();
        let config = parse(&with("127.0.0.1", "disable", r#"["md5", "password"]"#)).unwrap();
        assert_eq!(
            config.upstream.auth_methods,
            [UpstreamAuthMethod::Md5, UpstreamAuthMethod::Password]
        );
        let shown = refused(&with("db.example.com", "disable", r#"["password"]"#));
        assert!(
            shown.contains("upstream.auth_methods: \"password\" would hand the roles' passwords"),
            "{shown}"
        );
        let shown = refused(&with("db.example.com", "require", r#"["password"]"#));
        assert!(
            shown.contains("to whoever poses as the upstream"),
            "{shown}"
        );
        let verified = with("db.example.com", "verify-full", r#"["password"]"#)
            .replace("auth_methods", "ca_file = \"/etc/ca.pem\"\nauth_methods");
        parse(&verified).unwrap();
        let shown = refused(&with("127.0.0.1", "disable", "[]"));
        assert!(
            shown.contains("upstream.auth_methods: must list at least one"),
            "{shown}"
        );
        let shown = refused(&with("127.0.0.1", "disable", r#"["kerberos"]"#));
        assert!(shown.contains("unknown variant `kerberos`"), "{shown}");
        let config = parse(&with("127.0.0.1", "disable", r#"["trust"]"#)).unwrap();
        assert_eq!(config.upstream.auth_methods, [UpstreamAuthMethod::Trust]);
    }

    #[test]
    fn http_issuers_are_refused_unless_on_loopback() {
        let text = MINIMAL.replace("https://idp.example.com", "http://idp.example.com");
        let problems = parse(&text).unwrap_err();
        assert_eq!(problems.0[0].path, "issuers[0].issuer");
        let text = MINIMAL.replace("https://idp.example.com", "http://127.0.0.1:8080");
        parse(&text).unwrap();
    }

    #[test]
    fn busy_polling_needs_one_thread_and_a_short_window() {
        let with = |runtime: &str| MINIMAL.to_string() + "\n[runtime]\n" + runtime;
        let config = parse(&with("worker_threads = 1\nbusy_poll = \"50us\"")).unwrap();
        assert_eq!(
            config.runtime.busy_poll,
            std::time::Duration::from_micros(50)
        );
        assert!(parse(MINIMAL).unwrap().runtime.busy_poll.is_zero());
        for (runtime, message) in [
            ("busy_poll = \"50us\"", "needs runtime.worker_threads = 1"),
            (
                "worker_threads = 1\nbusy_poll = \"5ms\"",
                "must be at most 1ms",
            ),
        ] {
            let problems = parse(&with(runtime)).unwrap_err();
            assert_eq!(problems.0.len(), 1, "{problems}");
            assert_eq!(problems.0[0].path, "runtime.busy_poll");
            assert!(problems.to_string().contains(message), "{problems}");
        }
    }

    #[test]
    fn durations_are_written_the_human_way() {
        let text = MINIMAL.replace(
            "audiences = [\"pgbastion\"]",
            "audiences = [\"pgbastion\"]\nleeway = \"2m\"",
        );
        assert_eq!(
            parse(&text).unwrap().issuers[0].leeway,
            std::time::Duration::from_secs(120)
        );
        let text = MINIMAL.replace(
            "audiences = [\"pgbastion\"]",
            "audiences = [\"pgbastion\"]\nleeway = \"soon\"",
        );
        assert!(parse(&text)
            .unwrap_err()
            .to_string()
            .contains("invalid duration 'soon'"));
    }
}

#[cfg(test)]
mod example_tests {
    #[test]
    fn the_example_config_documents_a_valid_config() {
        let text = include_str!("../../../config/pgbastion.example.toml");
        let config = super::parse(text).unwrap_or_else(|p| panic!("{p}"));
        assert_eq!(config.mappings.len(), 2);
        assert_eq!(config.issuers[0].groups_claim, "groups");
    }
}
