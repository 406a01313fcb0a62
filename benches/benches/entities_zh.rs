//! Chinese entity tagging on the character lane: `extract_from_chars` (character [+ bigram]
//! ids, BiLSTM, CRF Viterbi and marginals, spans) at batch 1 and 32, over MSRA test sentences,
//! CPU. Prints sentences/s and latency percentiles per batch.
//!
//!   cargo bench -p concierge-benches --bench entities_zh -- --seconds 5 [--tagger-dir DIR]
use candle_core::{DType, Device};
use clap::Parser;
use concierge_benches::{fmt_ms, percentile, time_batches};
use concierge_models::entities::extract_from_chars;
use concierge_models::BiLstmCrf;

#[derive(Parser)]
struct Args {
    /// Seconds per batch size.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// The character tagger (default: checkpoints/entities-zh-msra).
    #[arg(long)]
    tagger_dir: Option<std::path::PathBuf>,
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dev = Device::Cpu;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = args.tagger_dir.clone().unwrap_or_else(|| root.join("checkpoints/entities-zh-msra"));
    let tagger = BiLstmCrf::load(&dir, &dev, DType::F32)?;
    let data = root.join("model-store/data/msra/msra_test.txt");
    let texts: Vec<String> = match concierge_models::sequence::data::read_msra(&data) {
        Ok(s) => s.into_iter().map(|s| s.tokens.concat()).collect(),
        Err(e) => anyhow::bail!("{}: {e}; run scripts/fetch-default-model.sh (it fetches the tagger data)", data.display()),
    };
    let mean_len = texts.iter().map(|t| t.chars().count()).sum::<usize>() as f64 / texts.len() as f64;
    println!(
        "entities_zh bench: tagger {} (bigrams: {}), {} MSRA test sentences (mean {mean_len:.1} characters), CPU threads {}",
        dir.display(),
        tagger.bigrams().is_some(),
        texts.len(),
        candle_core::utils::get_num_threads()
    );
    println!("| batch | sentences/s | p50 ms | p90 ms | p99 ms |\n|---|---|---|---|---|");
    for batch in [1usize, 32] {
        let (rate, lat) = time_batches(args.seconds, batch, |k| {
            let chunk: Vec<&str> = (0..batch).map(|i| texts[(k + i) % texts.len()].as_str()).collect();
            Ok(extract_from_chars(&tagger, &chunk, &dev)?.len())
        })?;
        println!(
            "| {batch} | {rate:.1} | {} | {} | {} |",
            fmt_ms(percentile(&lat, 50.0)),
            fmt_ms(percentile(&lat, 90.0)),
            fmt_ms(percentile(&lat, 99.0))
        );
    }
    Ok(())
}
