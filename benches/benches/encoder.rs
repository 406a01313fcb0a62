//! In-process text encoder throughput: sentences/s and tokens/s with batch latency percentiles,
//! at batch 1, 8, 32, 128 and sequence lengths 16, 64, 128 tokens (or the grid given); and, given
//! a CSV of real queries, end-to-end (tokenise + encode) throughput on them in arrival order.
//!   cargo bench -p concierge-benches --bench encoder                  # the grid
//!   cargo bench -p concierge-benches --bench encoder -- --texts ../shared/data/banking77/train.csv --n 1000 --batch 32
//! On a GPU (built with `--features cuda`; `scripts/gpu-bench.sh` runs it against PyTorch):
//!   ... --bench encoder -- --device cuda:0 --dtype f16 --batches 1,32,256 --lengths 16,128,512 --json out.jsonl
//! Every timed call returns the pooled vectors to the host, so GPU work is finished when the
//! clock is read; inputs are real word pieces, never zeros.
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use clap::Parser;
use concierge_benches::{default_model_dir, fmt_ms, percentile, read_csv_texts};
use concierge_models::{ModelSource, TextEncoder, TokenizedText};

#[derive(Parser)]
struct Args {
    /// CSV of real texts (first column); when given, only the real-text run is done.
    #[arg(long)]
    texts: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 1000)]
    n: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Repetitions of the real-text run (the best is reported, and all are printed).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Seconds per grid cell.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    #[arg(long)]
    model_dir: Option<std::path::PathBuf>,
    /// `cpu` or `cuda:N` (a CUDA build).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weights and activations: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Grid batch sizes.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32, 128])]
    batches: Vec<usize>,
    /// Grid sequence lengths in tokens ([CLS] and [SEP] included).
    #[arg(long, value_delimiter = ',', default_values_t = [16usize, 64, 128])]
    lengths: Vec<usize>,
    /// Instead of timing: embed the parity sentences (models/tests/fixtures/minilm_parity.json)
    /// on --device/--dtype and on the CPU in f32, print each cosine and the lowest, and fail
    /// when the lowest is under --min-cosine.
    #[arg(long)]
    parity: bool,
    #[arg(long, default_value_t = 0.999)]
    min_cosine: f64,
    /// Also append one JSON object per grid cell (or the parity result) to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    // cargo bench passes --bench
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = args.model_dir.clone().unwrap_or_else(default_model_dir);
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        d => {
            let n = d.strip_prefix("cuda:").and_then(|n| n.parse().ok()).ok_or_else(|| anyhow::anyhow!("--device: cpu or cuda:N, not {d:?}"))?;
            Device::new_cuda(n).map_err(|e| anyhow::anyhow!("--device {d}: {e} (a build with --features cuda and a GPU are needed)"))?
        }
    };
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        d => anyhow::bail!("--dtype: f32, f16 or bf16, not {d:?}"),
    };
    let enc = TextEncoder::load(&ModelSource::Dir(dir.clone()), &device, dtype, None)?;
    println!(
        "encoder bench: model {} ({}), device {}, dtype {}, CPU threads {}",
        enc.info().id, enc.info().version, args.device, args.dtype, rayon_threads()
    );
    if args.parity {
        let reference = TextEncoder::load(&ModelSource::Dir(dir), &Device::Cpu, DType::F32, None)?;
        return parity(&enc, &reference, &args);
    }
    match &args.texts {
        Some(path) => real_texts(&enc, &read_csv_texts(path, args.n)?, &args),
        None => grid(&enc, &args),
    }
}

/// Cosine of each parity sentence's embedding on the benchmarked device and dtype against the
/// f32 CPU embedding of the same weights.
fn parity(enc: &TextEncoder, reference: &TextEncoder, args: &Args) -> anyhow::Result<()> {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tests/fixtures/minilm_parity.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture)?)?;
    let sentences: Vec<String> = v["sentences"].as_array().map(|a| a.iter().filter_map(|s| s["text"].as_str().map(String::from)).collect()).unwrap_or_default();
    anyhow::ensure!(!sentences.is_empty(), "{fixture} has no sentences");
    let embed = |e: &TextEncoder| -> anyhow::Result<Vec<Vec<f32>>> {
        let toks: Vec<TokenizedText> = sentences.iter().enumerate().map(|(i, t)| e.tokenize(i, t, true)).collect::<Result<_, _>>()?;
        Ok(e.embed(&toks.iter().collect::<Vec<_>>(), &vec![false; toks.len()])?)
    };
    let (got, want) = (embed(enc)?, embed(reference)?);
    let mut lowest = f64::INFINITY;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let dot: f64 = g.iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum();
        let norm = |x: &[f32]| x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let cos = dot / (norm(g) * norm(w));
        let cos = if cos.is_finite() { cos } else { f64::NEG_INFINITY };
        println!("sentence {i:>2}: cosine {cos:.6}");
        lowest = lowest.min(cos);
    }
    println!("RESULT parity device {} dtype {} vs cpu f32: lowest cosine {lowest:.6} over {} sentences", args.device, args.dtype, got.len());
    if let Some(p) = &args.json {
        use std::io::Write;
        let row = serde_json::json!({"impl": "concierge", "parity": true, "model": enc.info().id, "device": args.device,
            "dtype": args.dtype, "lowest_cosine": lowest, "sentences": got.len()});
        writeln!(std::fs::OpenOptions::new().create(true).append(true).open(p)?, "{row}")?;
    }
    anyhow::ensure!(lowest >= args.min_cosine, "lowest cosine {lowest:.6} is under {}", args.min_cosine);
    Ok(())
}

fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| std::thread::available_parallelism().map(|n| n.to_string()).unwrap_or_default())
}

fn real_texts(enc: &TextEncoder, texts: &[String], args: &Args) -> anyhow::Result<()> {
    let mut best = 0f64;
    for rep in 0..args.repeat.max(1) {
        let mut lat = Vec::new();
        let mut tokens = 0usize;
        let start = Instant::now();
        for chunk in texts.chunks(args.batch) {
            let t0 = Instant::now();
            let toks: Vec<TokenizedText> = chunk.iter().enumerate().map(|(i, t)| enc.tokenize(i, t, true)).collect::<Result<_, _>>()?;
            tokens += toks.iter().map(|t| t.len()).sum::<usize>();
            let refs: Vec<_> = toks.iter().collect();
            let out = enc.embed(&refs, &vec![true; refs.len()])?;
            assert_eq!(out.len(), chunk.len());
            lat.push(t0.elapsed());
        }
        let secs = start.elapsed().as_secs_f64();
        lat.sort();
        let sps = texts.len() as f64 / secs;
        best = best.max(sps);
        println!(
            "real texts run {rep}: {} texts, batch {}, {:.1} sentences/s, {:.0} tokens/s, batch latency p50 {} p90 {} p99 {} ms",
            texts.len(), args.batch, sps, tokens as f64 / secs,
            fmt_ms(percentile(&lat, 50.0)), fmt_ms(percentile(&lat, 90.0)), fmt_ms(percentile(&lat, 99.0))
        );
    }
    println!("RESULT concierge sentences_per_s {best:.1}");
    Ok(())
}

/// An input of exactly `len` tokens ([CLS] + words + [SEP]).
fn synthetic(enc: &TextEncoder, len: usize, salt: usize) -> TokenizedText {
    let words = ["order", "refund", "parcel", "colour", "size", "price", "cream", "skin", "card", "delivery"];
    let mut text = String::new();
    let mut k = salt;
    loop {
        let t = enc.tokenize(0, &text, true).unwrap();
        if t.len() >= len {
            let mut t = t;
            t.ids.truncate(len - 1);
            t.ids.push(102);
            t.type_ids.truncate(len);
            t.words.truncate(len);
            t.offsets.truncate(len);
            return t;
        }
        text.push_str(words[k % words.len()]);
        text.push(' ');
        k += 7;
    }
}

fn grid(enc: &TextEncoder, args: &Args) -> anyhow::Result<()> {
    let seconds = args.seconds;
    let mut json = match &args.json {
        Some(p) => Some(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
        None => None,
    };
    let limit = enc.info().max_input_tokens;
    println!("{:>6} {:>6} {:>12} {:>12} {:>9} {:>9} {:>9}", "batch", "len", "sent/s", "tokens/s", "p50 ms", "p90 ms", "p99 ms");
    for &len in &args.lengths {
        if len < 3 || len > limit {
            println!("{:>6} {len:>6} skipped: the model takes 3..={limit} tokens", "-");
            continue;
        }
        for &batch in &args.batches {
            let inputs: Vec<TokenizedText> = (0..batch).map(|i| synthetic(enc, len, i)).collect();
            let refs: Vec<_> = inputs.iter().collect();
            let norm = vec![true; batch];
            enc.embed(&refs, &norm)?; // warm-up
            let mut lat: Vec<Duration> = Vec::new();
            let start = Instant::now();
            while start.elapsed().as_secs_f64() < seconds || lat.len() < 3 {
                let t0 = Instant::now();
                enc.embed(&refs, &norm)?;
                lat.push(t0.elapsed());
            }
            let total = start.elapsed().as_secs_f64();
            lat.sort();
            let sps = (lat.len() * batch) as f64 / total;
            let (p50, p90, p99) = (percentile(&lat, 50.0), percentile(&lat, 90.0), percentile(&lat, 99.0));
            println!("{batch:>6} {len:>6} {sps:>12.1} {:>12.0} {:>9} {:>9} {:>9}", sps * len as f64, fmt_ms(p50), fmt_ms(p90), fmt_ms(p99));
            if let Some(f) = json.as_mut() {
                use std::io::Write;
                let row = serde_json::json!({
                    "impl": "concierge", "model": enc.info().id, "device": args.device, "dtype": args.dtype,
                    "batch": batch, "len": len, "sentences_per_s": sps, "tokens_per_s": sps * len as f64,
                    "p50_ms": p50.as_secs_f64() * 1e3, "p90_ms": p90.as_secs_f64() * 1e3, "p99_ms": p99.as_secs_f64() * 1e3,
                    "calls": lat.len(),
                });
                writeln!(f, "{row}")?;
            }
        }
    }
    Ok(())
}
