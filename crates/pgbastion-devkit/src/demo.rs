//! The demo's configuration: config/demo.toml with its run-time parts filled in.

use crate::{DevIssuer, PgCluster, SelfSigned};
use anyhow::{anyhow, Result};
use pgbastion_config::Config;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// config/demo.toml as shipped: mappings and policies used as written.
pub const DEMO_CONFIG: &str = include_str!("../../../config/demo.toml");

/// The demo users: (user, group).
pub const DEMO_USERS: &[(&str, &str)] = &[
    ("alice", "analysts"),
    ("bob", "engineers"),
    ("carol", "dbadmins"),
];

/// config/demo.toml pointed at this issuer, cluster and listen address. Writes the TLS
/// certificate and the role password files (mode 0600) into `dir`.
pub fn demo_config(
    dir: &Path,
    listen: SocketAddr,
    cluster: &PgCluster,
    issuer: &DevIssuer,
) -> Result<Config> {
    let mut config =
        pgbastion_config::parse(DEMO_CONFIG).map_err(|p| anyhow!("config/demo.toml: {p}"))?;
    let (cert, key) = SelfSigned::localhost()?.write_to(dir)?;
    config.listen.address = listen;
    let tls = config
        .tls
        .as_mut()
        .ok_or_else(|| anyhow!("config/demo.toml has no [tls]"))?;
    tls.cert_file = cert;
    tls.key_file = key;
    config.issuers[0].issuer = issuer.issuer().to_string();
    // The audit log in the demo's directory; the admin listener on a free port.
    config.audit.sink = pgbastion_config::AuditSink::File;
    config.audit.path = Some(dir.join("audit.log"));
    config.admin.address = SocketAddr::from(([127, 0, 0, 1], 0));
    config.upstream.host = cluster.host().to_string();
    config.upstream.port = cluster.port;
    for (role, source) in config.upstream.roles.iter_mut() {
        let path = dir.join(format!("{role}.password"));
        std::fs::write(&path, cluster.password(role))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        source.password_file = Some(path);
        source.password_env = None;
    }
    Ok(config)
}
