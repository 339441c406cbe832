//! Semantic checks of a parsed config. Every problem is collected, none stops the others.

use crate::model::*;
use crate::operations::AuditSink;
use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// Signature algorithms pgbastion can accept. `none` and HMAC are deliberately absent: a
/// shared-secret token could be forged by anyone holding the secret.
pub const ASYMMETRIC_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

/// One thing wrong with a config, located by key path and (when known) line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.path.is_empty()) {
            (Some(line), false) => write!(f, "line {line}: {}: {}", self.path, self.message),
            (Some(line), true) => write!(f, "line {line}: {}", self.message),
            (None, false) => write!(f, "{}: {}", self.path, self.message),
            (None, true) => f.write_str(&self.message),
        }
    }
}

/// Every problem found in a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

struct Collector(Vec<Problem>);

impl Collector {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            line: None,
            message: message.into(),
        });
    }
}

pub fn validate(config: &Config) -> Vec<Problem> {
    let mut out = Collector(Vec::new());
    listen(config, &mut out);
    client(&config.client, &mut out);
    issuers(&config.issuers, &mut out);
    upstream(&config.upstream, &mut out);
    mappings(config, &mut out);
    policies(config, &mut out);
    operations(config, &mut out);
    out.0
}

/// Polling longer than this after a forward burns more CPU than the wake-up it saves.
const MAX_BUSY_POLL: Duration = Duration::from_millis(1);

fn operations(config: &Config, out: &mut Collector) {
    let audit = &config.audit;
    if audit.sink == AuditSink::File && audit.path.is_none() {
        out.add("audit.path", "is required when audit.sink = \"file\"");
    }
    if audit.sink != AuditSink::File && audit.path.is_some() {
        out.add("audit.path", "is only used when audit.sink = \"file\"");
    }
    if audit.max_file_bytes < 4096 {
        out.add("audit.max_file_bytes", "must be at least 4096");
    }
    if audit.queue == 0 {
        out.add("audit.queue", "must be at least 1");
    }
    if config.limits.max_client_connections == 0 {
        out.add("limits.max_client_connections", "must be at least 1");
    }
    let runtime = &config.runtime;
    if !runtime.busy_poll.is_zero() && runtime.worker_threads != 1 {
        out.add(
            "runtime.busy_poll",
            "needs runtime.worker_threads = 1: with more threads, the thread asleep in the I/O \
             driver is not the one that would poll",
        );
    }
    if runtime.busy_poll > MAX_BUSY_POLL {
        out.add(
            "runtime.busy_poll",
            "must be at most 1ms: an answer that takes longer is worth the wake-up, not the CPU",
        );
    }
    let pool = &config.pool;
    if pool.max_size == 0 {
        out.add("pool.max_size", "must be at least 1");
    }
    for (role, own) in &pool.roles {
        if own.max_size == Some(0) {
            out.add(format!("pool.roles.{role}.max_size"), "must be at least 1");
        }
        if !config.upstream.roles.contains_key(role) {
            out.add(
                format!("pool.roles.{role}"),
                "names no role of [upstream.roles]: pgbastion never logs in as it",
            );
        }
    }
    if pool.min_size > pool.max_size {
        out.add("pool.min_size", "must not exceed pool.max_size");
    }
    if pool.reset_query.contains('\0') {
        out.add("pool.reset_query", "must not contain a NUL character");
    } else if pool.reset_query.trim().is_empty() {
        out.add(
            "pool.reset_query",
            "must not be empty: a reused connection would keep its last client's session state",
        );
    }
    if config.admin.enabled && config.admin.address == config.listen.address {
        out.add("admin.address", "must differ from listen.address");
    }
    for (name, policy) in &config.policies {
        let limits = &policy.limits;
        if limits.statement_burst > 0 && limits.statements_per_second == 0 {
            out.add(
                format!("policies.{name}.limits.statement_burst"),
                "needs statements_per_second",
            );
        }
    }
}

