//! Checkpoint hot swap through `concierge.v1.Models`: swaps, canaries and rollbacks under a
//! continuous load of Embed/Classify/Extract calls cost callers nothing; broken checkpoints are
//! refused while serving goes on; keyed callers keep their version; the admin API wants its token.
mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concierge_proto::v1::embeddings_client::EmbeddingsClient;
use concierge_proto::v1::entities_client::EntitiesClient;
use concierge_proto::v1::intents_client::IntentsClient;
use concierge_proto::v1::models_client::ModelsClient;
use concierge_proto::v1::{
    model_source, ClassifyRequest, EmbedTextRequest, ExtractRequest, ListModelsRequest, LoadModelRequest, ModelSource,
    PromoteModelRequest, Query, RollbackModelRequest, VersionState,
};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request};

const TOKEN: &str = "test-admin-token-5f2c";

/// A new checkpoint folder `name` holding links to `src`'s files (a retrained checkpoint as far
/// as the server can tell: another folder, another label), with `edit` applied after.
fn checkpoint_copy(src: &Path, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = common::fresh_dir(name);
    link_tree(src, &dir);
    edit(&dir);
    dir
}

fn link_tree(src: &Path, dst: &Path) {
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&to).unwrap();
            link_tree(&e.path(), &to);
        } else {
            std::os::unix::fs::symlink(e.path().canonicalize().unwrap(), &to).unwrap();
        }
    }
}

/// Replaces a linked file with an edited copy of its bytes.
fn rewrite(dir: &Path, file: &str, edit: impl FnOnce(Vec<u8>) -> Vec<u8>) {
    let path = dir.join(file);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, edit(bytes)).unwrap();
}

fn intents_dir() -> PathBuf {
    common::repo_path("checkpoints/intents-en-clinc150")
}
fn tagger_dir() -> PathBuf {
    common::repo_path("checkpoints/entities-en-atis")
}

fn admin<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {TOKEN}")).unwrap());
    r
}

fn keyed<T>(msg: T, key: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("x-routing-key", MetadataValue::try_from(key).unwrap());
    r
}

fn maybe_keyed<T>(msg: T, key: Option<&str>) -> Request<T> {
    match key {
        Some(k) => keyed(msg, k),
        None => Request::new(msg),
    }
}

fn load(slot: &str, dir: &Path, version: &str) -> LoadModelRequest {
    LoadModelRequest {
        slot: slot.into(),
        source: Some(ModelSource { source: Some(model_source::Source::LocalDir(dir.display().to_string())) }),
        version: version.into(),
    }
}

fn promote(slot: &str, traffic_percent: f32) -> PromoteModelRequest {
    PromoteModelRequest { slot: slot.into(), traffic_percent }
}

async fn start() -> concierge_server::Running {
    common::serve(&["--no-image-model", &format!("--admin-token={TOKEN}"), "--version-label=intent=intents-v1",
        "--version-label=tagger=tagger-v1", "--version-label=text-encoder=encoder-v1"]).await
}

async fn models_client(running: &concierge_server::Running) -> ModelsClient<Channel> {
    ModelsClient::connect(format!("http://{}", running.grpc_addr)).await.unwrap()
}

/// The versions of each slot that may answer now: the active one and the candidate.
async fn serving(admin_client: &mut ModelsClient<Channel>) -> HashMap<String, BTreeSet<String>> {
    let list = admin_client.list(admin(ListModelsRequest {})).await.unwrap().into_inner();
    list.slots
        .into_iter()
        .map(|s| {
            let v = s
                .versions
                .into_iter()
                .filter(|v| v.state == VersionState::Active as i32 || v.state == VersionState::Candidate as i32)
                .map(|v| v.version)
                .collect();
            (s.name, v)
        })
        .collect()
}

