//! In-process text encoder throughput: sentences/s and tokens/s with batch latency percentiles,
//! at batch 1, 8, 32, 128 and sequence lengths 16, 64, 128 tokens; and, given a CSV of real
//! queries, end-to-end (tokenise + encode) throughput on them in arrival order.
//!   cargo bench -p concierge-benches --bench encoder                  # the grid
//!   cargo bench -p concierge-benches --bench encoder -- --texts ../shared/data/banking77/train.csv --n 1000 --batch 32
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
    // cargo bench passes --bench
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = args.model_dir.clone().unwrap_or_else(default_model_dir);
    let enc = TextEncoder::load(&ModelSource::Dir(dir), &Device::Cpu, DType::F32, None)?;
    println!("encoder bench: model {} ({}), threads {}", enc.info().id, enc.info().version, rayon_threads());
    match &args.texts {
        Some(path) => real_texts(&enc, &read_csv_texts(path, args.n)?, &args),
        None => grid(&enc, args.seconds),
    }
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

fn grid(enc: &TextEncoder, seconds: f64) -> anyhow::Result<()> {
    println!("{:>6} {:>6} {:>12} {:>12} {:>9} {:>9} {:>9}", "batch", "len", "sent/s", "tokens/s", "p50 ms", "p90 ms", "p99 ms");
    for &len in &[16usize, 64, 128] {
        for &batch in &[1usize, 8, 32, 128] {
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
            println!(
                "{batch:>6} {len:>6} {sps:>12.1} {:>12.0} {:>9} {:>9} {:>9}",
                sps * len as f64,
                fmt_ms(percentile(&lat, 50.0)), fmt_ms(percentile(&lat, 90.0)), fmt_ms(percentile(&lat, 99.0))
            );
        }
    }
    Ok(())
}
