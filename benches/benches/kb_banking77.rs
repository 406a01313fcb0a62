//! Knowledge-base quality through gRPC: an in-process server with the default model and a temp
//! --kb-dir; Banking77's train set minus every 10th row is upserted as documents (text, with the
//! intent as metadata "label"), and every 10th row is a query. Prints top-1 label accuracy, a
//! top-10 vote (majority, ties to the higher score sum; and score-weighted), and upsert / search
//! throughput, one search run per --concurrency value.
//!   cargo bench -p concierge-benches --bench kb_banking77 -- --data /abs/banking77/train.csv
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use concierge_benches::{default_model_dir, fmt_ms, percentile, read_csv_labelled};
use concierge_proto::v1 as pb;
use concierge_proto::v1::knowledge_base_client::KnowledgeBaseClient;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// Banking77 train CSV (text,category).
    #[arg(long, default_value = "/work/shared/data/banking77/train.csv")]
    data: PathBuf,
    /// Every Nth row is held out as a query.
    #[arg(long, default_value_t = 10)]
    every: usize,
    /// Documents per Upsert call.
    #[arg(long, default_value_t = 1000)]
    upsert_batch: usize,
    /// Concurrent searchers; one run over all held-out queries per value.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    concurrency: Vec<usize>,
    #[arg(long, hide = true)]
    bench: bool,
}

const COLLECTION: &str = "banking77";

/// Labels and scores of the top hits of one query, best first.
type Hits = Vec<(String, f32)>;

