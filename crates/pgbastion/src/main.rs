//! The `pgbastion` binary: command line, logging, signals.
//! Commands: `serve` (run the proxy), `check` (validate a config), `demo` (everything local),
//! `policy` (explain, test, replay) and `audit verify`.

mod demo;
mod policy;
mod reload;
mod replay;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "pgbastion",
    version,
    about = "Identity-aware PostgreSQL proxy: OIDC access tokens as passwords, least-privilege sessions upstream"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration: lists every problem with its key path and line; exit 0 or 1.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start a throwaway PostgreSQL, a development identity provider and the proxy, and print
    /// how to connect. Ctrl-C removes everything.
    Demo {
        /// Where the proxy listens.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: SocketAddr,
    },
    /// Decide statements offline against a configuration's mappings and policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Work with audit logs.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain of audit files (rotated files oldest first, then the current one);
    /// names the first broken record. Exit 0 when intact, 1 otherwise.
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Show the decision for one SQL text and what the analysis found in it.
    Explain {
        #[arg(long, short)]
        config: PathBuf,
        /// The token's claims as JSON, e.g. '{"preferred_username": "alice", "groups": ["analysts"]}'.
        #[arg(long)]
        claims: String,
        /// The database connected to (default: the first one the mappings name).
        #[arg(long)]
        database: Option<String>,
        sql: String,
    },
    /// Run (claims, SQL, expected decision) cases from a TOML file; exit 1 on any mismatch.
    Test {
        #[arg(long, short)]
        config: PathBuf,
        cases: PathBuf,
    },
    /// Decide the statements of audit logs again under a new configuration and report, per
    /// identity, what would change; exit 1 when anything changes (unless --allow-changes).
    Replay {
        /// The configuration to try.
        #[arg(long, short)]
        config: PathBuf,
        /// Compare with this configuration instead of the decisions recorded in the log.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// Exit 0 even when decisions change.
        #[arg(long)]
        allow_changes: bool,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Demo { .. } | Command::Policy { .. } | Command::Audit { .. } => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    // `serve` reads its configuration first: it says how many threads to run.
    let serving = match &cli.command {
        Command::Serve { config } => match pgbastion_config::load(config) {
            Ok(loaded) => Some((config.clone(), loaded)),
            Err(problems) => {
                eprintln!("{}: invalid configuration:\n{problems}", config.display());
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let threads = serving
        .as_ref()
        .map_or(0, |(_, config)| config.runtime.worker_threads);
    let runtime = match threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
    .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { .. } => {
                let (path, config) = serving.expect("loaded above");
                serve(path, config).await
            }
            Command::Check { config } => check(config),
            Command::Demo { listen } => demo::run(listen).await,
            Command::Policy { command } => match command {
                PolicyCommand::Explain {
                    config,
                    claims,
                    database,
                    sql,
                } => policy::explain(&config, &claims, database.as_deref(), &sql),
                PolicyCommand::Test { config, cases } => policy::test(&config, &cases),
                PolicyCommand::Replay {
                    config,
                    baseline,
                    allow_changes,
                    files,
                } => replay::replay(&config, baseline.as_deref(), allow_changes, &files),
            },
            Command::Audit {
                command: AuditCommand::Verify { files },
            } => audit_verify(&files),
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("pgbastion: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(path: PathBuf, config: pgbastion_config::Config) -> Result<ExitCode> {
    let proxy = pgbastion_proxy::Proxy::bind(config)
        .await
        .context("starting")?;
    tracing::info!(address = %proxy.local_addr(), admin = ?proxy.admin_addr(), "pgbastion listening");
    let reloader = tokio::spawn(reload::watch(path, proxy.handle()));
    proxy.run(shutdown_signal()).await;
    reloader.abort();
    Ok(ExitCode::SUCCESS)
}

fn audit_verify(files: &[PathBuf]) -> Result<ExitCode> {
    match pgbastion_audit::verify_files(files) {
        Ok(verified) => {
            println!(
                "{} records, chain intact{}",
                verified.records,
                if verified.from_start {
                    " from its first record"
                } else {
                    " (continuing a chain from earlier files)"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(broken) => {
            println!("{broken}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn check(path: PathBuf) -> Result<ExitCode> {
    let config = match pgbastion_config::load(&path) {
        Ok(config) => config,
        Err(problems) => {
            for problem in &problems.0 {
                println!("{}: {problem}", path.display());
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    // Files and secrets the config names must be readable too.
    if let Err(problem) = pgbastion_proxy::Settings::resolve(config) {
        println!("{}: {problem}", path.display());
        return Ok(ExitCode::FAILURE);
    }
    println!("{}: configuration is valid", path.display());
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