fn listen(config: &Config, out: &mut Collector) {
    let listen = &config.listen;
    if listen.allow_plaintext && !listen.address.ip().is_loopback() {
        out.add(
            "listen.allow_plaintext",
            format!(
                "plaintext is only allowed on a loopback address, not {}: tokens would cross the network unencrypted",
                listen.address.ip()
            ),
        );
    }
    if config.tls.is_none() && !listen.allow_plaintext {
        out.add(
            "tls",
            "no [tls] certificate is configured and plaintext is not allowed, so no client could connect: add [tls] cert_file and key_file",
        );
    }
}

fn client(client: &Client, out: &mut Collector) {
    if !(1024..=1024 * 1024).contains(&client.max_password_bytes) {
        out.add(
            "client.max_password_bytes",
            "must be between 1024 and 1048576 (cloud access tokens reach about 7 KB)",
        );
    }
    if client.max_statement_bytes < 1024 {
        out.add("client.max_statement_bytes", "must be at least 1024");
    }
    for (i, name) in client.extra_startup_parameters.iter().enumerate() {
        let lower = name.to_ascii_lowercase();
        if FORBIDDEN_STARTUP_PARAMETERS.contains(&lower.as_str())
            || lower.starts_with("_pq_")
            || lower.starts_with(RESERVED_SETTING_PREFIX)
        {
            out.add(
                format!("client.extra_startup_parameters[{i}]"),
                format!("'{name}' changes who the session is upstream and can never be passed"),
            );
        }
    }
}

fn issuers(issuers: &[Issuer], out: &mut Collector) {
    if issuers.is_empty() {
        out.add(
            "issuers",
            "at least one [[issuers]] entry is needed to verify tokens",
        );
    }
    let mut seen = BTreeSet::new();
    for (i, issuer) in issuers.iter().enumerate() {
        let path = format!("issuers[{i}]");
        if !seen.insert(issuer.issuer.as_str()) {
            out.add(
                format!("{path}.issuer"),
                format!("issuer '{}' is listed twice", issuer.issuer),
            );
        }
        match url::Url::parse(&issuer.issuer) {
            Ok(url) => {
                let loopback = match url.host() {
                    Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
                    Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
                    Some(url::Host::Domain(d)) => d == "localhost",
                    None => false,
                };
                if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
                    out.add(
                        format!("{path}.issuer"),
                        "must be an https:// URL (http:// is accepted only for a loopback address)",
                    );
                }
            }
            Err(err) => out.add(format!("{path}.issuer"), format!("not a URL: {err}")),
        }
        if issuer.audiences.is_empty() || issuer.audiences.iter().any(|a| a.is_empty()) {
            out.add(
                format!("{path}.audiences"),
                "list the audience(s) tokens must be issued for, e.g. [\"pgbastion\"]: without an audience check any token of this issuer would do",
            );
        }
        if issuer.algorithms.is_empty() {
            out.add(
                format!("{path}.algorithms"),
                "must list at least one algorithm",
            );
        }
        for (j, alg) in issuer.algorithms.iter().enumerate() {
            if !ASYMMETRIC_ALGORITHMS.contains(&alg.as_str()) {
                out.add(
                    format!("{path}.algorithms[{j}]"),
                    format!(
                        "'{alg}' is not accepted; choose from {}",
                        ASYMMETRIC_ALGORITHMS.join(", ")
                    ),
                );
            }
        }
        if issuer.user_claim.is_empty() {
            out.add(format!("{path}.user_claim"), "must name a claim");
        }
    }
}

