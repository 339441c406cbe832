//! Reloading the configuration of a running proxy: on SIGHUP, and when the file changes
//! (checked every two seconds). An invalid file leaves the running configuration in place;
//! the log and the `pgbastion_config_reloads_total{outcome="failure"}` metric say why.

use pgbastion_proxy::ProxyHandle;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use tokio::signal::unix::{signal, SignalKind};

const POLL: Duration = Duration::from_secs(2);

pub async fn watch(path: PathBuf, proxy: ProxyHandle) {
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(err) => {
            tracing::warn!(error = %err, "no SIGHUP handler; reloads follow file changes only");
            None
        }
    };
    let mut seen = modified(&path);
    loop {
        let signalled = tokio::select! {
            _ = async { hangup.as_mut().expect("checked").recv().await }, if hangup.is_some() => true,
            _ = tokio::time::sleep(POLL) => false,
        };
        let now = modified(&path);
        if !signalled && now == seen {
            continue;
        }
        seen = now;
        match pgbastion_config::load(&path) {
            Ok(config) => {
                // `reload` logs, counts and audits either outcome.
                let _ = proxy.reload(config).await;
            }
            Err(problems) => {
                proxy
                    .reload_refused(format!(
                        "{}: invalid configuration:\n{problems}",
                        path.display()
                    ))
                    .await;
            }
        }
    }
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}
