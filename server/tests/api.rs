//! The Embeddings API over real sockets: answers, bad input, deadlines, health, reflection,
//! metrics and shutdown.
mod common;

use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use common::{client, http_get, request, serve, until_queued};
use concierge_models::{ModelSource, TextEncoder};
use concierge_proto::v1::embeddings_client::EmbeddingsClient;
use concierge_proto::v1::EmbedTextRequest;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embeds_in_order_with_model_info_and_token_count() {
    let running = serve(&[]).await;
    let mut c = client(&running).await;
    let texts = ["Does this cream suit sensitive skin?", "我的订单什么时候发货？", "hi 👋"];
    let resp = c.embed_text(request(&texts)).await.unwrap().into_inner();
    assert_eq!(resp.embeddings.len(), 3);
    assert_eq!(resp.dimension, 384);
    let model = resp.model.unwrap();
    assert_eq!(model.id, "all-MiniLM-L6-v2");
    assert!(model.version.starts_with("sha256:"), "{}", model.version);

    let enc = TextEncoder::load(&ModelSource::Dir(common::model_dir()), &Device::Cpu, DType::F32, None).unwrap();
    let mut tokens = 0;
    for (i, t) in texts.iter().enumerate() {
        let tok = enc.tokenize(i, t, false).unwrap();
        tokens += tok.len();
        let want = enc.embed(&[&tok], &[true]).unwrap().remove(0);
        let got = &resp.embeddings[i].values;
        let err = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err < 1e-5, "input {i}: max abs error {err}");
    }
    assert_eq!(resp.token_count as usize, tokens);

    // normalize=false gives the raw pooled vector (norm well above 1 for this model)
    let raw = c
        .embed_text(EmbedTextRequest { normalize: Some(false), ..request(&texts[..1]) })
        .await
        .unwrap()
        .into_inner();
    let norm: f32 = raw.embeddings[0].values.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!(norm > 2.0, "unnormalised norm {norm}");
    running.shutdown().await.unwrap();
}

/// `words` single-token words: `words + 2` tokens with [CLS] and [SEP].
fn long_text(words: usize) -> String {
    (0..words).map(|i| ["item", "parcel", "order", "card"][i % 4]).collect::<Vec<_>>().join(" ")
}

