//! A caller that goes away costs no compute: its queued inputs are dropped, counted, and never
//! reach the model. (A test binary of its own: the metrics recorder is process-wide.)
mod common;

use std::time::{Duration, Instant};

use common::{client, http_get, request, sample, serve, until_queued};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_call_is_dropped_before_compute() {
    let running = serve(&["--max-batch-size=1"]).await;
    let c = client(&running).await;
    let long = vec!["item parcel order card"; 63].join(" ");
    let busy_req = request(&vec![long.as_str(); 32]);
    let mut busy_client = c.clone();
    let busy = tokio::spawn(async move { busy_client.embed_text(busy_req).await });
    until_queued(&running, 24).await;
    let mut doomed_client = c.clone();
    let mut lowest = running.state.text.engine.queued();
    let doomed = tokio::spawn(async move { doomed_client.embed_text(request(&["a", "b", "c", "d"])).await });
    // The busy call only ever lowers the queue; a rise means the doomed call was admitted.
    loop {
        let q = running.state.text.engine.queued();
        if q > lowest {
            break;
        }
        assert!(!busy.is_finished(), "the busy call finished before the doomed one was queued");
        lowest = lowest.min(q);
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    doomed.abort(); // the client resets the stream; the server drops the call
    assert!(busy.await.unwrap().is_ok());

    let cancelled = r#"concierge_dropped_total{lane="text",reason="cancelled"}"#;
    let t0 = Instant::now();
    let metrics = loop {
        let (_, m) = http_get(running.metrics_addr, "/metrics").await;
        if sample(&m, cancelled) >= 4.0 || t0.elapsed() > Duration::from_secs(10) {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(sample(&metrics, cancelled), 4.0, "{metrics}");
    let computed = sample(&metrics, r#"concierge_batch_size_sum{lane="text"}"#);
    assert_eq!(computed, 32.0, "only the busy call's inputs reached the model");
    assert_eq!(running.state.text.engine.queued(), 0);
    running.shutdown().await.unwrap();
}
