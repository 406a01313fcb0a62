//! Intent classification throughput on CPU: queries/s and batch latency percentiles at batch 1
//! and 32 for the encoder pass + intent head (`Tasks::INTENT`: with a fine-tuned branch, the
//! shared pass taps the states after layer `branch_from` and the head runs its own top layers),
//! for one pass answering embeddings, entities and intents together (what sharing costs over
//! the heads alone), and embeddings alone for reference. Texts: CLINC150's test queries when
//! ../shared/data has them, else built-in ones.
//!   cargo bench -p concierge-benches --bench intents -- --seconds 5
use std::time::Instant;

use candle_core::{DType, Device};
use clap::Parser;
use concierge_benches::{default_model_dir, fmt_ms, percentile};
use concierge_engine::Backend;
use concierge_models::intent::IntentModel;
use concierge_models::{BiLstmCrf, ModelInfo, ModelSource, TextEncoder};
use concierge_server::text::{IntentHead, Tasks, TextInput, TextModel};

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
    let model = TextModel { encoder, tagger: Some(tagger), intent: Some(IntentHead { model, info, no_images: None }) };
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
    println!("{:<26} {:>6} {:>10} {:>9} {:>9} {:>9}", "pass", "batch", "queries/s", "p50 ms", "p90 ms", "p99 ms");
    let all = Tasks { embed: true, entities: true, intent: true };
    for (name, tasks) in [("intents", Tasks::INTENT), ("embed + entities + intents", all), ("embed", Tasks::EMBED)] {
        for batch in [1usize, 32] {
            let mut lat = Vec::new();
            let (mut done, mut k) = (0usize, 0usize);
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
            println!("{:<26} {:>6} {:>10.1} {:>9} {:>9} {:>9}", name, batch, done as f64 / secs,
                fmt_ms(percentile(&lat, 50.0)), fmt_ms(percentile(&lat, 90.0)), fmt_ms(percentile(&lat, 99.0)));
        }
    }
    Ok(())
}