/// One answered call: which slot answered, with which version, when it was sent and answered.
struct Answer {
    slot: &'static str,
    version: String,
    sent: Instant,
    done: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_swaps_promotions_and_a_rollback_under_load_fail_no_call() {
    let running = start().await;
    let addr = format!("http://{}", running.grpc_addr);
    let mut models = models_client(&running).await;

    // Retrained checkpoints, as far as the server can tell; and one truncated copy.
    let encoder = |n: &str| checkpoint_copy(&common::model_dir(), &format!("encoder-{n}"), |_| {});
    let intents = |n: &str| checkpoint_copy(&intents_dir(), &format!("intents-{n}"), |_| {});
    let tagger = |n: &str| checkpoint_copy(&tagger_dir(), &format!("tagger-{n}"), |_| {});
    let truncated = checkpoint_copy(&intents_dir(), "intents-truncated", |d| {
        rewrite(d, "model.safetensors", |b| b[..b.len() * 2 / 3].to_vec())
    });

    // The timeline: after each admin call, the versions each slot may answer with, and when
    // the call was sent (a change takes effect between sending and the answer).
    type Timeline = Vec<(Instant, HashMap<String, BTreeSet<String>>)>;
    let timeline: Arc<Mutex<Timeline>> = Arc::new(Mutex::new(vec![(Instant::now(), serving(&mut models).await)]));
    // The start-up intent version: replaced, then dropped from the slot; freed with its last call.
    let first_intent = Arc::downgrade(running.state.registry.snapshot().slots.intent.active.as_ref().unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();

    // Continuous load: callers of each rpc, half of them keyed.
    let mut callers = Vec::new();
    for caller in 0..6 {
        let (addr, stop, answers, failures) = (addr.clone(), stop.clone(), answers.clone(), failures.clone());
        callers.push(tokio::spawn(async move {
            let channel = Channel::from_shared(addr).unwrap().connect().await.unwrap();
            let mut embed = EmbeddingsClient::new(channel.clone());
            let mut intents = IntentsClient::new(channel.clone());
            let mut entities = EntitiesClient::new(channel);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let key = format!("shopper-{caller}-{}", n % 7);
                let sent = Instant::now();
                let texts = vec!["where is my parcel".to_string(), "flights from boston to denver on monday".to_string()];
                let key = (caller % 2 == 0).then_some(key.as_str());
                let (slot, got) = match (caller + n as usize) % 3 {
                    0 => ("text-encoder", embed.embed_text(maybe_keyed(EmbedTextRequest { inputs: texts, normalize: None, truncate: None }, key))
                        .await.map(|r| r.into_inner().model)),
                    1 => {
                        let queries = texts.into_iter().map(|text| Query { text, images: vec![] }).collect();
                        ("intent", intents.classify(maybe_keyed(ClassifyRequest { queries, ..Default::default() }, key)).await.map(|r| r.into_inner().model))
                    }
                    _ => ("tagger", entities.extract(maybe_keyed(ExtractRequest { texts, truncate: None }, key)).await.map(|r| r.into_inner().model)),
                };
                match got {
                    Ok(Some(model)) => answers.lock().unwrap().push(Answer { slot, version: model.version, sent, done: Instant::now() }),
                    Ok(None) => failures.lock().unwrap().push(format!("{slot}: an answer without its model")),
                    Err(s) => failures.lock().unwrap().push(format!("{slot}: {:?} {}", s.code(), s.message())),
                }
            }
        }));
    }

    // 20+ admin changes, each slot swapped more than once, a refused load, then rollbacks.
    let steps: Vec<(&str, &str, PathBuf, f32)> = vec![
        ("load", "intent", intents("v2"), 0.0),
        ("promote", "intent", PathBuf::new(), 10.0),
        ("promote", "intent", PathBuf::new(), 50.0),
        ("promote", "intent", PathBuf::new(), 100.0),
        ("load", "tagger", tagger("v2"), 0.0),
        ("promote", "tagger", PathBuf::new(), 30.0),
        ("promote", "tagger", PathBuf::new(), 100.0),
        ("load", "text-encoder", encoder("v2"), 0.0),
        ("promote", "text-encoder", PathBuf::new(), 20.0),
        ("promote", "text-encoder", PathBuf::new(), 100.0),
        ("refused", "intent", truncated.clone(), 0.0),
        ("load", "intent", intents("v3"), 0.0),
        ("promote", "intent", PathBuf::new(), 10.0),
        ("promote", "intent", PathBuf::new(), 100.0),
        ("load", "tagger", tagger("v3"), 0.0),
        ("promote", "tagger", PathBuf::new(), 100.0),
        ("load", "text-encoder", encoder("v3"), 0.0),
        ("promote", "text-encoder", PathBuf::new(), 50.0),
        ("promote", "text-encoder", PathBuf::new(), 100.0),
        ("load", "intent", intents("v4"), 0.0),
        ("promote", "intent", PathBuf::new(), 25.0),
        ("promote", "intent", PathBuf::new(), 100.0),
        ("rollback", "intent", PathBuf::new(), 0.0),
        ("rollback", "text-encoder", PathBuf::new(), 0.0),
    ];
    let mut version_of: HashMap<&str, String> = HashMap::new();
    let mut n = 0;
    for (op, slot, dir, percent) in &steps {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let sent = Instant::now();
        match *op {
            "load" => {
                n += 1;
                let label = format!("{slot}-{n}");
                let resp = models.load(admin(load(slot, dir, &label))).await.unwrap_or_else(|s| panic!("load {slot}: {s:?}")).into_inner();
                let s = resp.slot.unwrap();
                assert!(s.versions.iter().any(|v| v.version == label && v.state == VersionState::Candidate as i32), "{s:?}");
                version_of.insert(slot, label);
            }
            "refused" => {
                let err = models.load(admin(load(slot, dir, "broken"))).await.unwrap_err();
                assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
                assert!(err.message().contains("truncated"), "{}", err.message());
            }
            "promote" => {
                let resp = models.promote(admin(promote(slot, *percent))).await.unwrap_or_else(|s| panic!("promote {slot}: {s:?}"));
                let first = &resp.into_inner().slots[0];
                let want = if *percent >= 100.0 { VersionState::Active } else { VersionState::Candidate };
                assert!(first.versions.iter().any(|v| v.version == version_of[slot] && v.state == want as i32), "{first:?}");
            }
            _ => {
                models.rollback(admin(RollbackModelRequest { slot: slot.to_string() })).await.unwrap_or_else(|s| panic!("rollback {slot}: {s:?}"));
            }
        }
        let now = serving(&mut models).await;
        timeline.lock().unwrap().push((sent, now));
    }
    // Rolled back: the versions before the last promotions are active again.
    let now = serving(&mut models).await;
    let list = models.list(admin(ListModelsRequest {})).await.unwrap().into_inner();
    let active = |slot: &str| {
        list.slots.iter().find(|s| s.name == slot).unwrap().versions.iter().find(|v| v.state == VersionState::Active as i32).unwrap().version.clone()
    };
    assert_eq!(active("intent"), "intent-4", "{now:?}");
    assert_eq!(active("text-encoder"), "text-encoder-3", "{now:?}");
    assert_eq!(active("tagger"), "tagger-5");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in callers {
        c.await.unwrap();
    }

    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "{} calls failed during the swaps, e.g. {:?}", failures.len(), &failures[..failures.len().min(5)]);
    let answers = answers.lock().unwrap();
    let timeline = timeline.lock().unwrap();
    // A call may be answered by any version that could serve at some moment while it was in
    // flight: state i holds from its change's sending to the next change's answer.
    let mut seen: HashMap<(&str, String), usize> = HashMap::new();
    for a in answers.iter() {
        let ok = timeline.iter().enumerate().any(|(i, (from, set))| {
            let until = timeline.get(i + 2).map(|(t, _)| *t).unwrap_or(Instant::now());
            *from <= a.done && a.sent <= until && set.get(a.slot).is_some_and(|s| s.contains(&a.version))
        });
        assert!(ok, "a {} call was answered by version {:?}, which was neither active nor candidate while it ran", a.slot, a.version);
        *seen.entry((a.slot, a.version.clone())).or_default() += 1;
    }
    assert!(answers.len() > 100, "only {} calls were made during the swaps", answers.len());
    for version in ["intent-1", "intent-4", "text-encoder-3", "tagger-5"] {
        let slot = &version[..version.rfind('-').unwrap()];
        assert!(seen.keys().any(|(s, v)| *s == slot && v == version), "no call was answered by {version}: {seen:?}");
    }
    eprintln!("{} calls answered across {} admin changes; per version: {seen:?}", answers.len(), steps.len());

