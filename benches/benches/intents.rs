//! Intent classification throughput on CPU: queries/s and batch latency percentiles at batch 1
//! and 32 for the encoder pass + intent head (`Tasks::INTENT`: with a fine-tuned branch, the
//! shared pass taps the states after layer `branch_from` and the head runs its own top layers),
//! for one pass answering embeddings, entities and intents together (what sharing costs over
//! the heads alone), and embeddings alone for reference. Texts: CLINC150's test queries when
//! ../shared/data has them, else built-in ones.
//!   cargo bench -p concierge-benches --bench intents -- --seconds 5
use candle_core::{DType, Device};
use clap::Parser;
use concierge_benches::{bench_text_passes, default_model_dir};
use concierge_models::intent::IntentModel;
use concierge_models::{BiLstmCrf, ModelInfo, ModelSource, TextEncoder};
use concierge_server::text::{IntentHead, Tasks, TextModel};
use concierge_server::registry::{Tagger, Version};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Intent checkpoint (default: checkpoints/intents-en-clinc150).
    #[arg(long)]
    intent_dir: Option<std::path::PathBuf>,
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dev = Device::Cpu;
    let encoder = TextEncoder::load(&ModelSource::Dir(default_model_dir()), &dev, DType::F32, None)?;
    let intent_dir = args.intent_dir.clone().unwrap_or_else(|| root.join("checkpoints/intents-en-clinc150"));
    let model = IntentModel::load(&intent_dir, &dev)?;
    let branch = model.config().branch_from;
    let info = ModelInfo { id: "bench".into(), version: String::new(), dimension: 0, max_input_tokens: 0 };
    let tagger = BiLstmCrf::load(&root.join("checkpoints/entities-en-atis"), &dev, DType::F32)?;
    let labels = model.labels().len();
    let _ = info;
    let encoder = Version::wrap("bench", "bench", 0, encoder);
    let tagger = Version::wrap("tagger", "tagger", 0, Tagger { model: tagger, reads: None });
    let head = IntentHead { model, reads: None, fuses_with: None, no_images: None };
    let model = TextModel { encoder, tagger: Some(tagger), intent: Some(Version::wrap("bench", "bench", labels, head)) };
    let clinc = root.join("../shared/data/clinc150/data_full.json");
    let texts: Vec<String> = match std::fs::read_to_string(&clinc).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()) {
        Some(v) => v["test"].as_array().map(|a| a.iter().filter_map(|i| i[0].as_str().map(String::from)).collect()).unwrap_or_default(),
        None => vec![
            "what is the exchange rate between dollars and euros".into(),
            "please book a table for two at an italian restaurant tonight".into(),
            "how many calories are in a banana".into(),
        ],
    };
    println!(
        "intents bench: {} ({labels} labels, branch from layer {branch:?}), {} texts, CPU threads {}",
        intent_dir.display(), texts.len(), std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let all = Tasks { embed: true, entities: true, intent: true };
    bench_text_passes(&model, &texts, &[("intents", Tasks::INTENT), ("embed + entities + intents", all), ("embed", Tasks::EMBED)], args.seconds)?;
    Ok(())
}
