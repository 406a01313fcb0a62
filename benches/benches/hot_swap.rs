//! What a checkpoint swap costs callers: Classify and EmbedText callers over gRPC against an
//! in-process server (all-MiniLM-L6-v2 with the CLINC150 intent head), steady, then while
//! an operator loads, canaries and promotes new intent and text-encoder checkpoints back to back
//! through the Models admin API, then steady again. Prints throughput, latency percentiles and failed calls per
//! phase, and how long each load (read, check, warm up) took.
//!   cargo bench -p concierge-benches --bench hot_swap -- --callers 8 --seconds 15
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use concierge_benches::{default_model_dir, fmt_ms, percentile};
use concierge_proto::v1::embeddings_client::EmbeddingsClient;
use concierge_proto::v1::intents_client::IntentsClient;
use concierge_proto::v1::models_client::ModelsClient;
use concierge_proto::v1::{model_source, ClassifyRequest, EmbedTextRequest, LoadModelRequest, ModelSource, PromoteModelRequest, Query};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

#[derive(Parser, Clone)]
struct Args {
    /// Concurrent callers (half Classify, half EmbedText), one text per call.
    #[arg(long, default_value_t = 8)]
    callers: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 15.0)]
    seconds: f64,
    #[arg(long, hide = true)]
    bench: bool,
}

const TOKEN: &str = "bench-token";
const TEXTS: &[&str] = &[
    "Does this cream suit sensitive skin?",
    "Where is my order #A-1029384?",
    "I want to return the blue jacket, size M, it is too small.",
    "what is my account balance",
    "set an alarm for 6 am",
];

fn link_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let to = dst.join(e.file_name());
        if e.file_type()?.is_dir() {
            link_tree(&e.path(), &to)?;
        } else {
            std::os::unix::fs::symlink(e.path().canonicalize()?, &to)?;
        }
    }
    Ok(())
}

fn admin<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {TOKEN}")).unwrap());
    r
}

#[derive(Default)]
struct Calls {
    lat: Vec<Duration>,
    errors: usize,
}

async fn phase(channel: &Channel, callers: usize, seconds: f64, swapping: Option<tokio::task::JoinHandle<anyhow::Result<Vec<f64>>>>, name: &str) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let calls: Arc<Mutex<[Calls; 2]>> = Arc::default();
    let mut tasks = Vec::new();
    for c in 0..callers {
        let (stop, calls, channel) = (stop.clone(), calls.clone(), channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut intents = IntentsClient::new(channel.clone());
            let mut embed = EmbeddingsClient::new(channel);
            let mut n = c;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let text = TEXTS[n % TEXTS.len()].to_string();
                let t0 = Instant::now();
                let ok = if c % 2 == 0 {
                    let q = ClassifyRequest { queries: vec![Query { text, images: vec![] }], ..Default::default() };
                    intents.classify(q).await.is_ok()
                } else {
                    embed.embed_text(EmbedTextRequest { inputs: vec![text], normalize: None, truncate: None }).await.is_ok()
                };
                let mut calls = calls.lock().unwrap();
                let k = &mut calls[c % 2];
                if ok { k.lat.push(t0.elapsed()) } else { k.errors += 1 }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let loads = match swapping {
        Some(s) => {
            let loads = s.await??;
            Some(loads)
        }
        None => None,
    };
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let mut calls = calls.lock().unwrap();
    for (rpc, k) in ["Classify", "EmbedText"].iter().zip(calls.iter_mut()) {
        k.lat.sort();
        println!(
            "{name:<10} {rpc:<9} {:>7.1} req/s  p50 {:>7} p90 {:>7} p99 {:>7} max {:>7} ms  ({} ok, {} failed)",
            k.lat.len() as f64 / seconds,
            fmt_ms(percentile(&k.lat, 50.0)),
            fmt_ms(percentile(&k.lat, 90.0)),
            fmt_ms(percentile(&k.lat, 99.0)),
            fmt_ms(k.lat.last().copied().unwrap_or_default()),
            k.lat.len(),
            k.errors
        );
    }
    if let Some(loads) = loads {
        let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
        println!("{name:<10} {} loads (read, checked, warmed) in {mean:.2} s each on average; each followed by promotions to 10% and 100%", loads.len());
    }
    Ok(())
}

/// Loads, canaries and promotes copies of the intent and text-encoder checkpoints until
/// `seconds` pass; returns each load's seconds.
async fn swap(channel: Channel, dirs: Vec<(String, PathBuf)>, seconds: f64) -> anyhow::Result<Vec<f64>> {
    let mut models = ModelsClient::new(channel);
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut loads = Vec::new();
    let mut n = 0;
    while Instant::now() < end {
        let (slot, dir) = &dirs[n % dirs.len()];
        n += 1;
        let source = Some(ModelSource { source: Some(model_source::Source::LocalDir(dir.display().to_string())) });
        let r = models.load(admin(LoadModelRequest { slot: slot.clone(), source, version: format!("{slot}-{n}") })).await?.into_inner();
        loads.push(r.load_seconds);
        for p in [10.0, 100.0] {
            models.promote(admin(PromoteModelRequest { slot: slot.clone(), traffic_percent: p })).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    Ok(loads)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let scratch = tempfile::tempdir()?;
    let mut dirs = Vec::new();
    for (slot, src) in [("intent", root.join("checkpoints/intents-en-clinc150")), ("text-encoder", default_model_dir())] {
        let dst = scratch.path().join(slot);
        link_tree(&src, &dst)?;
        dirs.push((slot.to_string(), dst));
    }
    let cfg = <concierge_server::Config as clap::Parser>::try_parse_from([
        "concierge".to_string(),
        "--listen=127.0.0.1:0".into(),
        "--metrics-listen=127.0.0.1:0".into(),
        format!("--model-dir={}", default_model_dir().display()),
        format!("--intent-model-dir={}", root.join("checkpoints/intents-en-clinc150").display()),
        format!("--kb-dir={}", scratch.path().join("kb").display()),
        format!("--admin-token={TOKEN}"),
        "--no-image-model".into(),
        "--no-entity-model".into(),
    ])?;
    let mut server = concierge_server::start(cfg).await?;
    server.ready(Duration::from_secs(120)).await?;
    let channel = Channel::from_shared(format!("http://{}", server.grpc_addr))?.connect().await?;
    println!("hot swap: {} callers (half Classify, half EmbedText, one text each), {} s per phase", args.callers, args.seconds);
    phase(&channel, args.callers, args.seconds, None, "steady").await?;
    let swapping = tokio::spawn(swap(channel.clone(), dirs, args.seconds));
    phase(&channel, args.callers, args.seconds, Some(swapping), "swapping").await?;
    phase(&channel, args.callers, args.seconds, None, "after").await?;
    server.shutdown().await?;
    Ok(())
}
