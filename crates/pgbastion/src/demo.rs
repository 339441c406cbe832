//! `pgbastion demo`: a throwaway PostgreSQL with the demo database, a development OIDC issuer
//! with three users, a self-signed certificate, and the proxy, all on 127.0.0.1, configured by
//! config/demo.toml.

use anyhow::{Context, Result};
use pgbastion_devkit::demo::{demo_config, DEMO_USERS};
use pgbastion_devkit::{DevIssuer, PgCluster};
use serde_json::json;
use std::net::SocketAddr;
use std::process::ExitCode;

pub async fn run(listen: SocketAddr) -> Result<ExitCode> {
    let dir = tempfile::Builder::new()
        .prefix("pgbastion-demo-")
        .tempdir()?;
    eprintln!("starting PostgreSQL ...");
    let cluster = tokio::task::block_in_place(PgCluster::start).context("starting PostgreSQL")?;
    let issuer = DevIssuer::start("pgbastion").await?;
    for (user, group) in DEMO_USERS {
        issuer.add_user(user, json!({ "groups": [group] }));
    }
    let config = demo_config(dir.path(), listen, &cluster, &issuer)?;
    let config_path = dir.path().join("pgbastion.toml");
    std::fs::write(&config_path, toml::to_string(&config)?)?;
    let cert = config
        .tls
        .as_ref()
        .map(|t| t.cert_file.clone())
        .unwrap_or_default();
    let mappings = config.mappings.clone();
    let audit_path = config.audit.path.clone().unwrap_or_default();
    let proxy = pgbastion_proxy::Proxy::bind(config).await?;
    let missing = proxy
        .wait_for_keys(std::time::Duration::from_secs(10))
        .await;
    anyhow::ensure!(
        missing.is_empty(),
        "the development issuer did not serve its keys"
    );
    let address = proxy.local_addr();

    println!(
        "pgbastion demo is running: proxy on {address}, config {}",
        config_path.display()
    );
    println!();
    for (user, group) in DEMO_USERS {
        if let Some(rule) = mappings
            .iter()
            .find(|m| m.groups_any.iter().any(|g| g == group))
        {
            println!(
                "# {user}: group {group} -> role {}, policy {}",
                rule.role, rule.policy
            );
        }
        println!(
            "PGPASSWORD=\"$(curl -s {}/token/{user})\" psql \"host={} port={} user={user} dbname=demo sslmode=verify-full sslrootcert={}\"",
            issuer.issuer(),
            address.ip(),
            address.port(),
            cert.display()
        );
    }
    println!();
    println!("upstream: {}", cluster.url("demo_owner", "demo"));
    println!("audit log: {}", audit_path.display());
    if let Some(admin) = proxy.admin_addr() {
        println!("metrics: http://{admin}/metrics");
    }
    println!();
    println!("Press Ctrl-C to stop; the cluster and all temporary files are removed.");

    proxy.run(crate::shutdown_signal()).await;
    eprintln!("stopping ...");
    drop(issuer);
    drop(cluster);
    drop(dir);
    Ok(ExitCode::SUCCESS)
}
