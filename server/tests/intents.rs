//! `Intents/Classify` end to end: the committed model labels held-aside real queries correctly
//! and hands nonsense off; top_k and the per-request threshold do what the contract says; bad
//! input gets clear statuses; start-up refuses a head that cannot read the loaded encoder's
//! states; a fusing head reads the queries' images through the image lane; and one encoder pass
//! serves embeddings and intents (with a head's own top layers tapped from the same pass).
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use concierge_proto::v1::intents_client::IntentsClient;
use concierge_proto::v1::{ClassifyRequest, ClassifyResponse, Query};
use image::ImageFormat;
use tonic::transport::Channel;
use tonic::Code;

/// Written for this test (not taken from the data sets): (query, the label it must get).
const CLINC150: &[(&str, &str)] = &[
    ("what is the exchange rate between dollars and euros", "exchange_rate"),
    ("please book a table for two at an italian restaurant", "restaurant_reservation"),
    ("how many calories are in a banana", "calories"),
    ("set an alarm for 6 am", "alarm"),
];
const BANKING77: &[(&str, &str)] = &[
    ("my card still hasn't arrived", "card_arrival"),
    ("I think my card was stolen", "lost_or_stolen_card"),
    ("what exchange rate do you use", "exchange_rate"),
];
const NONSENSE: &str = "asdf qwerty zxcv plorp";

fn checkpoint() -> PathBuf {
    common::repo_path("checkpoints/intents-en-clinc150")
}

fn intent_config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("intent_config.json")).unwrap()).unwrap()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

/// The table for the committed checkpoint's label set.
fn expected() -> &'static [(&'static str, &'static str)] {
    match strings(&intent_config(&checkpoint())["labels"]).iter().any(|l| l == "restaurant_reservation") {
        true => CLINC150,
        false => BANKING77,
    }
}

fn query(text: &str, images: Vec<Vec<u8>>) -> Query {
    Query { text: text.to_string(), images }
}

fn request(queries: Vec<Query>) -> ClassifyRequest {
    ClassifyRequest { queries, top_k: 0, handoff_threshold: None, truncate: None }
}

fn texts(texts: &[&str]) -> ClassifyRequest {
    request(texts.iter().map(|t| query(t, Vec::new())).collect())
}

async fn connect(running: &concierge_server::Running) -> IntentsClient<Channel> {
    IntentsClient::connect(format!("http://{}", running.grpc_addr)).await.unwrap()
}

async fn classify(client: &mut IntentsClient<Channel>, req: ClassifyRequest) -> ClassifyResponse {
    client.classify(req).await.unwrap().into_inner()
}

/// Every label's probability for each query, by label.
async fn probabilities(client: &mut IntentsClient<Channel>, queries: Vec<Query>, labels: usize) -> Vec<HashMap<String, f32>> {
    let resp = classify(client, ClassifyRequest { top_k: labels as u32, ..request(queries) }).await;
    resp.results.iter().map(|r| r.intents.iter().map(|s| (s.label.clone(), s.score)).collect()).collect()
}