fn upstream(upstream: &Upstream, out: &mut Collector) {
    if upstream.host.is_empty() {
        out.add("upstream.host", "must not be empty");
    }
    if upstream.tls == UpstreamTls::VerifyFull && upstream.ca_file.is_none() {
        out.add(
            "upstream.ca_file",
            "tls = \"verify-full\" needs the CA certificate that signed the upstream's certificate",
        );
    }
    if upstream.auth_methods.is_empty() {
        out.add(
            "upstream.auth_methods",
            "must list at least one method: \"scram-sha-256\", \"md5\", \"password\" or \"trust\"",
        );
    }
    let loopback = match upstream.host.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => upstream.host == "localhost",
    };
    if upstream
        .auth_methods
        .contains(&UpstreamAuthMethod::Password)
        && upstream.tls != UpstreamTls::VerifyFull
        && !loopback
    {
        out.add(
            "upstream.auth_methods",
            "\"password\" would hand the roles' passwords to whoever poses as the upstream: \
             set upstream.tls to \"verify-full\", or store the passwords as SCRAM upstream",
        );
    }
    if let Some(gateway) = &upstream.gateway {
        if !upstream.roles.contains_key(&gateway.role) {
            out.add(
                "upstream.gateway.role",
                format!(
                    "the gateway role '{}' has no credential: add [upstream.roles.{}] with password_file or password_env",
                    gateway.role, gateway.role
                ),
            );
        }
    }
    for (role, source) in &upstream.roles {
        let path = format!("upstream.roles.{role}");
        match (&source.password_file, &source.password_env) {
            (Some(_), Some(_)) => out.add(path, "give password_file or password_env, not both"),
            (None, None) => out.add(path, "give password_file or password_env"),
            _ => {}
        }
    }
}

fn mappings(config: &Config, out: &mut Collector) {
    if config.mappings.is_empty() {
        out.add(
            "mappings",
            "at least one [[mappings]] rule is needed, or nobody can log in",
        );
    }
    let mut names = BTreeSet::new();
    for (i, mapping) in config.mappings.iter().enumerate() {
        let path = format!("mappings[{i}]");
        if !names.insert(mapping.name.as_str()) {
            out.add(
                format!("{path}.name"),
                format!("rule name '{}' is used twice", mapping.name),
            );
        }
        if config.upstream.gateway.is_none() && !config.upstream.roles.contains_key(&mapping.role) {
            out.add(
                format!("{path}.role"),
                format!(
                    "role '{}' has no credential: add [upstream.roles.{}] with password_file or password_env",
                    mapping.role, mapping.role
                ),
            );
        }
        if mapping.databases.is_empty() {
            out.add(
                format!("{path}.databases"),
                "list the databases this rule allows, or [\"*\"]",
            );
        }
        if !config.policies.contains_key(&mapping.policy) {
            out.add(
                format!("{path}.policy"),
                format!(
                    "policy '{}' is not defined: add [policies.{}]",
                    mapping.policy, mapping.policy
                ),
            );
        }
        if let Some(issuer) = &mapping.issuer {
            if !config.issuers.iter().any(|i| &i.issuer == issuer) {
                out.add(
                    format!("{path}.issuer"),
                    format!("'{issuer}' is not one of [[issuers]]"),
                );
            }
        }
    }
}

fn policies(config: &Config, out: &mut Collector) {
    for (name, policy) in &config.policies {
        let path = format!("policies.{name}");
        for (i, column) in policy.deny_columns.iter().enumerate() {
            if column.split('.').count() != 3 {
                out.add(
                    format!("{path}.deny_columns[{i}]"),
                    format!("'{column}' must be schema.table.column"),
                );
            }
        }
        for (key, patterns) in [
            ("deny_read", &policy.deny_read),
            ("deny_write", &policy.deny_write),
            ("allow_read", &policy.allow_read),
            ("allow_write", &policy.allow_write),
        ] {
            for (i, pattern) in patterns.iter().enumerate() {
                if pattern.split('.').count() != 2 {
                    out.add(
                        format!("{path}.{key}[{i}]"),
                        format!(
                            "'{pattern}' must be schema.table (use * as a wildcard, e.g. public.*)"
                        ),
                    );
                }
            }
        }
    }
}