async fn assert_still_serving(c: &mut concierge_proto::v1::embeddings_client::EmbeddingsClient<tonic::transport::Channel>) {
    let ok = c.embed_text(request(&["still there?"])).await.expect("server keeps serving");
    assert_eq!(ok.into_inner().embeddings.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_a_specific_status_and_a_fix() {
    let running = serve(&["--max-client-batch-size=8", "--max-message-bytes=4096"]).await;
    let mut c = client(&running).await;

    let e = c.embed_text(request(&[])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("at least one"), "{}", e.message());
    assert_still_serving(&mut c).await;

    let e = c.embed_text(request(&["fine", "  "])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("input 1 is empty"), "{}", e.message());

    let long = long_text(300);
    let e = c.embed_text(request(&["short", &long])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("input 1 has 302 tokens; the limit is 256") && e.message().contains("truncate=true"),
        "{}",
        e.message()
    );
    let ok = c
        .embed_text(EmbedTextRequest { truncate: Some(true), ..request(&["short", &long]) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.token_count, 3 + 256);

    let nine: Vec<&str> = vec!["x"; 9];
    let e = c.embed_text(request(&nine)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("9 inputs") && e.message().contains("limit is 8"), "{}", e.message());

    let big = "a".repeat(5000);
    let e = c.embed_text(request(&[&big])).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("4096") && e.message().contains("--max-message-bytes"), "{}", e.message());
    assert_still_serving(&mut c).await;
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_deadline_is_answered_deadline_exceeded_and_not_computed() {
    // One input per batch and no waiting, so a long request keeps the device busy.
    let running = serve(&["--max-wait-ms=0", "--max-batch-size=1"]).await;
    let mut c = client(&running).await;
    let long = long_text(254);
    let busy_inputs: Vec<&str> = vec![&long; 32];
    let mut busy_client = c.clone();
    let busy_req = request(&busy_inputs);
    let busy = tokio::spawn(async move { busy_client.embed_text(busy_req).await });
    until_queued(&running, 24).await;

    // The server's own answer, not a client-side timer's (see common::unenforced).
    let mut late = EmbeddingsClient::with_origin(common::unenforced(), common::origin(&running));
    let mut req = tonic::Request::new(request(&["where is my order?"]));
    req.set_timeout(Duration::from_millis(40));
    let t0 = Instant::now();
    let e = late.embed_text(req).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(busy.await.unwrap().is_ok(), "the long request was still answered");
    let (_, metrics) = http_get(running.metrics_addr, "/metrics").await;
    assert!(
        metrics.contains(r#"concierge_requests_total{rpc="EmbedText",code="DeadlineExceeded"}"#),
        "{metrics}"
    );
    assert_still_serving(&mut c).await;
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_answers_resource_exhausted_at_once() {
    let running = serve(&["--max-wait-ms=0", "--max-batch-size=1", "--max-queued-inputs=8", "--max-client-batch-size=8"]).await;
    let mut c = client(&running).await;
    let long = long_text(254);
    let mut first_client = c.clone();
    let first_req = request(&vec![long.as_str(); 8]);
    let first = tokio::spawn(async move { first_client.embed_text(first_req).await });
    until_queued(&running, 7).await;
    let e = c.embed_text(request(&["one more"])).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("queue is full") && e.message().contains("retry"), "{}", e.message());
    assert!(!first.is_finished(), "refused at once, while the queue was still full, not after waiting");
    assert!(first.await.unwrap().is_ok());
    assert_still_serving(&mut c).await;
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_reflection_and_metrics_answer() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let running = serve(&[]).await;
    let url = format!("http://{}", running.grpc_addr);
    let channel = tonic::transport::Channel::from_shared(url).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "concierge.v1.Embeddings", "concierge.v1.Intents"] {
        let s = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(s.status, 1, "{service:?} is SERVING");
    }

    let mut refl = ServerReflectionClient::new(channel);
    let ask = |m: MessageRequest| ServerReflectionRequest { host: String::new(), message_request: Some(m) };
    let reqs = vec![ask(MessageRequest::ListServices(String::new())), ask(MessageRequest::FileContainingSymbol("concierge.v1.Embeddings".into()))];
    let mut stream = refl.server_reflection_info(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    let list = stream.message().await.unwrap().unwrap().message_response.unwrap();
    let MessageResponse::ListServicesResponse(list) = list else { panic!("{list:?}") };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in ["concierge.v1.Embeddings", "concierge.v1.Intents", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
        assert!(names.contains(&want), "{names:?}");
    }
    let file = stream.message().await.unwrap().unwrap().message_response.unwrap();
    let MessageResponse::FileDescriptorResponse(file) = file else { panic!("{file:?}") };
    assert!(!file.file_descriptor_proto.is_empty());
    let joined: Vec<u8> = file.file_descriptor_proto.concat();
    assert!(joined.windows(9).any(|w| w == b"EmbedText"), "the descriptor names EmbedText");

    let mut c = client(&running).await;
    c.embed_text(request(&["count me"])).await.unwrap();
    let (status, body) = http_get(running.metrics_addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    for series in [
        r#"concierge_requests_total{rpc="EmbedText",code="OK"}"#,
        "concierge_request_duration_seconds_bucket",
        "concierge_tokenization_seconds_bucket",
        "concierge_queue_wait_seconds_bucket",
        "concierge_batch_size_bucket",
        "concierge_batch_tokens_bucket",
        "concierge_inference_seconds_bucket",
        "concierge_queue_depth",
    ] {
        assert!(body.contains(series), "missing {series} in\n{body}");
    }
    let (status, _) = http_get(running.metrics_addr, "/nope").await;
    assert!(status.contains("404"), "{status}");
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_drains_in_flight_calls_then_refuses() {
    let running = serve(&["--max-wait-ms=0", "--max-batch-size=1"]).await;
    let mut c = client(&running).await;
    let long = long_text(254);
    let req = request(&vec![long.as_str(); 16]);
    let mut c2 = c.clone();
    let in_flight = tokio::spawn(async move { c2.embed_text(req).await });
    until_queued(&running, 12).await;
    let addr = running.grpc_addr;
    running.shutdown().await.unwrap();
    let done = in_flight.await.unwrap().expect("the in-flight call completed");
    assert_eq!(done.into_inner().embeddings.len(), 16);
    assert!(c.embed_text(request(&["after"])).await.is_err());
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "no longer listening");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_mismatched_checkpoint_stops_start_up_naming_the_file() {
    let tmp = std::env::temp_dir().join(format!("concierge-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(common::model_dir().join(f), tmp.join(f)).unwrap();
    }
    let arg = format!("--model-dir={}", tmp.display());
    let mut running = concierge_server::start(common::config(&[&arg])).await.unwrap();
    let err = format!("{:#}", running.wait().await.unwrap_err());
    assert!(err.contains("tokenizer.json") && err.contains("missing"), "{err}");

    std::fs::copy(common::model_dir().join("tokenizer.json"), tmp.join("tokenizer.json")).unwrap();
    let cfg = std::fs::read_to_string(tmp.join("config.json")).unwrap().replace("\"hidden_size\": 384", "\"hidden_size\": 768");
    std::fs::write(tmp.join("config.json"), cfg).unwrap();
    let mut running = concierge_server::start(common::config(&[&arg])).await.unwrap();
    let err = format!("{:#}", running.wait().await.unwrap_err());
    assert!(err.contains("model.safetensors") && err.contains("config.json"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}