fn max_diff(a: &HashMap<String, f32>, b: &HashMap<String, f32>) -> f32 {
    a.iter().map(|(l, p)| (p - b[l]).abs()).fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committed_model_labels_real_queries_and_follows_the_contract() {
    let running = common::serve(&["--max-client-batch-size=8", "--max-client-images=2"]).await;
    let mut client = connect(&running).await;
    let cfg = intent_config(&checkpoint());
    let labels = strings(&cfg["labels"]);
    let out_of_scope = strings(&cfg["out_of_scope_labels"]);
    let calibrated = cfg["handoff_threshold"].as_f64().unwrap() as f32;
    let table = expected();

    // Held-aside queries get their label, confidently; nonsense is handed off.
    let mut queries: Vec<&str> = table.iter().map(|(t, _)| *t).collect();
    queries.push(NONSENSE);
    let resp = classify(&mut client, texts(&queries)).await;
    assert_eq!(resp.results.len(), queries.len());
    for ((text, label), r) in table.iter().zip(&resp.results) {
        assert_eq!(r.intents.len(), 5.min(labels.len()), "{text:?}: top_k 0 means 5");
        assert_eq!(&r.intents[0].label, label, "{text:?}: {:?}", r.intents);
        assert!(!r.handoff, "{text:?} was handed off: {:?}", r.intents[0]);
    }
    assert!(resp.results.last().unwrap().handoff, "{NONSENSE:?} was not handed off: {:?}", resp.results.last().unwrap().intents);
    let model = resp.model.unwrap();
    assert_eq!(model.id, "intents-en-clinc150");
    assert!(model.version.starts_with("sha256:"), "{}", model.version);
    assert_eq!(resp.handoff_threshold, calibrated);

    // top_k is respected and scores come best first; over every label they sum to 1.
    let resp = classify(&mut client, ClassifyRequest { top_k: 3, ..texts(&queries) }).await;
    for r in &resp.results {
        assert_eq!(r.intents.len(), 3);
        assert!(r.intents.windows(2).all(|w| w[0].score >= w[1].score), "{:?}", r.intents);
    }
    let all = classify(&mut client, ClassifyRequest { top_k: labels.len() as u32, ..texts(&queries) }).await;
    for r in &all.results {
        assert_eq!(r.intents.len(), labels.len());
        let sum: f32 = r.intents.iter().map(|s| s.score).sum();
        assert!((sum - 1.0).abs() < 1e-3, "scores sum to {sum}");
        assert!(r.intents.windows(2).all(|w| w[0].score >= w[1].score));
    }

    // Threshold 1 hands everything off; 0 only what the model calls out-of-scope.
    let resp = classify(&mut client, ClassifyRequest { handoff_threshold: Some(1.0), ..texts(&queries) }).await;
    assert!(resp.results.iter().all(|r| r.handoff));
    assert_eq!(resp.handoff_threshold, 1.0);
    let resp = classify(&mut client, ClassifyRequest { handoff_threshold: Some(0.0), ..texts(&queries) }).await;
    for (text, r) in queries.iter().zip(&resp.results) {
        assert_eq!(r.handoff, out_of_scope.contains(&r.intents[0].label), "{text:?}: {:?}", r.intents[0]);
    }

    // Bad input: INVALID_ARGUMENT saying what to fix.
    let png = common::encoded_image(32, 32, 1, ImageFormat::Png);
    let long = "please ".repeat(400);
    let n = labels.len();
    let cases: Vec<(&str, ClassifyRequest, Vec<String>)> = vec![
        ("no queries", request(vec![]), vec!["queries is empty".into()]),
        ("empty query", texts(&["set an alarm", ""]), vec!["query 1 has neither text nor images".into()]),
        ("blank query", texts(&["  \n"]), vec!["query 0 has neither text nor images".into()]),
        ("too many queries", texts(&["hi"; 9]), vec!["9 queries".into(), "limit is 8".into()]),
        (
            "too many images",
            request(vec![query("a", vec![png.clone(); 2]), query("b", vec![png.clone()])]),
            vec!["3 images".into(), "limit is 2".into()],
        ),
        ("top_k over the labels", ClassifyRequest { top_k: n as u32 + 1, ..texts(&["hi"]) }, vec![format!("{n} labels")]),
        ("threshold over 1", ClassifyRequest { handoff_threshold: Some(1.5), ..texts(&["hi"]) }, vec!["[0, 1]".into()]),
        ("threshold under 0", ClassifyRequest { handoff_threshold: Some(-0.1), ..texts(&["hi"]) }, vec!["[0, 1]".into()]),
        ("threshold NaN", ClassifyRequest { handoff_threshold: Some(f32::NAN), ..texts(&["hi"]) }, vec!["[0, 1]".into()]),
        (
            "an image for a text-only model",
            request(vec![query("hi", vec![]), query("look at this", vec![png.clone()])]),
            vec!["query 1 has 1 image".into(), "text only".into()],
        ),
        ("over-long text", texts(&["ok", long.as_str()]), vec!["input 1 has".into(), "truncate".into()]),
    ];
    for (what, req, needles) in cases {
        let err = client.classify(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        for needle in needles {
            assert!(err.message().contains(&needle), "{what}: {:?} lacks {needle:?}", err.message());
        }
    }
    let resp = classify(&mut client, ClassifyRequest { truncate: Some(true), ..texts(&[long.as_str()]) }).await;
    assert_eq!(resp.results.len(), 1);
    let mut late = tonic::Request::new(texts(&["set an alarm"]));
    late.set_timeout(Duration::from_millis(1));
    // The server's own answer, not a client-side timer's (see common::unenforced).
    let mut unenforced = IntentsClient::with_origin(common::unenforced(), common::origin(&running));
    assert_eq!(unenforced.classify(late).await.unwrap_err().code(), Code::DeadlineExceeded);

    let (_, metrics) = common::http_get(running.metrics_addr, "/metrics").await;
    assert!(common::sample(&metrics, "concierge_requests_total{rpc=\"Classify\",code=\"OK\"}") >= 6.0, "{metrics}");
    assert!(common::sample(&metrics, "concierge_requests_total{rpc=\"Classify\",code=\"InvalidArgument\"}") >= 11.0);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_intent_model_classify_is_unimplemented() {
    let running = common::serve(&["--no-intent-model", "--no-image-model"]).await;
    let mut client = connect(&running).await;
    let err = client.classify(texts(&["set an alarm for 6 am"])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert!(err.message().contains("--no-intent-model"), "{}", err.message());
    let mut embeddings = common::client(&running).await;
    assert_eq!(embeddings.embed_text(common::request(&["still serving"])).await.unwrap().into_inner().embeddings.len(), 1);
    running.shutdown().await.unwrap();
}

/// A copy of `src` (its files linked) with `edit` applied to its intent_config.json.
fn edited_checkpoint(src: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = common::fresh_dir("intent-edited");
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "intent_config.json" {
            std::os::unix::fs::symlink(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    let mut cfg = intent_config(src);
    edit(&mut cfg);
    std::fs::write(dir.join("intent_config.json"), cfg.to_string()).unwrap();
    dir
}

async fn start_up_error(extra: &[&str]) -> String {
    let mut running = concierge_server::start(common::config(extra)).await.unwrap();
    format!("{:#}", running.wait().await.expect_err("start-up must fail"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_refuses_a_head_that_cannot_read_the_loaded_encoder() {
    // Trained on another version of the text model.
    let other = edited_checkpoint(&checkpoint(), |c| c["encoder"]["version"] = "sha256:000000000000".into());
    let err = start_up_error(&["--no-image-model", &format!("--intent-model-dir={}", other.display())]).await;
    for needle in ["sha256:000000000000", "concierge train-intent --encoder-dir", "--no-intent-model"] {
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }
    // A Hugging Face sequence classifier over its own encoder, not the text model loaded.
    let hf = common::repo_path("models/tests/fixtures/tiny-bert-seqcls");
    let err = start_up_error(&["--no-image-model", &format!("--intent-model-dir={}", hf.display())]).await;
    for needle in ["BertForSequenceClassification", "--model-dir", "--no-intent-model"] {
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }

    // Served as the text model too, it answers (its own tiny random labels; no calibration: 0.5).
    let model_dir = format!("--model-dir={}", hf.display());
    let intent_dir = format!("--intent-model-dir={}", hf.display());
    let running = common::serve(&[&model_dir, &intent_dir, "--no-entity-model", "--no-image-model"]).await;
    let mut client = connect(&running).await;
    let resp = classify(&mut client, ClassifyRequest { top_k: 4, ..texts(&["i lost my card", "My card has not arrived yet"]) }).await;
    assert_eq!(resp.model.unwrap().id, "tiny-bert-seqcls");
    assert_eq!(resp.handoff_threshold, 0.5);
    for r in &resp.results {
        let mut got: Vec<&str> = r.intents.iter().map(|s| s.label.as_str()).collect();
        got.sort();
        assert_eq!(got, ["card_arrival", "exchange_rate", "lost_or_stolen_card", "oos"]);
    }
    running.shutdown().await.unwrap();
}

/// Deterministic noise in [-scale, scale).
fn noise(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut h = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            h = h.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((h >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn tensor(seed: u64, shape: &[usize], scale: f32) -> Tensor {
    Tensor::from_vec(noise(seed, shape.iter().product(), scale), shape, &Device::Cpu).unwrap()
}

fn text_version() -> String {
    concierge_models::ModelSource::Dir(common::model_dir()).resolve_text().unwrap().version
}

const LABELS: [&str; 4] = ["track_parcel", "return_item", "damaged_item", "oos"];

/// A random 4-label head over the default text model, mean pooling; with `branch_from`, the
/// encoder's own layers from there up are copied in as the head's branch; with `fusion`
/// (image channels and the image model's version), a random fusion block.
fn synthetic_checkpoint(branch_from: Option<usize>, fusion: Option<(usize, String)>) -> PathBuf {
    let dir = common::fresh_dir("intent-synthetic");
    let h = 384;
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    weights.insert("head.out.weight".into(), tensor(1, &[LABELS.len(), h], 0.3));
    weights.insert("head.out.bias".into(), tensor(2, &[LABELS.len()], 0.1));
    if let Some(from) = branch_from {
        let encoder = candle_core::safetensors::load(common::model_dir().join("model.safetensors"), &Device::Cpu).unwrap();
        for (name, t) in encoder {
            let layer = name.strip_prefix("encoder.layer.").and_then(|r| r.split('.').next()).and_then(|n| n.parse::<usize>().ok());
            if layer.is_some_and(|l| l >= from) {
                weights.insert(name, t);
            }
        }
        std::fs::copy(common::model_dir().join("config.json"), dir.join("encoder_config.json")).unwrap();
    }
    let fusion_config = fusion.as_ref().map(|(c, _)| serde_json::json!({"hidden": h, "image_channels": c, "heads": 4, "ffn": 64}));
    if let Some((c, _)) = &fusion {
        let f = 64;
        for (i, (name, shape, scale)) in [
            ("image_proj.weight", vec![h, *c], 0.2),
            ("image_proj.bias", vec![h], 0.1),
            ("attn.in_proj_weight", vec![3 * h, h], 0.1),
            ("attn.in_proj_bias", vec![3 * h], 0.05),
            ("attn.out_proj.weight", vec![h, h], 0.1),
            ("attn.out_proj.bias", vec![h], 0.05),
            ("ffn.0.weight", vec![f, h], 0.1),
            ("ffn.0.bias", vec![f], 0.05),
            ("ffn.2.weight", vec![h, f], 0.1),
            ("ffn.2.bias", vec![h], 0.05),
        ]
        .into_iter()
        .enumerate()
        {
            weights.insert(format!("fusion.{name}"), tensor(100 + i as u64, &shape, scale));
        }
        for norm in ["norm1", "norm2"] {
            weights.insert(format!("fusion.{norm}.weight"), Tensor::ones(h, DType::F32, &Device::Cpu).unwrap());
            weights.insert(format!("fusion.{norm}.bias"), Tensor::zeros(h, DType::F32, &Device::Cpu).unwrap());
        }
    }
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "labels": LABELS,
        "pooling": "mean",
        "input_dim": h,
        "hidden": [],
        "handoff_threshold": 0.5,
        "out_of_scope_labels": ["oos"],
        "branch_from": branch_from,
        "fusion": fusion_config,
        "encoder": {"id": "all-MiniLM-L6-v2", "version": text_version()},
        "image_encoder": fusion.map(|(_, v)| serde_json::json!({"id": "tiny-moderation", "version": v})),
    });
    std::fs::write(dir.join("intent_config.json"), config.to_string()).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fusing_head_reads_the_queries_images() {
    let image = concierge_models::ImageEncoder::load(
        &concierge_models::ModelSource::Dir(common::tiny_image_model()),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let (channels, version) = (image.info().dimension, image.info().version.clone());
    let dir = synthetic_checkpoint(None, Some((channels, version)));
    let flag = format!("--intent-model-dir={}", dir.display());
    let running = common::serve(&[&flag, "--max-image-bytes=20000"]).await;
    let mut client = connect(&running).await;
    let (a, b) = (common::encoded_image(64, 64, 1, ImageFormat::Png), common::encoded_image(80, 48, 2, ImageFormat::Jpeg));
    let text = "the parcel arrived broken";
    let queries = vec![
        query(text, vec![]),
        query(text, vec![a.clone()]),
        query(text, vec![a.clone(), b.clone()]),
        query("", vec![b.clone()]),
    ];
    let probs = probabilities(&mut client, queries, LABELS.len()).await;
    assert!(max_diff(&probs[0], &probs[1]) > 1e-3, "the image changed nothing: {probs:?}");
    assert!(max_diff(&probs[1], &probs[2]) > 1e-3, "the second image changed nothing: {probs:?}");
    // Each query's answer is its own, whatever else shares its batches.
    let alone = probabilities(&mut client, vec![query(text, vec![a.clone(), b.clone()])], LABELS.len()).await;
    assert!(max_diff(&alone[0], &probs[2]) < 1e-5, "{alone:?} vs {probs:?}");
    let alone = probabilities(&mut client, vec![query(text, vec![])], LABELS.len()).await;
    assert!(max_diff(&alone[0], &probs[0]) < 1e-5, "{alone:?} vs {probs:?}");

    // Image errors name the query and the image.
    let big: Vec<u8> = (0..30_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    for (queries, needles) in [
        (vec![query("hi", vec![]), query("look", vec![a.clone(), big])], ["query 1 image 1 is 30000 bytes", "limit is 20000"]),
        (vec![query("look", vec![b"not an image".to_vec()])], ["query 0 image 0 is not in a supported format", "JPEG"]),
    ] {
        let err = client.classify(request(queries)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        for needle in needles {
            assert!(err.message().contains(needle), "{:?} lacks {needle:?}", err.message());
        }
    }
    let (_, metrics) = common::http_get(running.metrics_addr, "/metrics").await;
    assert!(common::sample(&metrics, "concierge_batch_size_count{lane=\"image\"}") >= 1.0, "{metrics}");
    running.shutdown().await.unwrap();

    // A fusion block trained on another image model: text only, and images are refused.
    let other = edited_checkpoint(&dir, |c| c["image_encoder"]["version"] = "sha256:111111111111".into());
    let flag = format!("--intent-model-dir={}", other.display());
    let running = common::serve(&[&flag]).await;
    let mut client = connect(&running).await;
    let err = client.classify(request(vec![query(text, vec![a.clone()])])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("sha256:111111111111") && err.message().contains("text only"), "{}", err.message());
    let resp = classify(&mut client, texts(&[text])).await;
    assert_eq!(resp.results.len(), 1);
    running.shutdown().await.unwrap();
}

mod sharing {
    use concierge_engine::Backend;
    use concierge_models::intent::IntentModel;
    use concierge_models::TextEncoder;
    use concierge_server::text::{IntentHead, Tasks, TextInput, TextModel};

    use super::*;

    fn text_model(intent_dir: &Path) -> TextModel {
        let encoder =
            TextEncoder::load(&concierge_models::ModelSource::Dir(common::model_dir()), &Device::Cpu, DType::F32, None).unwrap();
        let model = IntentModel::load(intent_dir, &Device::Cpu).unwrap();
        let labels = model.labels().len();
        let head = IntentHead { model, reads: None, fuses_with: None, no_images: None };
        let encoder = concierge_server::registry::Version::wrap("test", "test", 0, encoder);
        TextModel { encoder, tagger: None, intent: Some(concierge_server::registry::Version::wrap("test", "test", labels, head)) }
    }

    fn worst(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    const TEXTS: [&str; 3] = ["where is my parcel", "I want to return these shoes", "how do I reset my password"];

    /// Runs `TEXTS[i]` with `tasks[i]` as one batch.
    fn run(model: &TextModel, tasks: &[(usize, Tasks)]) -> Vec<concierge_server::text::TextOutput> {
        let inputs: Vec<TextInput> = tasks
            .iter()
            .map(|&(i, tasks)| TextInput {
                tokens: model.encoder.tokenize(i, TEXTS[i], false).unwrap(),
                normalize: true,
                tasks,
                images: Vec::new(),
            })
            .collect();
        model.run(&inputs.iter().collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn one_encoder_pass_serves_embeddings_and_intents() {
        let both = Tasks { embed: true, entities: false, intent: true };
        // The committed head, and a head branching at layer 4 with its own copies of the
        // encoder's layers 4 and 5 (so its answer must equal the head alone on the last layer).
        let committed = text_model(&checkpoint());
        let head_only = text_model(&synthetic_checkpoint(None, None));
        let branched = text_model(&synthetic_checkpoint(Some(4), None));
        assert_eq!(branched.intent.as_ref().unwrap().model.tap(), Some(4));
        for model in [&committed, &branched] {
            let out = run(model, &[(0, both), (1, Tasks::EMBED), (2, Tasks::INTENT)]);
            assert!(out[0].embedding.is_some() && out[0].intent.is_some());
            assert!(out[1].embedding.is_some() && out[1].intent.is_none());
            assert!(out[2].embedding.is_none() && out[2].intent.is_some());
            let probs = out[0].intent.as_ref().unwrap();
            assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-4);
            // Each answer equals what the input alone asking for one thing gets.
            let alone = run(model, &[(0, Tasks::EMBED)]).remove(0).embedding.unwrap();
            assert!(worst(&alone, out[0].embedding.as_ref().unwrap()) < 1e-5);
            for i in [0, 2] {
                let alone = run(model, &[(i, Tasks::INTENT)]).remove(0).intent.unwrap();
                assert!(worst(&alone, out[i].intent.as_ref().unwrap()) < 1e-5, "input {i}");
            }
        }
        let tapped = run(&branched, &[(0, both), (1, Tasks::EMBED), (2, Tasks::INTENT)]);
        let last = run(&head_only, &[(0, Tasks::INTENT), (2, Tasks::INTENT)]);
        for (t, l) in [(&tapped[0], &last[0]), (&tapped[2], &last[1])] {
            let err = worst(t.intent.as_ref().unwrap(), l.intent.as_ref().unwrap());
            assert!(err < 1e-4, "the branch over the encoder's own top layers differs from the last layer's head by {err}");
        }
    }

    /// The default tagger reads several layers side by side and the default intent head branches
    /// at layer 4: one batch asking for everything still runs one pass, and each answer equals
    /// the input alone asking for one thing.
    #[test]
    fn one_pass_serves_intents_and_a_tagger_reading_several_layers() {
        let mut model = text_model(&checkpoint());
        let tagger = concierge_models::BiLstmCrf::load(&common::repo_path("checkpoints/entities-en-atis"), &Device::Cpu, DType::F32).unwrap();
        assert!(tagger.config().encoder_layers.as_ref().is_some_and(|l| l.len() > 1), "the default tagger reads one layer");
        let tags = tagger.tags().len();
        let tagger = concierge_server::registry::Tagger { model: tagger, reads: None };
        model.tagger = Some(concierge_server::registry::Version::wrap("tagger", "tagger", tags, tagger));
        let texts = ["flights from boston to denver tomorrow morning", "where is my parcel", "cheapest fare from dallas to miami"];
        let run = |tasks: &[(usize, Tasks)]| {
            let inputs: Vec<TextInput> = tasks
                .iter()
                .map(|&(i, tasks)| TextInput { tokens: model.encoder.tokenize(i, texts[i], false).unwrap(), normalize: true, tasks, images: Vec::new() })
                .collect();
            model.run(&inputs.iter().collect::<Vec<_>>()).unwrap()
        };
        let all = Tasks { embed: true, entities: true, intent: true };
        let out = run(&[(0, all), (1, Tasks::INTENT), (2, Tasks::ENTITIES)]);
        let spans = |e: &[concierge_models::entities::Entity]| e.iter().map(|e| (e.label.clone(), e.start, e.end)).collect::<Vec<_>>();
        for (i, got) in [(0, &out[0]), (2, &out[2])] {
            let alone = run(&[(i, Tasks::ENTITIES)]).remove(0).entities.unwrap();
            assert!(!alone.is_empty(), "the tagger found nothing in {:?}", texts[i]);
            assert_eq!(spans(&alone), spans(got.entities.as_ref().unwrap()), "input {i}");
        }
        for (i, got) in [(0, &out[0]), (1, &out[1])] {
            let alone = run(&[(i, Tasks::INTENT)]).remove(0).intent.unwrap();
            assert!(worst(&alone, got.intent.as_ref().unwrap()) < 1e-5, "input {i}");
        }
        let alone = run(&[(0, Tasks::EMBED)]).remove(0).embedding.unwrap();
        assert!(worst(&alone, out[0].embedding.as_ref().unwrap()) < 1e-5);
        assert!(out[1].entities.is_none() && out[2].intent.is_none() && out[1].embedding.is_none());
    }

    /// A tagger with its own fine-tuned top layers (`branch_from`) beside the intent head's
    /// branch: the pass is tapped for both, and each continues from its own tap. Built here from
    /// the default tagger with copies of the encoder's own layers 4..6, it must find exactly what
    /// the default tagger finds, in a batch with intents and alone.
    #[test]
    fn a_tagger_with_fine_tuned_layers_shares_the_pass_with_the_intent_branch() {
        let src = common::repo_path("checkpoints/entities-en-atis");
        let encoder_dir = common::repo_path("model-store/all-MiniLM-L6-v2");
        let dir = std::env::temp_dir().join(format!("concierge-branch-tagger-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "tags.json", "model.safetensors"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        cfg["branch_from"] = serde_json::json!(4);
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        std::fs::copy(encoder_dir.join("config.json"), dir.join("encoder_config.json")).unwrap();
        let mut ts = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        for (name, t) in candle_core::safetensors::load(encoder_dir.join("model.safetensors"), &Device::Cpu).unwrap() {
            let name = name.strip_prefix("bert.").unwrap_or(&name).to_string();
            if name.starts_with("encoder.layer.4.") || name.starts_with("encoder.layer.5.") {
                ts.insert(name, t);
            }
        }
        candle_core::safetensors::save(&ts, dir.join("model.safetensors")).unwrap();

        let texts = ["flights from boston to denver tomorrow morning", "where is my parcel", "cheapest fare from dallas to miami"];
        // Spans, and confidences (CRF marginals) to 1e-4: any change in the features shows there.
        let spans = |e: &[concierge_models::entities::Entity]| {
            e.iter().map(|e| (e.label.clone(), e.start, e.end, (e.confidence * 1e4).round() as i64)).collect::<Vec<_>>()
        };
        let with_tagger = |tagger_dir: &Path| {
            let mut model = text_model(&checkpoint());
            let tagger = concierge_models::BiLstmCrf::load(tagger_dir, &Device::Cpu, DType::F32).unwrap();
            let tags = tagger.tags().len();
            let tagger = concierge_server::registry::Tagger { model: tagger, reads: None };
            model.tagger = Some(concierge_server::registry::Version::wrap("tagger", "tagger", tags, tagger));
            model
        };
        let run = |model: &TextModel, tasks: &[(usize, Tasks)]| {
            let inputs: Vec<TextInput> = tasks
                .iter()
                .map(|&(i, tasks)| TextInput { tokens: model.encoder.tokenize(i, texts[i], false).unwrap(), normalize: true, tasks, images: Vec::new() })
                .collect();
            model.run(&inputs.iter().collect::<Vec<_>>()).unwrap()
        };
        let frozen = with_tagger(&src);
        let branched = with_tagger(&dir);
        assert!(branched.tagger.as_ref().unwrap().model.branch().is_some());
        let all = Tasks { embed: true, entities: true, intent: true };
        let mixed = run(&branched, &[(0, all), (1, Tasks::INTENT), (2, Tasks::ENTITIES)]);
        for (i, got) in [(0, &mixed[0]), (2, &mixed[2])] {
            let want = run(&frozen, &[(i, Tasks::ENTITIES)]).remove(0).entities.unwrap();
            assert!(!want.is_empty(), "the tagger found nothing in {:?}", texts[i]);
            assert_eq!(spans(got.entities.as_ref().unwrap()), spans(&want), "input {i} in a batch with intents");
            let alone = run(&branched, &[(i, Tasks::ENTITIES)]).remove(0).entities.unwrap();
            assert_eq!(spans(&alone), spans(&want), "input {i} alone");
        }
        let intent = run(&frozen, &[(1, Tasks::INTENT)]).remove(0).intent.unwrap();
        assert!(worst(&intent, mixed[1].intent.as_ref().unwrap()) < 1e-5);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_banking77_model_is_one_flag_away() {
    let dir = common::repo_path("checkpoints/intents-en-banking77");
    let running = common::serve(&[&format!("--intent-model-dir={}", dir.display())]).await;
    let mut client = connect(&running).await;
    let resp = classify(&mut client, texts(&BANKING77.iter().map(|(t, _)| *t).collect::<Vec<_>>())).await;
    for ((text, label), r) in BANKING77.iter().zip(&resp.results) {
        assert_eq!(&r.intents[0].label, label, "{text:?}: {:?}", r.intents);
    }
    let model = resp.model.unwrap();
    assert_eq!(model.id, "intents-en-banking77");
    let (_, metrics) = common::http_get(running.metrics_addr, "/metrics").await;
    assert!(metrics.contains("concierge_intent_answers_total{handoff=\"false\"}"), "{metrics}");
    assert!(metrics.contains("concierge_intent_top_score"), "{metrics}");
    assert_eq!(resp.handoff_threshold, intent_config(&dir)["handoff_threshold"].as_f64().unwrap() as f32);
}

/// Serves `checkpoints/<name>` (an intent model whose top layers were fine-tuned on
/// all-mpnet-base-v2) on its own encoder and checks it: the held-aside queries get their labels
/// without handoff, nonsense is handed off, the model id and stored threshold come back, and the
/// embeddings of the same server are MPNet's (768 wide). Runs where scripts/fetch-mpnet.sh (a
/// step of scripts/fetch-default-model.sh) has fetched the encoder; says so when it skips.
async fn check_mpnet_model(name: &str, held_aside: &[(&str, &str)]) {
    let encoder = common::repo_path("model-store/all-mpnet-base-v2");
    if !encoder.join("model.safetensors").is_file() {
        eprintln!("SKIPPED: {} is not there (scripts/fetch-mpnet.sh fetches it)", encoder.display());
        return;
    }
    let dir = common::repo_path(&format!("checkpoints/{name}"));
    let running = common::serve(&[
        &format!("--model-dir={}", encoder.display()),
        &format!("--intent-model-dir={}", dir.display()),
        "--no-entity-model",
    ])
    .await;
    let mut client = connect(&running).await;
    let mut queries: Vec<&str> = held_aside.iter().map(|(t, _)| *t).collect();
    queries.push(NONSENSE);
    let resp = classify(&mut client, texts(&queries)).await;
    for ((text, label), r) in held_aside.iter().zip(&resp.results) {
        assert_eq!(&r.intents[0].label, label, "{text:?}: {:?}", r.intents);
        assert!(!r.handoff, "{text:?} was handed off: {:?}", r.intents[0]);
    }
    assert!(resp.results.last().unwrap().handoff, "{NONSENSE:?} was not handed off: {:?}", resp.results.last().unwrap().intents);
    assert_eq!(resp.model.unwrap().id, name);
    assert_eq!(resp.handoff_threshold, intent_config(&dir)["handoff_threshold"].as_f64().unwrap() as f32);
    let mut embeddings = concierge_proto::v1::embeddings_client::EmbeddingsClient::connect(format!("http://{}", running.grpc_addr)).await.unwrap();
    let req = concierge_proto::v1::EmbedTextRequest { inputs: vec![queries[0].to_string()], ..Default::default() };
    let emb = embeddings.embed_text(req).await.unwrap().into_inner();
    assert_eq!(emb.embeddings[0].values.len(), 768);
}

/// all-mpnet-base-v2 with its top two layers fine-tuned on CLINC150.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mpnet_clinc150_model_serves_on_its_encoder() {
    check_mpnet_model("intents-en-clinc150-mpnet", CLINC150).await;
}

/// all-mpnet-base-v2 with its top two layers fine-tuned on Banking77 (the checkpoint that meets
/// the 94% on the validation split).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mpnet_banking77_model_serves_on_its_encoder() {
    check_mpnet_model("intents-en-banking77-mpnet", BANKING77).await;
}
