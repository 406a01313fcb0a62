//! Knowledge-base upserts with durability on: every acknowledged write is in the fsynced
//! write-ahead log. (a) C writer threads each doing single-document upserts (ack latency, and
//! the mean commit group: ops per fsync, read from the store's `concierge_kb_commit_group_size`
//! histogram through a small in-process recorder); (b) bulk upserts of --bulk-size documents a
//! call. The store lives in a temp dir under --dir (default: the system temp dir).
//!   cargo bench -p concierge-benches --bench kb_upsert -- --writers 1,8,64 --seconds 5
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use concierge_benches::{fmt_ms, percentile};
use concierge_kb::store::{Store, StoreOptions};
use concierge_kb::{CollectionSpec, Document, Metric, Op};

#[derive(Parser)]
struct Args {
    /// Concurrent single-document writers; one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    writers: Vec<usize>,
    /// How long each single-document run lasts.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Documents per bulk upsert.
    #[arg(long, default_value_t = 1000)]
    bulk_size: usize,
    /// Bulk upserts per bulk run.
    #[arg(long, default_value_t = 100)]
    bulk_calls: usize,
    /// Concurrent bulk writers; one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    bulk_writers: Vec<usize>,
    #[arg(long, default_value_t = 384)]
    dim: usize,
    /// Log MiB after which the store snapshots. Default: never here, so runs time the log only.
    #[arg(long, default_value_t = 1 << 20)]
    snapshot_mb: u64,
    /// Parent folder of the store's temp dir (its filesystem is what is measured).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long, hide = true)]
    bench: bool,
}

/// Counts and sums the commit-group histogram; every other metric is dropped.
#[derive(Default)]
struct Groups {
    commits: AtomicU64,
    ops: AtomicU64,
}

impl metrics::HistogramFn for Groups {
    fn record(&self, value: f64) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.ops.fetch_add(value as u64, Ordering::Relaxed);
    }
}

struct Recorder(Arc<Groups>);

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
        if key.name() == "concierge_kb_commit_group_size" {
            metrics::Histogram::from_arc(self.0.clone())
        } else {
            metrics::Histogram::noop()
        }
    }
}

/// A deterministic document: unit-length pseudo-random vector, a short text and one label.
fn doc(id: String, seed: u64, dim: usize) -> Document {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v: Vec<f32> = (0..dim)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    let text = format!("How do I change the delivery address of order {seed}? It has not shipped yet.");
    Document { id, title: String::new(), text, metadata: BTreeMap::from([("label".into(), format!("l{}", seed % 77))]), vector: v }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| if e.path().is_dir() { dir_bytes(&e.path()) } else { e.metadata().map(|m| m.len()).unwrap_or(0) }).sum())
        .unwrap_or(0)
}

/// `writers` threads each upserting `per_call` documents a call until `stop` says so (time)
/// or `calls` calls have been made in all. Returns (calls, seconds, sorted ack latencies).
fn run(store: &Store, tag: &str, writers: usize, per_call: usize, dim: usize, calls: usize, stop_after: Option<Duration>) -> (usize, f64, Vec<Duration>) {
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let lat = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..writers {
            s.spawn(|| {
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= calls || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let documents = (0..per_call).map(|k| doc(format!("{tag}-{i}-{k}"), (i * per_call + k) as u64, dim)).collect();
                    let op = Op::Upsert { collection: "bench".into(), documents };
                    let t = Instant::now();
                    store.write(op).expect("upsert failed");
                    mine.push(t.elapsed());
                    if stop_after.is_some_and(|d| start.elapsed() >= d) {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                lat.lock().unwrap().extend(mine);
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let mut lat = lat.into_inner().unwrap();
    lat.sort();
    (lat.len(), secs, lat)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let groups = Arc::new(Groups::default());
    metrics::set_global_recorder(Recorder(groups.clone())).map_err(|e| anyhow::anyhow!("{e}"))?;
    let tmp = match &args.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    println!("kb upsert: store in {} (d={}, fsync on every commit)", tmp.path().display(), args.dim);
    let (store, _) = Store::open(tmp.path(), StoreOptions { snapshot_after_bytes: args.snapshot_mb << 20, ..Default::default() })?;
    store.write(Op::CreateCollection(CollectionSpec {
        name: "bench".into(),
        dimension: args.dim as u32,
        metric: Metric::Cosine,
        min_score: None,
        embedder: "synthetic".into(),
    }))?;

    let snap = |g: &Groups| (g.commits.load(Ordering::Relaxed), g.ops.load(Ordering::Relaxed));
    println!("(a) single-document upserts");
    println!("writers      docs      docs/s    p50 ms    p99 ms   commits  mean group");
    for &w in &args.writers {
        // Short warm-up so the first run does not pay for file creation alone.
        run(&store, &format!("warm{w}"), w, 1, args.dim, w * 4, None);
        let (c0, o0) = snap(&groups);
        let (n, secs, lat) = run(&store, &format!("s{w}"), w, 1, args.dim, usize::MAX, Some(Duration::from_secs_f64(args.seconds)));
        let (c1, o1) = snap(&groups);
        let commits = c1 - c0;
        println!(
            "{w:>7} {n:>9} {:>11.1} {:>9} {:>9} {commits:>9} {:>11.2}",
            n as f64 / secs,
            fmt_ms(percentile(&lat, 50.0)),
            fmt_ms(percentile(&lat, 99.0)),
            (o1 - o0) as f64 / commits.max(1) as f64
        );
    }

    println!("(b) bulk upserts of {} documents", args.bulk_size);
    println!("writers     calls      docs/s   p50 ms/call   p99 ms/call   commits  mean group   log MB/s");
    for &w in &args.bulk_writers {
        let (c0, o0) = snap(&groups);
        let b0 = dir_bytes(tmp.path());
        let (n, secs, lat) = run(&store, &format!("b{w}"), w, args.bulk_size, args.dim, args.bulk_calls, None);
        let (c1, o1) = snap(&groups);
        let commits = c1 - c0;
        println!(
            "{w:>7} {n:>9} {:>11.1} {:>13} {:>13} {commits:>9} {:>11.2} {:>10.1}",
            (n * args.bulk_size) as f64 / secs,
            fmt_ms(percentile(&lat, 50.0)),
            fmt_ms(percentile(&lat, 99.0)),
            (o1 - o0) as f64 / commits.max(1) as f64,
            dir_bytes(tmp.path()).saturating_sub(b0) as f64 / secs / 1e6
        );
    }
    println!("log: {:.1} MB in {}", dir_bytes(tmp.path()) as f64 / 1e6, tmp.path().display());
    store.shutdown();
    Ok(())
}
