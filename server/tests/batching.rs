//! 64 concurrent callers, each with its own input, each gets exactly its own vector; and the
//! batch-size metric shows that their inputs really were batched together.
//! (A test binary of its own: the metrics recorder is process-wide.)
mod common;

use candle_core::{DType, Device};
use common::{client, http_get, request, sample, serve};
use concierge_models::{ModelSource, TextEncoder};

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_callers_get_their_own_vectors_in_shared_batches() {
    let running = serve(&["--max-wait-ms=20", "--max-batch-size=32"]).await;
    let base = client(&running).await;
    let texts: Vec<String> = (0..64).map(|i| format!("caller {i}: where is order number {} ?", 1000 + i * 37)).collect();

    let (_, before) = http_get(running.metrics_addr, "/metrics").await;
    let mut calls = Vec::new();
    for t in texts.clone() {
        let mut c = base.clone();
        calls.push(tokio::spawn(async move { c.embed_text(request(&[&t])).await.map(|r| r.into_inner()) }));
    }
    let mut got = Vec::new();
    for call in calls {
        got.push(call.await.unwrap().expect("call succeeds").embeddings.remove(0).values);
    }

    let enc = TextEncoder::load(&ModelSource::Dir(common::model_dir()), &Device::Cpu, DType::F32, None).unwrap();
    for (i, t) in texts.iter().enumerate() {
        let want = enc.embed(&[&enc.tokenize(0, t, false).unwrap()], &[true]).unwrap().remove(0);
        let err = want.iter().zip(&got[i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err < 1e-5, "caller {i} got a vector {err} away from its own");
        // and not a neighbour's: its own is much closer than the next caller's
        if i + 1 < texts.len() {
            let other = enc.embed(&[&enc.tokenize(0, &texts[i + 1], false).unwrap()], &[true]).unwrap().remove(0);
            let err_other = other.iter().zip(&got[i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err_other > 100.0 * err.max(1e-7));
        }
    }

    let (_, after) = http_get(running.metrics_addr, "/metrics").await;
    let count = |m: &str| sample(m, r#"concierge_batch_size_count{lane="text"}"#);
    let singles = |m: &str| sample(m, r#"concierge_batch_size_bucket{lane="text",le="1"}"#);
    let sum = |m: &str| sample(m, r#"concierge_batch_size_sum{lane="text"}"#);
    let batches = count(&after) - count(&before);
    let inputs = sum(&after) - sum(&before);
    let multi = batches - (singles(&after) - singles(&before));
    assert_eq!(inputs, 64.0, "every input went through a batch once");
    assert!(multi >= 1.0 && batches < 64.0, "no batch held more than one caller's input: {batches} batches");
    println!("64 callers were served in {batches} batches (mean size {:.1})", inputs / batches);
    running.shutdown().await.unwrap();
}
