//! Shared pieces of the benchmarks: latency statistics and input corpora.
use std::path::Path;
use std::time::Duration;

/// Percentile (0..=100) of sorted durations, nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn fmt_ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// Texts from a CSV whose first column is the text (Banking77's `text,category`), header skipped.
pub fn read_csv_texts(path: &Path, limit: usize) -> anyhow::Result<Vec<String>> {
    let raw = std::fs::read_to_string(path)?;
    let mut out = Vec::new();
    for line in raw.lines().skip(1) {
        if out.len() >= limit {
            break;
        }
        let text = if let Some(rest) = line.strip_prefix('"') {
            // quoted field: "" is an escaped quote; the field ends at a lone quote
            let mut s = String::new();
            let mut chars = rest.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        s.push('"');
                        chars.next();
                    } else {
                        break;
                    }
                } else {
                    s.push(c);
                }
            }
            s
        } else {
            line.rsplit_once(',').map(|(t, _)| t.to_string()).unwrap_or_default()
        };
        if !text.is_empty() {
            out.push(text);
        }
    }
    Ok(out)
}

/// The model folder to benchmark: CONCIERGE_MODEL_DIR, else the repository's default model.
pub fn default_model_dir() -> std::path::PathBuf {
    std::env::var_os("CONCIERGE_MODEL_DIR").map(Into::into).unwrap_or_else(concierge_models::repo_default_model_dir)
}

/// (text, label) pairs from a CSV of `text,label` rows (Banking77's `text,category`), header
/// skipped. Fields may be quoted, with "" for a quote and line breaks inside (a few Banking77
/// texts have them), so this reads records, not lines.
pub fn read_csv_labelled(path: &Path, limit: usize) -> anyhow::Result<Vec<(String, String)>> {
    let raw = std::fs::read_to_string(path)?;
    let mut records = Vec::new();
    let (mut fields, mut field) = (Vec::new(), String::new());
    let mut chars = raw.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            '"' if quoted => quoted = false,
            '"' if field.is_empty() => quoted = true,
            ',' if !quoted => fields.push(std::mem::take(&mut field)),
            '\n' if !quoted => {
                fields.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut fields));
            }
            '\r' if !quoted => {}
            c => field.push(c),
        }
    }
    if !field.is_empty() || !fields.is_empty() {
        fields.push(field);
        records.push(fields);
    }
    Ok(records
        .into_iter()
        .skip(1)
        .filter_map(|mut r| {
            let label = r.pop()?;
            let text = r.join(",");
            (!text.is_empty() && !label.is_empty()).then_some((text, label))
        })
        .take(limit)
        .collect())
}

/// Calls `run(offset)` back to back for `seconds` (at least 3 calls), `offset` growing by
/// `batch` each call; `run` handles one batch and returns how many inputs it answered. Returns
/// inputs/s and the sorted per-call latencies.
pub fn time_batches(seconds: f64, batch: usize, mut run: impl FnMut(usize) -> anyhow::Result<usize>) -> anyhow::Result<(f64, Vec<Duration>)> {
    let mut lat = Vec::new();
    let (mut done, mut offset) = (0usize, 0usize);
    let start = std::time::Instant::now();
    while start.elapsed().as_secs_f64() < seconds || lat.len() < 3 {
        let t0 = std::time::Instant::now();
        done += run(offset)?;
        lat.push(t0.elapsed());
        offset += batch;
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    Ok((done as f64 / secs, lat))
}

/// Runs each named [`Tasks`](concierge_server::text::Tasks) pass of a text model over `texts` at
/// batch 1 and 32 for `seconds` each (at least 3 batches) and prints inputs/s and batch latency
/// percentiles, one row per pass and batch size.
pub fn bench_text_passes(
    model: &concierge_server::text::TextModel,
    texts: &[String],
    passes: &[(&str, concierge_server::text::Tasks)],
    seconds: f64,
) -> anyhow::Result<()> {
    use concierge_engine::Backend;
    use concierge_server::text::TextInput;
    let w = passes.iter().map(|(n, _)| n.len()).max().unwrap_or(4).max(4);
    println!("{:<w$} {:>6} {:>10} {:>9} {:>9} {:>9}", "pass", "batch", "inputs/s", "p50 ms", "p90 ms", "p99 ms");
    for &(name, tasks) in passes {
        for batch in [1usize, 32] {
            let (rate, lat) = time_batches(seconds, batch, |k| {
                let inputs: Vec<TextInput> = (0..batch)
                    .map(|i| {
                        let t = &texts[(k + i) % texts.len()];
                        Ok(TextInput { tokens: model.encoder.tokenize(i, t, true)?, normalize: true, tasks, images: Vec::new() })
                    })
                    .collect::<anyhow::Result<_>>()?;
                Ok(model.run(&inputs.iter().collect::<Vec<_>>()).map_err(anyhow::Error::msg)?.len())
            })?;
            println!(
                "{:<w$} {:>6} {:>10.1} {:>9} {:>9} {:>9}",
                name, batch, rate,
                fmt_ms(percentile(&lat, 50.0)), fmt_ms(percentile(&lat, 90.0)), fmt_ms(percentile(&lat, 99.0))
            );
        }
    }
    Ok(())
}
