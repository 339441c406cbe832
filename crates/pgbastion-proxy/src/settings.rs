//! The configuration resolved for serving: certificates and secrets read, TLS built.
//! Built once at start; everything a connection needs, ready to use.

use pgbastion_auth::Mapper;
use pgbastion_config::{
    Config, Secret, UpstreamAuthMethod, UpstreamTls, DEFAULT_STARTUP_PARAMETERS,
};
use pgbastion_policy::CompiledPolicy;
use pgbastion_wire::tls::{self, UpstreamTlsMode};
use pgbastion_wire::upstream::{AuthMethods, UpstreamTarget};
use rustls::ServerConfig;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

#[derive(Debug)]
pub struct Settings {
    pub config: Config,
    pub client_tls: Option<Arc<ServerConfig>>,
    /// Shared with the cancel routes of the sessions started under these settings.
    pub upstream: Arc<UpstreamTarget>,
    pub role_passwords: BTreeMap<String, Secret>,
    /// Gateway mode's login role, when configured.
    pub gateway: Option<String>,
    /// Lower-cased names of startup parameters a client may pass upstream.
    pub startup_parameters: BTreeSet<String>,
    /// Statement policies by name, ready for deciding.
    pub policies: BTreeMap<String, Arc<CompiledPolicy>>,
    pub mapper: Mapper,
}

impl Settings {
    /// Reads every file and secret the config names; any failure is reported with its key.
    pub fn resolve(config: Config) -> Result<Settings, String> {
        let client_tls = match &config.tls {
            Some(tls) => {
                let cert = std::fs::read(&tls.cert_file)
                    .map_err(|err| format!("tls.cert_file {}: {err}", tls.cert_file.display()))?;
                let key = std::fs::read(&tls.key_file)
                    .map_err(|err| format!("tls.key_file {}: {err}", tls.key_file.display()))?;
                Some(tls::server_config(&cert, &key).map_err(|err| format!("[tls]: {err}"))?)
            }
            None => None,
        };
        let upstream_tls = match config.upstream.tls {
            UpstreamTls::Disable => UpstreamTlsMode::Disable,
            UpstreamTls::Require => tls::upstream_require().map_err(|e| e.to_string())?,
            UpstreamTls::VerifyFull => {
                let path = config
                    .upstream
                    .ca_file
                    .as_ref()
                    .ok_or("upstream.ca_file is required")?;
                let pem = std::fs::read(path)
                    .map_err(|err| format!("upstream.ca_file {}: {err}", path.display()))?;
                tls::upstream_verify_full(&pem).map_err(|err| format!("upstream.ca_file: {err}"))?
            }
        };
        let methods = &config.upstream.auth_methods;
        let upstream = UpstreamTarget {
            host: config.upstream.host.clone(),
            port: config.upstream.port,
            tls: upstream_tls,
            connect_timeout: config.upstream.connect_timeout,
            auth_methods: AuthMethods {
                scram_sha_256: methods.contains(&UpstreamAuthMethod::ScramSha256),
                md5: methods.contains(&UpstreamAuthMethod::Md5),
                password: methods.contains(&UpstreamAuthMethod::Password),
                trust: methods.contains(&UpstreamAuthMethod::Trust),
            },
        };
        let mut role_passwords = BTreeMap::new();
        for (role, source) in &config.upstream.roles {
            let secret = source
                .resolve()
                .map_err(|err| format!("upstream.roles.{role}: {err}"))?;
            role_passwords.insert(role.clone(), secret);
        }
        let startup_parameters = DEFAULT_STARTUP_PARAMETERS
            .iter()
            .map(|p| p.to_string())
            .chain(
                config
                    .client
                    .extra_startup_parameters
                    .iter()
                    .map(|p| p.to_ascii_lowercase()),
            )
            .collect();
        let policies = config
            .policies
            .iter()
            .map(|(name, policy)| {
                let mut compiled = CompiledPolicy::new(name, policy);
                compiled.version = policy_version(policy);
                (name.clone(), Arc::new(compiled))
            })
            .collect();
        let mapper = Mapper::new(config.mappings.clone());
        let gateway = config.upstream.gateway.as_ref().map(|g| g.role.clone());
        Ok(Settings {
            mapper,
            gateway,
            policies,
            config,
            client_tls,
            upstream: Arc::new(upstream),
            role_passwords,
            startup_parameters,
        })
    }
}

/// The first 12 hex digits of the SHA-256 of the policy's rules: the same rules give the same
/// version across restarts, so audit records name the rules that decided them.
fn policy_version(policy: &pgbastion_config::Policy) -> String {
    let rules = serde_json::to_string(policy).unwrap_or_default();
    hex::encode(&Sha256::digest(rules.as_bytes())[..6])
}
