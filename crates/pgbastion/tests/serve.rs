//! `pgbastion serve` as a process: reload on a file change and on SIGHUP (a broken file keeps
//! the running configuration), metrics on the admin listener, and a clean exit on SIGTERM.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/demo.toml");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// config/demo.toml with real files in `dir`; `extra_deny` changes the analysts' policy.
fn config(dir: &Path, listen: u16, admin: u16, extra_deny: &str) -> String {
    let mut config = pgbastion_config::load(Path::new(DEMO)).unwrap();
    let (cert, key) = pgbastion_devkit::SelfSigned::localhost()
        .unwrap()
        .write_to(dir)
        .unwrap();
    let tls = config.tls.as_mut().unwrap();
    tls.cert_file = cert;
    tls.key_file = key;
    config.listen.address = format!("127.0.0.1:{listen}").parse().unwrap();
    config.admin.address = format!("127.0.0.1:{admin}").parse().unwrap();
    config.audit.sink = pgbastion_config::AuditSink::Off;
    config.issuers[0].issuer = "http://127.0.0.1:1".into();
    for (role, source) in config.upstream.roles.iter_mut() {
        let path = dir.join(format!("{role}.password"));
        std::fs::write(&path, "unused").unwrap();
        source.password_file = Some(path);
    }
    let analysts = config.policies.get_mut("analysts").unwrap();
    analysts.deny_read.push(extra_deny.into());
    toml::to_string(&config).unwrap()
}

fn metrics(admin: u16) -> String {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", admin)) else {
        return String::new();
    };
    let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

fn wait_for(admin: u16, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if metrics(admin).lines().any(|l| l == line) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no '{line}' in\n{}", metrics(admin));
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn serve_reloads_on_change_and_sighup_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgbastion.toml");
    let (listen, admin) = (free_port(), free_port());
    std::fs::write(&path, config(dir.path(), listen, admin, "public.a")).unwrap();
    let mut serve = Serve(
        Command::new(env!("CARGO_BIN_EXE_pgbastion"))
            .args(["serve", "--config", path.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(admin, "pgbastion_config_generation 1");

    // A broken file: refused, the running configuration stays.
    std::fs::write(&path, "[listen\n").unwrap();
    wait_for(
        admin,
        "pgbastion_config_reloads_total{outcome=\"failure\"} 1",
    );
    assert!(metrics(admin).contains("pgbastion_config_generation 1"));
    // A valid change of the file is picked up.
    std::fs::write(&path, config(dir.path(), listen, admin, "public.b")).unwrap();
    wait_for(admin, "pgbastion_config_generation 2");
    // SIGHUP reloads too.
    signal(&serve.0, "HUP");
    wait_for(admin, "pgbastion_config_generation 3");
    wait_for(
        admin,
        "pgbastion_config_reloads_total{outcome=\"success\"} 2",
    );

    signal(&serve.0, "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = serve.0.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pgbastion did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