fn vote(hits: &Hits, weighted: bool) -> Option<&str> {
    let mut tally: HashMap<&str, (f32, f32)> = HashMap::new();
    for (label, score) in hits {
        let t = tally.entry(label).or_default();
        t.0 += 1.0;
        t.1 += score;
    }
    let key = |(n, s): (f32, f32)| if weighted { (s, n) } else { (n, s) };
    tally.into_iter().max_by(|a, b| key(a.1).partial_cmp(&key(b.1)).unwrap_or(std::cmp::Ordering::Equal)).map(|(l, _)| l)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.data.exists() {
        println!("kb banking77: {} is missing; nothing to measure (pass --data PATH to train.csv)", args.data.display());
        return Ok(());
    }
    let rows = read_csv_labelled(&args.data, usize::MAX)?;
    let every = args.every.max(2);
    let (mut docs, mut queries) = (Vec::new(), Vec::new());
    for (i, row) in rows.into_iter().enumerate() {
        if i % every == every - 1 {
            queries.push(row);
        } else {
            docs.push((i, row));
        }
    }
    println!("kb banking77: {} documents, {} held-out queries (every {every}th row)", docs.len(), queries.len());

    let kb_dir = tempfile::tempdir()?;
    let model_dir = default_model_dir();
    let cfg = <concierge_server::Config as clap::Parser>::try_parse_from([
        "concierge",
        "--listen=127.0.0.1:0",
        "--metrics-listen=127.0.0.1:0",
        &format!("--model-dir={}", model_dir.display()),
        &format!("--kb-dir={}", kb_dir.path().display()),
        "--max-queued-inputs=100000",
        "--no-image-model",
        "--no-entity-model",
        "--no-intent-model",
    ])?;
    let mut server = concierge_server::start(cfg).await?;
    server.ready(Duration::from_secs(120)).await?;
    let mut client = KnowledgeBaseClient::connect(format!("http://{}", server.grpc_addr)).await?;
    client
        .create_collection(pb::CreateCollectionRequest { name: COLLECTION.into(), dimension: 0, metric: pb::Metric::Cosine as i32, min_score: None })
        .await?;

    let t0 = Instant::now();
    let mut lat = Vec::new();
    for chunk in docs.chunks(args.upsert_batch.max(1)) {
        let documents = chunk
            .iter()
            .map(|(i, (text, label))| pb::Document {
                id: format!("row{i}"),
                text: text.clone(),
                title: String::new(),
                metadata: [("label".to_string(), label.clone())].into(),
                vector: Vec::new(),
            })
            .collect();
        let t = Instant::now();
        client.upsert(pb::UpsertRequest { collection: COLLECTION.into(), documents, truncate: Some(true), ..Default::default() }).await?;
        lat.push(t.elapsed());
    }
    let secs = t0.elapsed().as_secs_f64();
    lat.sort();
    println!(
        "upsert: {} documents in {} calls, {secs:.2} s: {:.1} docs/s (embedding included); p50 {} ms a call",
        docs.len(),
        lat.len(),
        docs.len() as f64 / secs,
        fmt_ms(percentile(&lat, 50.0))
    );

    let queries = Arc::new(queries);
    let mut first: Option<Vec<Hits>> = None;
    for &c in &args.concurrency {
        let (secs, lat, hits) = search_all(&client, &queries, c.max(1)).await?;
        println!(
            "search (top 10, query text embedded), {c} callers: {} queries in {secs:.2} s: {:.1} queries/s; p50 {} p99 {} ms",
            queries.len(),
            queries.len() as f64 / secs,
            fmt_ms(percentile(&lat, 50.0)),
            fmt_ms(percentile(&lat, 99.0))
        );
        match &first {
            None => first = Some(hits),
            Some(f) => {
                let differ = f.iter().zip(&hits).filter(|(a, b)| a.iter().map(|h| &h.0).ne(b.iter().map(|h| &h.0))).count();
                if differ > 0 {
                    println!("note: {differ} queries got other labels than in the first run");
                }
            }
        }
    }
    let hits = first.unwrap_or_default();
    let n = queries.len();
    let correct = |pick: &dyn Fn(&Hits) -> Option<&str>| queries.iter().zip(&hits).filter(|((_, label), h)| pick(h) == Some(label.as_str())).count();
    let top1 = correct(&|h| h.first().map(|x| x.0.as_str()));
    let majority = correct(&|h| vote(h, false));
    let weighted = correct(&|h| vote(h, true));
    let pct = |k: usize| 100.0 * k as f64 / n.max(1) as f64;
    println!("accuracy over {n} held-out queries ({} documents, 77 intents):", docs.len());
    println!("  top-1 label:                  {top1:>5} ({:.2}%)", pct(top1));
    println!("  top-10 majority vote:         {majority:>5} ({:.2}%)", pct(majority));
    println!("  top-10 score-weighted vote:   {weighted:>5} ({:.2}%)", pct(weighted));
    server.shutdown().await?;
    Ok(())
}

/// Every query through `Search` (top 10) by `c` concurrent callers. Returns (seconds, sorted
/// latencies, hits per query in query order).
async fn search_all(client: &KnowledgeBaseClient<Channel>, queries: &Arc<Vec<(String, String)>>, c: usize) -> anyhow::Result<(f64, Vec<Duration>, Vec<Hits>)> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..c {
        let (mut client, next, queries) = (client.clone(), next.clone(), queries.clone());
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= queries.len() {
                    break;
                }
                let t = Instant::now();
                let resp = client
                    .search(pb::SearchRequest {
                        collection: COLLECTION.into(),
                        query: queries[i].0.clone(),
                        top_k: Some(10),
                        truncate: Some(true),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                let hits: Hits = resp.hits.into_iter().map(|h| (h.metadata.get("label").cloned().unwrap_or_default(), h.score)).collect();
                mine.push((i, t.elapsed(), hits));
            }
            anyhow::Ok(mine)
        }));
    }
    let mut all = Vec::with_capacity(queries.len());
    for w in workers {
        all.extend(w.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_by_key(|x| x.0);
    let mut lat: Vec<Duration> = all.iter().map(|x| x.1).collect();
    lat.sort();
    Ok((secs, lat, all.into_iter().map(|x| x.2).collect()))
}
