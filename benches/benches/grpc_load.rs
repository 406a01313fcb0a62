//! gRPC load generator: N concurrent callers send a fixed number of EmbedText requests (one
//! text each, real queries when a CSV is given) and the run prints throughput and latency
//! percentiles. By default it starts the server in-process twice, with dynamic batching on
//! (max batch 128) and off (max batch 1), on 127.0.0.1 port 0; with --addr it loads a running
//! server instead. Every run is bounded by --max-seconds.
//!   cargo bench -p concierge-benches --bench grpc_load -- --concurrency 64 --requests 2000 \
//!       --texts /path/to/banking77/train.csv
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use concierge_benches::{default_model_dir, fmt_ms, percentile, read_csv_texts};
use concierge_proto::v1::embeddings_client::EmbeddingsClient;
use concierge_proto::v1::EmbedTextRequest;
use tokio::sync::Mutex;

#[derive(Parser, Clone)]
struct Args {
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Inputs per request.
    #[arg(long, default_value_t = 1)]
    inputs: usize,
    /// CSV of texts (first column); default: a built-in set of customer queries.
    #[arg(long)]
    texts: Option<std::path::PathBuf>,
    /// Load this running server (host:port) instead of starting one in-process.
    #[arg(long)]
    addr: Option<String>,
    /// Stop sending after this long, whatever is left.
    #[arg(long, default_value_t = 120)]
    max_seconds: u64,
    /// --max-wait-ms of the in-process server.
    #[arg(long, default_value_t = 0)]
    max_wait_ms: u64,
    #[arg(long, hide = true)]
    bench: bool,
}

const BUILTIN: &[&str] = &[
    "Does this cream suit sensitive skin?",
    "How do I close this popup?",
    "Where is my order #A-1029384?",
    "I want to return the blue jacket, size M, it is too small.",
    "Can I pay with Apple Pay or only by card?",
    "My card was declined at checkout, why?",
    "这款面霜适合敏感肌肤吗？",
    "How long does shipping to Canada take?",
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let texts: Arc<Vec<String>> = Arc::new(match &args.texts {
        Some(p) => read_csv_texts(p, 100_000)?,
        None => BUILTIN.iter().map(|s| s.to_string()).collect(),
    });
    println!(
        "grpc load: {} callers, {} requests of {} input(s), {} distinct texts",
        args.concurrency, args.requests, args.inputs, texts.len()
    );
    if let Some(addr) = &args.addr {
        run(&format!("http://{addr}"), &args, texts, "external server").await?;
        return Ok(());
    }
    let model_dir = default_model_dir();
    for (label, batch) in [("batching on (max batch 128)", "128"), ("batching off (max batch 1)", "1")] {
        let cfg = <concierge_server::Config as clap::Parser>::try_parse_from([
            "concierge",
            "--listen=127.0.0.1:0",
            "--metrics-listen=127.0.0.1:0",
            &format!("--model-dir={}", model_dir.display()),
            &format!("--max-batch-size={batch}"),
            &format!("--max-wait-ms={}", args.max_wait_ms),
            "--max-queued-inputs=100000",
            "--no-image-model",
            "--no-entity-model",
            "--no-intent-model",
        ])?;
        let mut server = concierge_server::start(cfg).await?;
        server.ready(Duration::from_secs(120)).await?;
        run(&format!("http://{}", server.grpc_addr), &args, texts.clone(), label).await?;
        server.shutdown().await?;
    }
    Ok(())
}

async fn run(url: &str, args: &Args, texts: Arc<Vec<String>>, label: &str) -> anyhow::Result<()> {
    let client = EmbeddingsClient::connect(url.to_string()).await?;
    // warm-up
    client.clone().embed_text(EmbedTextRequest { inputs: vec![texts[0].clone()], normalize: None, truncate: Some(true) }).await?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(args.requests)));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop_at = Instant::now() + Duration::from_secs(args.max_seconds);
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (mut c, next, lat, errors, texts, total, per) =
            (client.clone(), next.clone(), latencies.clone(), errors.clone(), texts.clone(), args.requests, args.inputs);
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total || Instant::now() >= stop_at {
                    break;
                }
                let inputs = (0..per).map(|k| texts[(i * per + k) % texts.len()].clone()).collect();
                let t0 = Instant::now();
                match c.embed_text(EmbedTextRequest { inputs, normalize: None, truncate: Some(true) }).await {
                    Ok(_) => mine.push(t0.elapsed()),
                    Err(_) => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            lat.lock().await.extend(mine);
        }));
    }
    for w in workers {
        w.await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let mut lat = latencies.lock().await.clone();
    lat.sort();
    let ok = lat.len();
    println!(
        "{label}: {ok} ok, {} errors in {secs:.2} s: {:.1} requests/s, {:.1} inputs/s; latency p50 {} p90 {} p99 {} ms",
        errors.load(std::sync::atomic::Ordering::Relaxed),
        ok as f64 / secs,
        (ok * args.inputs) as f64 / secs,
        fmt_ms(percentile(&lat, 50.0)),
        fmt_ms(percentile(&lat, 90.0)),
        fmt_ms(percentile(&lat, 99.0)),
    );
    Ok(())
}
