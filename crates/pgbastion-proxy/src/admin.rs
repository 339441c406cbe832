//! The admin HTTP listener: GET /metrics (Prometheus text), /healthz (the process answers) and
//! /readyz (configuration loaded, signing keys for every issuer, upstream reachable).
//! A deliberately small HTTP/1.1 server: one request per connection, GET only, bounded reads.

use crate::listener::Shared;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_REQUEST: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(READ_TIMEOUT, answer(stream, &shared)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || request.len() + n > MAX_REQUEST {
            return Ok(());
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let line = request.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            shared.metrics.render(&shared.snapshot()),
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain; charset=utf-8", "ok\n".to_string()),
        ("GET", "/readyz") => match readiness(shared).await {
            Ok(()) => ("200 OK", "text/plain; charset=utf-8", "ready\n".to_string()),
            Err(problems) => (
                "503 Service Unavailable",
                "text/plain; charset=utf-8",
                format!("not ready:\n{}\n", problems.join("\n")),
            ),
        },
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: try /metrics, /healthz or /readyz\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Why the proxy cannot serve sessions now, if it cannot.
async fn readiness(shared: &Shared) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    for key in shared.verifier.key_status() {
        if !key.loaded {
            problems.push(format!(
                "signing keys of issuer {} are not loaded",
                key.issuer
            ));
        }
    }
    let settings = shared.settings();
    let upstream = &settings.upstream;
    let address = (upstream.host.as_str(), upstream.port);
    match tokio::time::timeout(upstream.connect_timeout, TcpStream::connect(address)).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => problems.push(format!(
            "upstream {}:{} is not reachable: {err}",
            upstream.host, upstream.port
        )),
        Err(_) => problems.push(format!(
            "upstream {}:{} did not answer within {:?}",
            upstream.host, upstream.port, upstream.connect_timeout
        )),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}
