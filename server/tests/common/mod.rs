//! Shared by the server tests: start a real server on 127.0.0.1:0 with the default model.
#![allow(dead_code)]
use std::time::{Duration, Instant};

use clap::Parser;
use concierge_proto::v1::embeddings_client::EmbeddingsClient;
use concierge_proto::v1::EmbedTextRequest;
use concierge_server::{start, Config, Running};
use tonic::transport::Channel;

pub use concierge_models::repo_default_model_dir as model_dir;

/// A config on loopback port 0 with the default model, plus `extra` flags.
pub fn config(extra: &[&str]) -> Config {
    let dir = model_dir();
    let mut args = vec![
        "concierge".to_string(),
        "--listen=127.0.0.1:0".into(),
        "--metrics-listen=127.0.0.1:0".into(),
    ];
    if !extra.iter().any(|a| a.starts_with("--model-dir")) {
        args.push(format!("--model-dir={}", dir.display()));
    }
    if !extra.iter().any(|a| a.starts_with("--image-model") || a.starts_with("--no-image-model")) {
        args.push(format!("--image-model-dir={}", tiny_image_model().display()));
    }
    if !extra.iter().any(|a| a.starts_with("--entity-model-dir") || a.starts_with("--no-entity-model")) {
        args.push(format!("--entity-model-dir={}", repo_path("checkpoints/entities-en-atis").display()));
    }
    if !extra.iter().any(|a| a.starts_with("--intent-model-dir") || a.starts_with("--no-intent-model")) {
        args.push(format!("--intent-model-dir={}", repo_path("checkpoints/intents-en-clinc150").display()));
    }
    if !extra.iter().any(|a| a.starts_with("--kb-dir")) {
        args.push(format!("--kb-dir={}", fresh_dir("kb").display()));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Config::try_parse_from(args).expect("valid test flags")
}

/// A tiny Caffe-style ResNet with a safe/unsafe head (the models crate's parity fixture plus
/// labels): the image model of the server tests, fast on any machine. Written once per process.
pub fn tiny_image_model() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/resnet-caffe-tiny");
        let dir = fresh_dir("tiny-moderation");
        std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
        cfg["labels"] = serde_json::json!(["safe", "unsafe"]);
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        dir
    })
    .clone()
}

/// An image of `w` x `h` in `format`, its pixels a pattern seeded by `seed`.
pub fn encoded_image(w: u32, h: u32, seed: u32, format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = x.wrapping_mul(7 + seed) ^ y.wrapping_mul(13 + 3 * seed) ^ seed.wrapping_mul(97);
        image::Rgb([(v % 251) as u8, (v / 3 % 241) as u8, ((x + y + seed) % 256) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// A path inside the repository.
pub fn repo_path(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// An empty folder of its own under cargo's scratch space for integration tests.
pub fn fresh_dir(what: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{what}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub async fn serve(extra: &[&str]) -> Running {
    let mut running = start(config(extra)).await.expect("server starts");
    running.ready(Duration::from_secs(60)).await.expect("server gets ready");
    running
}

pub async fn client(running: &Running) -> EmbeddingsClient<Channel> {
    EmbeddingsClient::connect(format!("http://{}", running.grpc_addr)).await.expect("connects")
}

/// The transport of [`unenforced`]: plain HTTP/2 over loopback, no timer of its own.
pub type Unenforced = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, tonic::body::Body>;

/// A transport for tests of what the *server* answers when a deadline passes. A call's
/// `grpc-timeout` still goes to the server, but unlike tonic's `Channel`, which arms its own timer
/// for that timeout and answers CANCELLED ("Timeout expired") when it fires, nothing on this side
/// enforces it. On a loaded machine tonic's timer can fire a moment before the server's
/// DEADLINE_EXCEEDED arrives, so asserting the server's code through a `Channel` is a race.
/// Use with a generated client's `with_origin(unenforced(), origin(&running))`.
pub fn unenforced() -> Unenforced {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http()
}

/// The server's gRPC address as a URI, for [`unenforced`] clients.
pub fn origin(running: &Running) -> tonic::codegen::http::Uri {
    format!("http://{}", running.grpc_addr).parse().expect("a valid URI")
}

pub fn request(inputs: &[&str]) -> EmbedTextRequest {
    EmbedTextRequest { inputs: inputs.iter().map(|s| s.to_string()).collect(), normalize: None, truncate: None }
}

/// GET a path from the metrics port over a plain socket; returns (status line, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of one sample line (`name{labels} value`) in Prometheus text, 0 when absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Waits until at least `n` inputs are queued on the text lane (the device is busy with them).
pub async fn until_queued(running: &Running, n: usize) {
    let t0 = Instant::now();
    while running.state.text.engine.queued() < n {
        assert!(t0.elapsed() < Duration::from_secs(10), "the inputs never reached the queue");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
