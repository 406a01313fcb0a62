//! Prometheus metrics (through the `metrics` facade) on their own port, and structured logs.
use std::net::SocketAddr;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::config::LogFormat;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls reuse it).
pub fn recorder() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let seconds = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0];
            let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
            let tokens = [16.0, 64.0, 256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full("concierge_batch_size".into()), &sizes))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full("concierge_batch_tokens".into()), &tokens))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full("concierge_kb_commit_group_size".into()), &sizes))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full("concierge_kb_wal_group_records".into()), &sizes))
                .expect("bucket lists are non-empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("concierge_requests_total", "gRPC requests by rpc and status code");
    describe_histogram!("concierge_request_duration_seconds", Unit::Seconds, "end-to-end latency of a gRPC request");
    describe_histogram!("concierge_tokenization_seconds", Unit::Seconds, "time to tokenise one request's inputs");
    describe_histogram!("concierge_image_decode_seconds", Unit::Seconds, "time to decode and preprocess one image");
    describe_gauge!("concierge_queue_depth", "inputs admitted and not yet answered, by lane");
    describe_histogram!("concierge_queue_wait_seconds", Unit::Seconds, "time an input waited before its batch started");
    describe_histogram!("concierge_batch_size", "inputs per batch, by lane (text, image, ...)");
    describe_histogram!("concierge_batch_tokens", "tokens per text batch");
    describe_histogram!("concierge_inference_seconds", Unit::Seconds, "model time per batch");
    describe_counter!("concierge_dropped_total", "inputs dropped before compute (reason: deadline, cancelled)");
    describe_gauge!("concierge_model_ready", "1 when the slot's model is loaded and serving");
    describe_gauge!("concierge_kb_documents", "documents in a knowledge-base collection");
    describe_histogram!("concierge_kb_commit_seconds", Unit::Seconds, "log append + fsync of one group commit");
    describe_histogram!("concierge_kb_commit_group_size", "writes committed together by one fsync");
    describe_histogram!("concierge_kb_wal_fsync_seconds", Unit::Seconds, "one fsync of the knowledge-base log");
    describe_histogram!("concierge_kb_wal_group_records", "records per log append");
    describe_counter!("concierge_kb_wal_bytes_total", Unit::Bytes, "bytes appended to the knowledge-base log");
    describe_histogram!("concierge_kb_snapshot_seconds", Unit::Seconds, "time to write a knowledge-base snapshot");
}

/// Serves `GET /metrics` (Prometheus text format) until the process ends. Returns the bound
/// address (so port 0 works in tests).
pub async fn serve_metrics(addr: SocketAddr, handle: PrometheusHandle) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { continue };
            let handle = handle.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf)).await {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let head = String::from_utf8_lossy(&buf[..n]);
                let mut parts = head.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let (status, ctype, body) = if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
                    ("200 OK", "text/plain; version=0.0.4", handle.render())
                } else {
                    ("404 Not Found", "text/plain", "not found: metrics are at GET /metrics\n".to_string())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok(local)
}

/// Logs to stderr, filtered by RUST_LOG (default `info`).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
