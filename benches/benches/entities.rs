//! Entity tagging throughput on CPU: sentences/s and batch latency percentiles at batch 1 and
//! 32, for the encoder + tagger pass (`Tasks::ENTITIES`), the same pass also pooling
//! embeddings (`embed + entities`: what sharing the encoder pass costs over either alone), and
//! embeddings alone for reference. Texts: the ATIS test file when the set-up fetched it, else
//! built-in queries.
//!   cargo bench -p concierge-benches --bench entities -- --seconds 5
use candle_core::{DType, Device};
use clap::Parser;
use concierge_benches::{bench_text_passes, default_model_dir};
use concierge_models::{BiLstmCrf, ModelSource, TextEncoder};
use concierge_server::text::{Tasks, TextModel};

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
    let encoder = concierge_server::registry::Version::wrap("bench", "bench", 0, encoder);
    let tagger = concierge_server::registry::Version::wrap("tagger", "tagger", 0, concierge_server::registry::Tagger { model: tagger, reads: None });
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
    let both = Tasks { embed: true, entities: true, intent: false };
    bench_text_passes(&model, &texts, &[("entities", Tasks::ENTITIES), ("embed + entities", both), ("embed", Tasks::EMBED)], args.seconds)?;
    Ok(())
}
