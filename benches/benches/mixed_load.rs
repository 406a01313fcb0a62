//! Text and image callers on one server, over gRPC: how the device thread shares itself. Runs
//! text callers alone, image callers alone, then both at once, each phase for --seconds, and
//! prints per-lane throughput and latency percentiles. The server runs in-process on the
//! default models (text: all-MiniLM-L6-v2; images: Open-NSFW over the set-up's sample photos).
//!   cargo bench -p concierge-benches --bench mixed_load -- --text-callers 16 --image-callers 4 --seconds 10
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use concierge_benches::{default_model_dir, fmt_ms, percentile};
use concierge_proto::v1::embeddings_client::EmbeddingsClient;
use concierge_proto::v1::{EmbedImageRequest, EmbedTextRequest};
use tonic::transport::Channel;

#[derive(Parser, Clone)]
struct Args {
    #[arg(long, default_value_t = 16)]
    text_callers: usize,
    #[arg(long, default_value_t = 4)]
    image_callers: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// --max-image-batch-size of the server.
    #[arg(long, default_value_t = 32)]
    max_image_batch: usize,
    #[arg(long, hide = true)]
    bench: bool,
}

const TEXTS: &[&str] = &[
    "Does this cream suit sensitive skin?",
    "How do I close this popup?",
    "Where is my order #A-1029384?",
    "I want to return the blue jacket, size M, it is too small.",
    "Can I pay with Apple Pay or only by card?",
    "How long does shipping to Canada take?",
];

#[derive(Default)]
struct Lane {
    lat: Vec<Duration>,
    errors: usize,
}

fn report(phase: &str, lane: &str, l: &mut Lane, secs: f64) {
    l.lat.sort();
    if l.lat.is_empty() && l.errors == 0 {
        return;
    }
    println!(
        "{phase:<12} {lane:<6} {:>8.1} req/s  p50 {:>8} p90 {:>8} p99 {:>8} ms  ({} ok, {} errors)",
        l.lat.len() as f64 / secs,
        fmt_ms(percentile(&l.lat, 50.0)),
        fmt_ms(percentile(&l.lat, 90.0)),
        fmt_ms(percentile(&l.lat, 99.0)),
        l.lat.len(),
        l.errors
    );
}

async fn phase(client: &EmbeddingsClient<Channel>, images: &Arc<Vec<Vec<u8>>>, text_callers: usize, image_callers: usize, seconds: f64, name: &str) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for k in 0..text_callers {
        let (mut c, stop) = (client.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut l = Lane::default();
            let mut i = k;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let req = EmbedTextRequest { inputs: vec![TEXTS[i % TEXTS.len()].to_string()], normalize: None, truncate: Some(true) };
                match c.embed_text(req).await {
                    Ok(_) => l.lat.push(t0.elapsed()),
                    Err(_) => l.errors += 1,
                }
                i += 1;
            }
            (true, l)
        }));
    }
    for k in 0..image_callers {
        let (mut c, stop, images) = (client.clone(), stop.clone(), images.clone());
        tasks.push(tokio::spawn(async move {
            let mut l = Lane::default();
            let mut i = k;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let req = EmbedImageRequest { images: vec![images[i % images.len()].clone()], normalize: None };
                match c.embed_image(req).await {
                    Ok(_) => l.lat.push(t0.elapsed()),
                    Err(_) => l.errors += 1,
                }
                i += 1;
            }
            (false, l)
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut text, mut image) = (Lane::default(), Lane::default());
    for t in tasks {
        let (is_text, l) = t.await.expect("caller task");
        let into = if is_text { &mut text } else { &mut image };
        into.lat.extend(l.lat);
        into.errors += l.errors;
    }
    let secs = start.elapsed().as_secs_f64();
    report(name, "text", &mut text, secs);
    report(name, "image", &mut image, secs);
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let photos = root.join("model-store/open-nsfw-reference/images");
    let mut files: Vec<_> = std::fs::read_dir(&photos)
        .map_err(|e| anyhow::anyhow!("{}: {e}; run scripts/fetch-default-model.sh", photos.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    let images: Arc<Vec<Vec<u8>>> = Arc::new(files.iter().map(std::fs::read).collect::<Result<_, _>>()?);
    let cfg = <concierge_server::Config as clap::Parser>::try_parse_from([
        "concierge".to_string(),
        "--listen=127.0.0.1:0".into(),
        "--metrics-listen=127.0.0.1:0".into(),
        format!("--model-dir={}", default_model_dir().display()),
        format!("--image-model-dir={}", root.join("model-store/open-nsfw").display()),
        format!("--kb-dir={}", tempfile::tempdir()?.keep().display()),
        format!("--max-image-batch-size={}", args.max_image_batch),
        "--max-queued-inputs=100000".into(),
        "--no-entity-model".into(),
        "--no-intent-model".into(),
    ])?;
    let mut server = concierge_server::start(cfg).await?;
    server.ready(Duration::from_secs(120)).await?;
    let client = EmbeddingsClient::connect(format!("http://{}", server.grpc_addr)).await?;
    println!(
        "mixed load: {} text callers (1 text each), {} image callers (1 photo each), {} s per phase, max image batch {}",
        args.text_callers, args.image_callers, args.seconds, args.max_image_batch
    );
    phase(&client, &images, args.text_callers, 0, args.seconds, "text alone").await;
    phase(&client, &images, 0, args.image_callers, args.seconds, "images alone").await;
    phase(&client, &images, args.text_callers, args.image_callers, args.seconds, "mixed").await;
    server.shutdown().await?;
    Ok(())
}