    assert!(first_intent.upgrade().is_none(), "the first intent version is still held after its last call ended");

    // Per-version metrics let the A/B be judged.
    let (_, metrics) = common::http_get(running.metrics_addr, "/metrics").await;
    assert!(common::sample(&metrics, "concierge_model_requests_total{slot=\"intent\",version=\"intent-1\",code=\"OK\"}") >= 1.0, "{metrics}");
    assert!(metrics.contains("concierge_model_request_duration_seconds_count{slot=\"text-encoder\",version=\"text-encoder-3\"}"));
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_percent_canary_gets_about_ten_percent_of_keyed_callers_always_the_same() {
    let running = start().await;
    let mut models = models_client(&running).await;
    let mut intents = IntentsClient::connect(format!("http://{}", running.grpc_addr)).await.unwrap();
    models.load(admin(load("intent", &checkpoint_copy(&intents_dir(), "intents-canary", |_| {}), "canary"))).await.unwrap();
    models.promote(admin(promote("intent", 10.0))).await.unwrap();
    let asker = intents.clone();
    let ask = |key: String| {
        let mut c = asker.clone();
        async move {
            let q = ClassifyRequest { queries: vec![Query { text: "what is my balance".into(), images: vec![] }], ..Default::default() };
            c.classify(keyed(q, &key)).await.unwrap().into_inner().model.unwrap().version
        }
    };
    let keys: Vec<String> = (0..600).map(|i| format!("shopper-{i}")).collect();
    let mut first = Vec::new();
    for k in &keys {
        first.push(ask(k.clone()).await);
    }
    let canary = first.iter().filter(|v| *v == "canary").count();
    assert!((36..=84).contains(&canary), "{canary} of 600 keyed callers got the 10% canary");
    assert!(first.iter().all(|v| v == "canary" || v == "intents-v1"));
    for (k, v) in keys.iter().zip(&first).step_by(3) {
        assert_eq!(&ask(k.clone()).await, v, "caller {k} changed version");
    }
    // Unkeyed calls are spread at random: some of 300 reach the canary, most do not.
    let mut unkeyed = 0;
    for _ in 0..300 {
        let q = ClassifyRequest { queries: vec![Query { text: "what is my balance".into(), images: vec![] }], ..Default::default() };
        unkeyed += (intents.classify(q).await.unwrap().into_inner().model.unwrap().version == "canary") as usize;
    }
    assert!((8..=60).contains(&unkeyed), "{unkeyed} of 300 unkeyed calls reached the 10% canary");
    // At 0% nobody gets it.
    models.promote(admin(promote("intent", 0.0))).await.unwrap();
    for k in keys.iter().zip(&first).filter(|(_, v)| *v == "canary").map(|(k, _)| k).take(10) {
        assert_eq!(ask(k.clone()).await, "intents-v1");
    }
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_checkpoints_are_refused_and_the_active_version_serves_on() {
    let running = start().await;
    let mut models = models_client(&running).await;
    let mut intents = IntentsClient::connect(format!("http://{}", running.grpc_addr)).await.unwrap();
    let one = || ClassifyRequest { queries: vec![Query { text: "please transfer 100 dollars to my savings".into(), images: vec![] }], ..Default::default() };

    let nan = checkpoint_copy(&intents_dir(), "intents-nan", |d| {
        rewrite(d, "model.safetensors", |mut b| {
            // The last four bytes of the data: part of some float tensor, now a NaN.
            let n = b.len();
            b[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
            b
        })
    });
    let fewer_labels = checkpoint_copy(&intents_dir(), "intents-labels", |d| {
        rewrite(d, "intent_config.json", |b| {
            let mut c: serde_json::Value = serde_json::from_slice(&b).unwrap();
            c["labels"].as_array_mut().unwrap().pop();
            c.to_string().into_bytes()
        })
    });
    let renamed_label = checkpoint_copy(&intents_dir(), "intents-renamed", |d| {
        rewrite(d, "intent_config.json", |b| {
            let mut c: serde_json::Value = serde_json::from_slice(&b).unwrap();
            c["labels"][3] = "definitely_not_a_clinc_label".into();
            c.to_string().into_bytes()
        })
    });
    let wrong_shapes = checkpoint_copy(&tagger_dir(), "tagger-shapes", |d| {
        rewrite(d, "config.json", |b| {
            let mut c: serde_json::Value = serde_json::from_slice(&b).unwrap();
            c["hidden_size"] = serde_json::json!(c["hidden_size"].as_u64().unwrap() + 8);
            c.to_string().into_bytes()
        })
    });
    let deeper_layer = checkpoint_copy(&tagger_dir(), "tagger-layer", |d| {
        rewrite(d, "config.json", |b| {
            let mut c: serde_json::Value = serde_json::from_slice(&b).unwrap();
            c["encoder_layers"][0] = serde_json::json!(7);
            c.to_string().into_bytes()
        })
    });
    let truncated = checkpoint_copy(&common::model_dir(), "encoder-truncated", |d| {
        rewrite(d, "model.safetensors", |b| b[..b.len() - 1000].to_vec())
    });
    let not_a_folder = common::fresh_dir("empty").join("missing");
    let mut refused = Vec::new();
    for (slot, dir, needle) in [
        ("intent", &nan, "NaN"),
        ("intent", &fewer_labels, "shape mismatch for head.out.weight, expected: [150, 384], got: [151, 384]"),
        ("intent", &renamed_label, "the label sets must match"),
        ("tagger", &wrong_shapes, "shape mismatch for lstm.weight_ih_l0"),
        ("tagger", &deeper_layer, "it reads the states after layer 7, but the text encoder has 6 layers"),
        ("text-encoder", &truncated, "truncated"),
        ("intent", &not_a_folder, "not a folder"),
    ] {
        // Serving goes on while the load is checked.
        let serving = {
            let mut c = intents.clone();
            let q = one();
            tokio::spawn(async move { c.classify(q).await.map(|r| r.into_inner().model.unwrap().version) })
        };
        let err = models.load(admin(load(slot, dir, "bad"))).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{slot} {}: {err:?}", dir.display());
        assert!(err.message().to_lowercase().contains(&needle.to_lowercase()), "{slot}: {:?} lacks {needle:?}", err.message());
        assert_eq!(serving.await.unwrap().unwrap(), "intents-v1");
        assert!(!err.message().contains("\n"), "one line, no backtrace: {:?}", err.message());
        refused.push(err.message().to_string());
    }
    eprintln!("refused: {refused:#?}");
    // The failed load shows in List, and the slot has no candidate.
    let list = models.list(admin(ListModelsRequest {})).await.unwrap().into_inner();
    let intent = list.slots.iter().find(|s| s.name == "intent").unwrap();
    assert!(intent.versions.iter().any(|v| v.state == VersionState::Failed as i32 && !v.error.is_empty()), "{intent:?}");
    assert!(intent.versions.iter().all(|v| v.state != VersionState::Candidate as i32));
    let resp = intents.classify(one()).await.unwrap().into_inner();
    assert_eq!(resp.model.unwrap().version, "intents-v1");
    assert_eq!(resp.results[0].intents[0].label, "transfer");

    // What cannot be done is refused with what to do instead.
    let err = models.promote(admin(promote("intent", 50.0))).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("Load one first"), "{}", err.message());
    let err = models.rollback(admin(RollbackModelRequest { slot: "tagger".into() })).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = models.promote(admin(promote("intnet", 50.0))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("text-encoder"), "{}", err.message());
    let err = models.load(admin(load("intent", &intents_dir(), "intents-v1"))).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = models.promote(admin(promote("intent", 150.0))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_without_the_memory_for_it_is_refused_and_serving_goes_on() {
    // A headroom no machine has: every live load would leave too little memory for serving.
    let running = common::serve(&["--no-image-model", &format!("--admin-token={TOKEN}"), "--load-headroom-mb=100000000"]).await;
    let mut models = models_client(&running).await;
    let err = models.load(admin(load("text-encoder", &common::model_dir(), "big"))).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("MiB are free"), "{}", err.message());
    let mut embed = common::client(&running).await;
    let resp = embed.embed_text(common::request(&["still serving"])).await.unwrap().into_inner();
    assert_eq!(resp.embeddings.len(), 1);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_without_the_token_are_refused() {
    let running = start().await;
    let mut models = models_client(&running).await;
    let err = models.list(ListModelsRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut wrong = Request::new(promote("intent", 100.0));
    wrong.metadata_mut().insert("authorization", MetadataValue::from_static("Bearer not-the-token"));
    let err = models.promote(wrong).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut not_bearer = Request::new(ListModelsRequest {});
    not_bearer.metadata_mut().insert("authorization", MetadataValue::try_from(TOKEN).unwrap());
    assert_eq!(models.list(not_bearer).await.unwrap_err().code(), Code::Unauthenticated);
    // With the token, List shows every slot the server runs.
    let list = models.list(admin(ListModelsRequest {})).await.unwrap().into_inner();
    let names: BTreeSet<&str> = list.slots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["text-encoder", "intent", "tagger", "query-tower", "document-tower"]));
    running.shutdown().await.unwrap();

    // A server without a token refuses every admin call.
    let running = common::serve(&["--no-image-model"]).await;
    let mut models = models_client(&running).await;
    let err = models.list(admin(ListModelsRequest {})).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("--admin-token-file"), "{}", err.message());
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_encoder_moves_with_the_heads_trained_on_it() {
    let running = start().await;
    let addr = format!("http://{}", running.grpc_addr);
    let mut models = models_client(&running).await;
    let mut intents = IntentsClient::connect(addr.clone()).await.unwrap();
    let mut embed = EmbeddingsClient::connect(addr.clone()).await.unwrap();
    let mut entities = EntitiesClient::connect(addr).await.unwrap();
    let freed = Arc::downgrade(running.state.registry.snapshot().slots.intent.active.as_ref().unwrap());

    // "Retrained" encoder weights: the last float of the file (the unused pooler) changed, so
    // the weights' hash differs and the heads trained on the old weights do not read it.
    let encoder_b = checkpoint_copy(&common::model_dir(), "encoder-b", |d| {
        rewrite(d, "model.safetensors", |mut b| {
            let n = b.len();
            b[n - 4..].copy_from_slice(&0.0123f32.to_le_bytes());
            b
        })
    });
    let resp = models.load(admin(load("text-encoder", &encoder_b, "encoder-b"))).await.unwrap().into_inner();
    let weights_b = resp.slot.unwrap().versions.iter().find(|v| v.version == "encoder-b").unwrap().weights.clone();
    let err = models.promote(admin(promote("text-encoder", 100.0))).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("load a intent checkpoint trained on the new version") || err.message().contains("trained on the new version"), "{}", err.message());

    // At a share, callers in the cohort embed with encoder-b, but their intents and entities
    // come from the versions that can read their encoder: the active ones.
    models.promote(admin(promote("text-encoder", 30.0))).await.unwrap();
    let in_cohort: Vec<String> = (0..200).map(|i| format!("k{i}")).filter(|k| concierge_server::registry::bucket_of(k) < 3000).take(5).collect();
    assert_eq!(in_cohort.len(), 5);
    let classify_req = || ClassifyRequest { queries: vec![Query { text: "what is my balance".into(), images: vec![] }], ..Default::default() };
    for k in &in_cohort {
        let e = embed.embed_text(keyed(common::request(&["hello"]), k)).await.unwrap().into_inner();
        assert_eq!(e.model.unwrap().version, "encoder-b");
        let c = intents.classify(keyed(classify_req(), k)).await.unwrap().into_inner();
        assert_eq!(c.model.unwrap().version, "intents-v1");
    }

    // Heads trained on encoder-b load (they read a held encoder), and the cohort gets them.
    let intents_b = checkpoint_copy(&intents_dir(), "intents-b", |d| {
        rewrite(d, "intent_config.json", |b| {
            let mut c: serde_json::Value = serde_json::from_slice(&b).unwrap();
            c["encoder"]["version"] = weights_b.clone().into();
            c.to_string().into_bytes()
        })
    });
    let tagger_b = checkpoint_copy(&tagger_dir(), "tagger-b", |d| {
        rewrite(d, "config.json", |b| {
            let mut c: serde_json::Value = serde_json::from_slice(&b).unwrap();
            c["encoder"]["version"] = weights_b.clone().into();
            c.to_string().into_bytes()
        })
    });
    models.load(admin(load("intent", &intents_b, "intents-b"))).await.unwrap();
    models.load(admin(load("tagger", &tagger_b, "tagger-b"))).await.unwrap();
    // A candidate at 0% serves nobody, not even the cohort of its encoder.
    let c = intents.classify(keyed(classify_req(), &in_cohort[0])).await.unwrap().into_inner();
    assert_eq!(c.model.unwrap().version, "intents-v1");
    // At the encoder's share the heads serve the same cohort (one key, one bucket, every slot).
    models.promote(admin(promote("intent", 30.0))).await.unwrap();
    models.promote(admin(promote("tagger", 30.0))).await.unwrap();
    for k in &in_cohort {
        let c = intents.classify(keyed(classify_req(), k)).await.unwrap().into_inner();
        assert_eq!(c.model.unwrap().version, "intents-b");
        let x = entities.extract(keyed(ExtractRequest { texts: vec!["flights to boston".into()], truncate: None }, k)).await.unwrap();
        assert_eq!(x.into_inner().model.unwrap().version, "tagger-b");
    }
    let outside = (0..200).map(|i| format!("k{i}")).find(|k| concierge_server::registry::bucket_of(k) >= 3000).unwrap();
    assert_eq!(intents.classify(keyed(classify_req(), &outside)).await.unwrap().into_inner().model.unwrap().version, "intents-v1");

    // At 100% the encoder takes its heads along; a rollback brings all three back.
    let changed = models.promote(admin(promote("text-encoder", 100.0))).await.unwrap().into_inner();
    let names: Vec<&str> = changed.slots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["text-encoder", "intent", "tagger"]);
    for _ in 0..5 {
        assert_eq!(intents.classify(classify_req()).await.unwrap().into_inner().model.unwrap().version, "intents-b");
        assert_eq!(embed.embed_text(common::request(&["hi"])).await.unwrap().into_inner().model.unwrap().version, "encoder-b");
    }
    let back = models.rollback(admin(RollbackModelRequest { slot: "text-encoder".into() })).await.unwrap().into_inner();
    assert_eq!(back.slots.len(), 3, "{back:?}");
    assert_eq!(intents.classify(classify_req()).await.unwrap().into_inner().model.unwrap().version, "intents-v1");
    assert_eq!(embed.embed_text(common::request(&["hi"])).await.unwrap().into_inner().model.unwrap().version, "encoder-v1");

    // The knowledge base's towers did not move with the text encoder; a document tower is
    // promoted whole or not at all (a share would mix two vector spaces in one collection).
    let list = models.list(admin(ListModelsRequest {})).await.unwrap().into_inner();
    let doc = list.slots.iter().find(|s| s.name == "document-tower").unwrap();
    assert_eq!(doc.versions.len(), 1);
    assert_eq!(doc.versions[0].version, "encoder-v1");
    models.load(admin(load("document-tower", &encoder_b, "docs-b"))).await.unwrap();
    let err = models.promote(admin(promote("document-tower", 10.0))).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("vector spaces"), "{}", err.message());
    models.promote(admin(promote("document-tower", 100.0))).await.unwrap();

