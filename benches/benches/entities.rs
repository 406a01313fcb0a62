//! Entity tagging throughput on CPU: sentences/s and batch latency percentiles at batch 1 and
//! 32, for the encoder + tagger pass (`Tasks::ENTITIES`), the same pass also pooling
//! embeddings (`embed + entities`: what sharing the encoder pass costs over either alone), and
//! embeddings alone for reference. Texts: the ATIS test file when the set-up fetched it, else
//! built-in queries.
//!   cargo bench -p concierge-benches --bench entities -- --seconds 5
use std::time::Instant;

use candle_core::{DType, Device};
use clap::Parser;
use concierge_benches::{default_model_dir, fmt_ms, percentile};
use concierge_engine::Backend;
use concierge_models::{BiLstmCrf, ModelSource, TextEncoder};
use concierge_server::text::{Tasks, TextInput, TextModel};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    #[arg(long)]
    tagger_dir: Option<std::path::PathBuf>,
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dev = Device::Cpu;
    let encoder = TextEncoder::load(&ModelSource::Dir(default_model_dir()), &dev, DType::F32, None)?;
    let tagger_dir = args.tagger_dir.clone().unwrap_or_else(|| root.join("checkpoints/entities-en-atis"));
    let tagger = BiLstmCrf::load(&tagger_dir, &dev, DType::F32)?;
    let model = TextModel { encoder, tagger: Some(tagger), intent: None };
    let atis = root.join("model-store/data/atis/test");
    let texts: Vec<String> = match concierge_models::sequence::data::read_atis(&atis) {
        Ok(s) => s.into_iter().map(|s| s.tokens.join(" ")).collect(),
        Err(_) => vec![
            "show me flights from boston to denver on monday".into(),
            "I need a cheap flight from Pittsburgh to Atlanta tomorrow morning".into(),
            "what is the fare from dallas to san francisco".into(),
        ],
    };
    println!("entities bench: tagger {}, {} texts, CPU threads {}", tagger_dir.display(), texts.len(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    println!("{:<18} {:>6} {:>10} {:>9} {:>9} {:>9}", "pass", "batch", "sent/s", "p50 ms", "p90 ms", "p99 ms");
    let both = Tasks { embed: true, entities: true, intent: false };
    for (name, tasks) in [("entities", Tasks::ENTITIES), ("embed + entities", both), ("embed", Tasks::EMBED)] {
        for batch in [1usize, 32] {
            let mut lat = Vec::new();
            let mut done = 0usize;
            let mut k = 0usize;
            let start = Instant::now();
            while start.elapsed().as_secs_f64() < args.seconds || lat.len() < 3 {
                let inputs: Vec<TextInput> = (0..batch)
                    .map(|i| {
                        let t = &texts[(k + i) % texts.len()];
                        Ok(TextInput { tokens: model.encoder.tokenize(i, t, true)?, normalize: true, tasks, images: Vec::new() })
                    })
                    .collect::<anyhow::Result<_>>()?;
                k += batch;
                let t0 = Instant::now();
                let out = model.run(&inputs.iter().collect::<Vec<_>>()).map_err(anyhow::Error::msg)?;
                lat.push(t0.elapsed());
                done += out.len();
            }
            let secs = start.elapsed().as_secs_f64();
            lat.sort();
            println!("{:<18} {:>6} {:>10.1} {:>9} {:>9} {:>9}", name, batch, done as f64 / secs,
                fmt_ms(percentile(&lat, 50.0)), fmt_ms(percentile(&lat, 90.0)), fmt_ms(percentile(&lat, 99.0)));
        }
    }
    Ok(())
}
