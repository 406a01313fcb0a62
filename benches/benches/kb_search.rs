//! Knowledge-base search, in-process: loads raw little-endian f32 vectors into a `Store` in a temp
//! dir (dot product, vectors as given), then runs the queries through `Collection::search` in
//! batches of each --batch size and prints queries/s and per-batch latency percentiles. The
//! top-k ids of every query go to --ids-out (one line per query, ids space-separated, best
//! first) for a recall check against another index. Threads: rayon's pool (RAYON_NUM_THREADS).
//!   cargo bench -p concierge-benches --bench kb_search -- --vectors /abs/base.f32 \
//!       --queries /abs/queries.f32 --dim 384 --batch 1,8,32 --k 10 --ids-out /abs/ids.txt
//! `benches/kb_vs_faiss.py` generates the inputs and runs this next to FAISS.
use std::collections::BTreeMap;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use concierge_benches::{fmt_ms, percentile};
use concierge_kb::store::{Store, StoreOptions};
use concierge_kb::{CollectionSpec, Document, Metric, Op, Query};

#[derive(Parser)]
struct Args {
    /// Rows to store: raw little-endian f32, row-major [n, dim].
    #[arg(long)]
    vectors: PathBuf,
    /// Queries: raw little-endian f32, row-major [nq, dim].
    #[arg(long)]
    queries: PathBuf,
    #[arg(long, default_value_t = 384)]
    dim: usize,
    /// Queries per `Collection::search` call; one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batch: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Documents per upsert while loading.
    #[arg(long, default_value_t = 10_000)]
    chunk: usize,
    /// Run only the first N queries at batch 1 (a full scan per query is slow at 1M rows).
    #[arg(long)]
    batch1_queries: Option<usize>,
    /// Where to write the top-k ids (from the largest batch size, which runs every query).
    #[arg(long)]
    ids_out: Option<PathBuf>,
    /// Where the store's temp dir goes (default: the system temp dir).
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    #[arg(long, hide = true)]
    bench: bool,
}

fn read_f32(path: &Path, dim: usize) -> anyhow::Result<Vec<f32>> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata()?.len() as usize;
    anyhow::ensure!(len.is_multiple_of(4 * dim), "{}: {len} bytes is not a whole number of {dim}-dim f32 rows", path.display());
    let mut out = Vec::with_capacity(len / 4);
    let mut buf = vec![0u8; 1 << 22];
    loop {
        let got = f.read(&mut buf)?;
        if got == 0 {
            break;
        }
        // 4 MiB reads from a regular file come back whole except the last; keep the stream aligned.
        let whole = got - got % 4;
        out.extend(buf[..whole].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        if whole != got {
            let mut rest = [0u8; 4];
            let have = got - whole;
            rest[..have].copy_from_slice(&buf[whole..got]);
            f.read_exact(&mut rest[have..])?;
            out.push(f32::from_le_bytes(rest));
        }
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let d = args.dim;
    let vectors = read_f32(&args.vectors, d)?;
    let queries = read_f32(&args.queries, d)?;
    let (n, nq) = (vectors.len() / d, queries.len() / d);
    println!(
        "kb search: {n} rows x {d}, {nq} queries, top-{}, {} rayon threads",
        args.k,
        rayon::current_num_threads()
    );

    let tmp = match &args.tmp_dir {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    // No snapshot during the load: it would be timed as part of it.
    let (store, _) = Store::open(tmp.path(), StoreOptions { snapshot_after_bytes: u64::MAX, ..Default::default() })?;
    store.write(Op::CreateCollection(CollectionSpec {
        name: "bench".into(),
        dimension: d as u32,
        metric: Metric::Dot,
        min_score: None,
        embedder: "synthetic".into(),
    }))?;
    let t0 = Instant::now();
    for lo in (0..n).step_by(args.chunk.max(1)) {
        let hi = (lo + args.chunk.max(1)).min(n);
        let documents = (lo..hi)
            .map(|i| Document {
                id: i.to_string(),
                title: String::new(),
                text: String::new(),
                metadata: BTreeMap::new(),
                vector: vectors[i * d..(i + 1) * d].to_vec(),
            })
            .collect();
        store.write(Op::Upsert { collection: "bench".into(), documents })?;
    }
    let load = t0.elapsed().as_secs_f64();
    drop(vectors);
    println!("load: {n} rows in {load:.2} s ({:.0} rows/s, durable upserts of {})", n as f64 / load, args.chunk);
    let coll = store.collection("bench")?;
    anyhow::ensure!(coll.len() == n, "the collection holds {} rows, expected {n}", coll.len());

    let qs: Vec<Query> = queries
        .chunks_exact(d)
        .map(|v| Query { vector: v.to_vec(), top_k: args.k, min_score: None, filter: Vec::new() })
        .collect();
    let largest = args.batch.iter().copied().max().unwrap_or(1);
    let mut ids: Vec<Vec<String>> = Vec::new();
    let mut by_batch: Vec<(usize, Vec<Vec<String>>)> = Vec::new();
    println!(" batch  queries      QPS    p50 ms    p99 ms");
    for &b in &args.batch {
        let b = b.max(1);
        let run = if b == 1 { args.batch1_queries.unwrap_or(nq).min(nq) } else { nq };
        let refs: Vec<&Query> = qs[..run].iter().collect();
        // Warm-up: one batch, untimed (first-touch of heaps and scratch, thread wake-up).
        coll.search(&refs[..b.min(run)]);
        let mut lat = Vec::with_capacity(run.div_ceil(b));
        let mut got = Vec::with_capacity(run);
        let start = Instant::now();
        for batch in refs.chunks(b) {
            let t = Instant::now();
            let hits = coll.search(batch);
            lat.push(t.elapsed());
            got.extend(hits.into_iter().map(|h| h.into_iter().map(|h| h.entry.id.clone()).collect::<Vec<_>>()));
        }
        let secs = start.elapsed().as_secs_f64();
        lat.sort();
        println!(
            "{b:>6} {run:>8} {:>8.1} {:>9} {:>9}",
            run as f64 / secs,
            fmt_ms(percentile(&lat, 50.0)),
            fmt_ms(percentile(&lat, 99.0))
        );
        // Machine-readable line for the comparison script.
        println!("RESULT batch={b} queries={run} qps={:.3} p50_ms={} p99_ms={}", run as f64 / secs, fmt_ms(percentile(&lat, 50.0)), fmt_ms(percentile(&lat, 99.0)));
        if b == largest && ids.is_empty() {
            ids = got.clone();
        }
        by_batch.push((b, got));
    }
    // The scan is exact whatever the batch: every batch size must give the same ids.
    for (b, got) in &by_batch {
        let differ = got.iter().zip(&ids).filter(|(a, z)| a != z).count();
        if differ > 0 {
            println!("note: batch {b} differs from batch {largest} on {differ} of {} queries", got.len());
        }
    }
    if let Some(path) = &args.ids_out {
        let mut w = BufWriter::new(std::fs::File::create(path)?);
        for row in &ids {
            writeln!(w, "{}", row.join(" "))?;
        }
        w.flush()?;
        println!("ids: {} queries -> {}", ids.len(), path.display());
    }
    Ok(())
}