    // Rolled back to, the first intent version is active again: still the same loaded model.
    assert!(freed.upgrade().is_some());
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_encoder_swaps_like_the_others() {
    use concierge_proto::v1::EmbedImageRequest;
    let running = common::serve(&[&format!("--admin-token={TOKEN}"), "--version-label=image-encoder=image-v1"]).await;
    let mut models = models_client(&running).await;
    let mut embed = EmbeddingsClient::connect(format!("http://{}", running.grpc_addr)).await.unwrap();
    let image = common::encoded_image(64, 48, 3, image::ImageFormat::Png);
    let ask = |e: &mut EmbeddingsClient<Channel>| {
        let mut e = e.clone();
        let image = image.clone();
        async move { e.embed_image(EmbedImageRequest { images: vec![image], normalize: None }).await.unwrap().into_inner() }
    };
    let before = ask(&mut embed).await;
    assert_eq!(before.model.as_ref().unwrap().version, "image-v1");
    let copy = checkpoint_copy(&common::tiny_image_model(), "image-b", |_| {});
    models.load(admin(load("image-encoder", &copy, "image-b"))).await.unwrap();
    models.promote(admin(promote("image-encoder", 100.0))).await.unwrap();
    let after = ask(&mut embed).await;
    assert_eq!(after.model.as_ref().unwrap().version, "image-b");
    assert_eq!(after.embeddings[0].values, before.embeddings[0].values, "the same weights give the same vector");
    models.rollback(admin(RollbackModelRequest { slot: "image-encoder".into() })).await.unwrap();
    assert_eq!(ask(&mut embed).await.model.unwrap().version, "image-v1");
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_names_the_slots_and_a_candidate_with_its_share() {
    let dir = common::fresh_dir("config-file");
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let candidate = checkpoint_copy(&intents_dir(), "intents-from-config", |_| {});
    let file = dir.join("concierge.toml");
    std::fs::write(
        &file,
        format!(
            r#"
admin_token_file = "{}"
[models.text-encoder]
dir = "{}"
version = "minilm-from-file"
[models.intent]
dir = "{}"
version = "clinc-from-file"
[models.intent.candidate]
dir = "{}"
version = "clinc-candidate"
traffic_percent = 10
[models.tagger]
enabled = false
[models.image-encoder]
enabled = false
"#,
            token_file.display(),
            common::model_dir().display(),
            intents_dir().display(),
            candidate.display()
        ),
    )
    .unwrap();
    let kb = common::fresh_dir("kb");
    let args: Vec<std::ffi::OsString> = vec![
        "concierge".into(),
        "--listen=127.0.0.1:0".into(),
        "--metrics-listen=127.0.0.1:0".into(),
        format!("--kb-dir={}", kb.display()).into(),
        format!("--config={}", file.display()).into(),
    ];
    let config = concierge_server::Config::parse_from_with_file(args).unwrap();
    let mut running = concierge_server::start(config).await.unwrap();
    running.ready(Duration::from_secs(60)).await.unwrap();
    let mut models = models_client(&running).await;
    // The candidate loads once the server is up.
    let t0 = Instant::now();
    let intent = loop {
        let list = models.list(admin(ListModelsRequest {})).await.unwrap().into_inner();
        let intent = list.slots.into_iter().find(|s| s.name == "intent").unwrap();
        if intent.versions.iter().any(|v| v.state == VersionState::Candidate as i32) {
            break intent;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the config file's candidate never loaded: {intent:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let candidate = intent.versions.iter().find(|v| v.state == VersionState::Candidate as i32).unwrap();
    assert_eq!((candidate.version.as_str(), candidate.traffic_percent), ("clinc-candidate", 10.0));
    let active = intent.versions.iter().find(|v| v.state == VersionState::Active as i32).unwrap();
    assert_eq!(active.version, "clinc-from-file");
    let mut embed = common::client(&running).await;
    let e = embed.embed_text(common::request(&["hi"])).await.unwrap().into_inner();
    assert_eq!(e.model.unwrap().version, "minilm-from-file");
    let mut entities = EntitiesClient::connect(format!("http://{}", running.grpc_addr)).await.unwrap();
    let err = entities.extract(ExtractRequest { texts: vec!["x".into()], truncate: None }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "tagger disabled in the file: {err:?}");
    running.shutdown().await.unwrap();
}
