//! concierge.v1.KnowledgeBase over real gRPC: semantic search on the default model, filters,
//! thresholds, replace/delete, Get, calibration, restart, and every bad input's status.
mod common;

use std::collections::HashMap;

use common::{fresh_dir, serve};
use concierge_proto::v1 as pb;
use concierge_proto::v1::knowledge_base_client::KnowledgeBaseClient;
use tonic::transport::Channel;
use tonic::Code;

async fn kb_client(running: &concierge_server::Running) -> KnowledgeBaseClient<Channel> {
    KnowledgeBaseClient::connect(format!("http://{}", running.grpc_addr)).await.expect("connects")
}

fn doc(id: &str, text: &str, topic: &str) -> pb::Document {
    pb::Document {
        id: id.into(),
        text: text.into(),
        title: String::new(),
        metadata: HashMap::from([("topic".to_string(), topic.to_string())]),
        vector: vec![],
    }
}

fn faq() -> Vec<pb::Document> {
    vec![
        doc("returns", "How do I return an item? Unused items can be sent back within 30 days for a full refund.", "orders"),
        doc("shipping", "How long does delivery take? Standard shipping takes 3 to 5 business days.", "orders"),
        doc("sensitive", "Is this face cream suitable for sensitive skin? Yes: it is fragrance-free and dermatologist tested.", "product"),
        doc("popup", "How do I close the popup window in the app? Tap the X in its top right corner.", "app"),
        doc("password", "I forgot my password. Use 'Forgot password' on the sign-in page to get a reset link by email.", "account"),
    ]
}

fn search(collection: &str, query: &str) -> pb::SearchRequest {
    pb::SearchRequest { collection: collection.into(), query: query.into(), ..Default::default() }
}

async fn ids(kb: &mut KnowledgeBaseClient<Channel>, req: pb::SearchRequest) -> Vec<String> {
    kb.search(req).await.expect("search").into_inner().hits.into_iter().map(|h| h.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn search_finds_the_right_entry_and_sees_every_write() {
    let running = serve(&[]).await;
    let mut kb = kb_client(&running).await;
    let info = kb
        .create_collection(pb::CreateCollectionRequest { name: "faq".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.dimension, info.metric), (384, pb::Metric::Cosine as i32));
    assert!(info.embedder.starts_with("all-MiniLM-L6-v2@sha256:"), "{}", info.embedder);

    let up = kb.upsert(pb::UpsertRequest { collection: "faq".into(), documents: faq(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!((up.inserted, up.updated), (5, 0));
    assert_eq!(up.model.unwrap().id, "all-MiniLM-L6-v2");

    // Shoppers' questions, none sharing the entry's wording, land on the right entry.
    for (q, want) in [
        ("does this cream suit sensitive skin?", "sensitive"),
        ("when will my parcel arrive", "shipping"),
        ("how can I send something back and get my money", "returns"),
        ("there's an annoying pop-up, how do I get rid of it", "popup"),
        ("can't log in, lost my password", "password"),
    ] {
        let hits = kb.search(search("faq", q)).await.unwrap().into_inner();
        assert_eq!(hits.hits[0].id, want, "{q}: {:?}", hits.hits.iter().map(|h| (&h.id, h.score)).collect::<Vec<_>>());
        assert_eq!(hits.hits.len(), 5, "top_k defaults to 10, the collection has 5");
        assert!(hits.hits.windows(2).all(|w| w[0].score >= w[1].score));
        assert_eq!(hits.hits[0].metadata["topic"], faq().iter().find(|d| d.id == want).unwrap().metadata["topic"]);
    }

    // Filter, top_k, min_score.
    let mut req = search("faq", "does this cream suit sensitive skin?");
    req.filter = HashMap::from([("topic".to_string(), "orders".to_string())]);
    let got = ids(&mut kb, req).await;
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|id| id == "returns" || id == "shipping"));
    let mut req = search("faq", "does this cream suit sensitive skin?");
    req.top_k = Some(2);
    assert_eq!(ids(&mut kb, req).await.len(), 2);
    let mut req = search("faq", "does this cream suit sensitive skin?");
    req.min_score = Some(0.5);
    assert_eq!(ids(&mut kb, req).await, ["sensitive"], "only the matching entry scores over 0.5");

    // Replace, delete, Get: each visible to the next call.
    let mut changed = doc("shipping", "Delivery is free on orders over 50 euros.", "orders");
    changed.title = "Free delivery".into();
    let up = kb.upsert(pb::UpsertRequest { collection: "faq".into(), documents: vec![changed], ..Default::default() }).await.unwrap().into_inner();
    assert_eq!((up.inserted, up.updated), (0, 1));
    assert_eq!(ids(&mut kb, search("faq", "is shipping free?")).await[0], "shipping");
    let del = kb.delete(pb::DeleteRequest { collection: "faq".into(), ids: vec!["popup".into(), "nope".into()] }).await.unwrap().into_inner();
    assert_eq!((del.deleted, del.missing), (1, 1));
    assert!(!ids(&mut kb, search("faq", "close the popup")).await.contains(&"popup".to_string()));
    let got = kb
        .get(pb::GetRequest { collection: "faq".into(), ids: vec!["shipping".into(), "popup".into()], with_vectors: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.missing, ["popup"]);
    assert_eq!(got.documents[0].title, "Free delivery");
    let norm: f32 = got.documents[0].vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "cosine collections store unit vectors");

    // A precomputed vector: searching with that vector finds it with score 1.
    let v: Vec<f32> = (0..384).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    let own = pb::Document { id: "own".into(), text: "brought its own vector".into(), vector: v.clone(), ..Default::default() };
    let up = kb.upsert(pb::UpsertRequest { collection: "faq".into(), documents: vec![own], ..Default::default() }).await.unwrap().into_inner();
    assert!(up.model.is_none(), "nothing was embedded");
    let hits = kb
        .search(pb::SearchRequest { collection: "faq".into(), vector: v, top_k: Some(1), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hits.hits[0].id, "own");
    assert!((hits.hits[0].score - 1.0).abs() < 1e-5);

    // Attributes embedded with the text: a colour that is only in the metadata becomes findable.
    let mut red = doc("scarf-red", "Wool scarf, 180 cm.", "product");
    red.metadata.insert("colour".into(), "bright red".into());
    let mut blue = doc("scarf-blue", "Wool scarf, 180 cm.", "product");
    blue.metadata.insert("colour".into(), "navy blue".into());
    let req = pb::UpsertRequest { collection: "faq".into(), documents: vec![red, blue], embed_metadata_keys: vec!["colour".into()], ..Default::default() };
    kb.upsert(req).await.unwrap();
    assert_eq!(ids(&mut kb, search("faq", "red wool scarf")).await[0], "scarf-red");
    assert_eq!(ids(&mut kb, search("faq", "blue wool scarf")).await[0], "scarf-blue");
    kb.delete(pb::DeleteRequest { collection: "faq".into(), ids: vec!["scarf-red".into(), "scarf-blue".into()] }).await.unwrap();

    let list = kb.list_collections(pb::ListCollectionsRequest {}).await.unwrap().into_inner();
    assert_eq!(list.collections.len(), 1);
    assert_eq!(list.collections[0].documents, 5);
    assert_eq!(list.collections[0].vector_bytes, 5 * 384 * 4);
    running.shutdown().await.unwrap();
}

/// Calibration picks a threshold between relevant and irrelevant pairs, stores it as the
/// collection's default, and searches honour it until a request overrides it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calibrated_threshold_becomes_the_default() {
    let running = serve(&[]).await;
    let mut kb = kb_client(&running).await;
    kb.create_collection(pb::CreateCollectionRequest { name: "faq".into(), ..Default::default() }).await.unwrap();
    kb.upsert(pb::UpsertRequest { collection: "faq".into(), documents: faq(), ..Default::default() }).await.unwrap();
    let pair = |q: &str, d: &str, relevant| pb::LabelledPair { query: q.into(), document_id: d.into(), relevant };
    let pairs = vec![
        pair("does this cream suit sensitive skin?", "sensitive", true),
        pair("when will my parcel arrive", "shipping", true),
        pair("can't log in, lost my password", "password", true),
        pair("does this cream suit sensitive skin?", "password", false),
        pair("when will my parcel arrive", "popup", false),
        pair("can't log in, lost my password", "returns", false),
        pair("what's the weather tomorrow", "shipping", false),
    ];
    let c = kb
        .calibrate_threshold(pb::CalibrateThresholdRequest { collection: "faq".into(), pairs, dry_run: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((c.f1, c.pairs), (1.0, 7), "{c:?}");
    let info = kb.get_collection(pb::GetCollectionRequest { name: "faq".into() }).await.unwrap().into_inner();
    assert_eq!(info.min_score, Some(c.min_score));
    // An off-topic question now gets no hits; the same search with its own min_score does.
    assert!(ids(&mut kb, search("faq", "what's the weather tomorrow")).await.is_empty());
    let mut req = search("faq", "what's the weather tomorrow");
    req.min_score = Some(-1.0);
    assert_eq!(ids(&mut kb, req).await.len(), 5);
    running.shutdown().await.unwrap();
}

/// Everything acknowledged is there after a restart on the same folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_survive_a_restart() {
    let dir = fresh_dir("kb-restart");
    let flag = format!("--kb-dir={}", dir.display());
    let running = serve(&[&flag]).await;
    let mut kb = kb_client(&running).await;
    kb.create_collection(pb::CreateCollectionRequest { name: "faq".into(), ..Default::default() }).await.unwrap();
    kb.upsert(pb::UpsertRequest { collection: "faq".into(), documents: faq(), ..Default::default() }).await.unwrap();
    kb.delete(pb::DeleteRequest { collection: "faq".into(), ids: vec!["returns".into()] }).await.unwrap();
    let before = kb.search(search("faq", "does this cream suit sensitive skin?")).await.unwrap().into_inner();
    running.shutdown().await.unwrap();

    let running = serve(&[&flag]).await;
    let mut kb = kb_client(&running).await;
    let after = kb.search(search("faq", "does this cream suit sensitive skin?")).await.unwrap().into_inner();
    assert_eq!(after.hits.len(), 4);
    for (a, b) in after.hits.iter().zip(&before.hits) {
        assert_eq!((&a.id, &a.text, &a.metadata), (&b.id, &b.text, &b.metadata));
        assert!((a.score - b.score).abs() < 1e-6);
    }
    running.shutdown().await.unwrap();
}

/// Many searches at once each get their own answer (they are batched on the search lane).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_searches_each_get_their_own_hits() {
    let running = serve(&[]).await;
    let mut kb = kb_client(&running).await;
    kb.create_collection(pb::CreateCollectionRequest { name: "v".into(), dimension: 32, ..Default::default() }).await.unwrap();
    let vec_of = |i: usize| -> Vec<f32> { (0..32).map(|k| if k == i % 32 { 1.0 } else { 0.01 * ((i * k) % 7) as f32 }).collect() };
    let documents = (0..32).map(|i| pb::Document { id: format!("d{i}"), vector: vec_of(i), ..Default::default() }).collect();
    kb.upsert(pb::UpsertRequest { collection: "v".into(), documents, ..Default::default() }).await.unwrap();
    let calls = (0..64).map(|i| {
        let mut kb = kb.clone();
        tokio::spawn(async move {
            let req = pb::SearchRequest { collection: "v".into(), vector: vec_of(i % 32), top_k: Some(1), ..Default::default() };
            (i, kb.search(req).await.unwrap().into_inner().hits[0].id.clone())
        })
    });
    for call in calls {
        let (i, id) = call.await.unwrap();
        assert_eq!(id, format!("d{}", i % 32));
    }
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_clear_statuses_and_writes_nothing() {
    let running = serve(&[]).await;
    let mut kb = kb_client(&running).await;
    kb.create_collection(pb::CreateCollectionRequest { name: "faq".into(), ..Default::default() }).await.unwrap();
    kb.create_collection(pb::CreateCollectionRequest { name: "small".into(), dimension: 8, ..Default::default() }).await.unwrap();
    kb.upsert(pb::UpsertRequest { collection: "faq".into(), documents: faq(), ..Default::default() }).await.unwrap();

    async fn expect<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, code: Code, says: &str) {
        let s = r.expect_err("should fail");
        assert_eq!(s.code(), code, "{}", s.message());
        assert!(s.message().contains(says), "message {:?} should say {says:?}", s.message());
    }
    let up = |collection: &str, documents: Vec<pb::Document>| pb::UpsertRequest { collection: collection.into(), documents, ..Default::default() };

    expect(kb.search(search("nope", "hello")).await, Code::NotFound, "does not exist").await;
    expect(kb.create_collection(pb::CreateCollectionRequest { name: "faq".into(), ..Default::default() }).await, Code::AlreadyExists, "already exists").await;
    expect(kb.create_collection(pb::CreateCollectionRequest { name: "a/b".into(), ..Default::default() }).await, Code::InvalidArgument, "not allowed").await;
    expect(kb.create_collection(pb::CreateCollectionRequest { name: "m".into(), metric: 9, ..Default::default() }).await, Code::InvalidArgument, "metric 9").await;
    expect(kb.search(search("faq", "")).await, Code::InvalidArgument, "query is empty").await;
    expect(kb.search(search("faq", "   ")).await, Code::InvalidArgument, "whitespace").await;
    let mut both = search("faq", "hi");
    both.vector = vec![0.0; 384];
    expect(kb.search(both).await, Code::InvalidArgument, "both").await;
    for k in [0, 100_000] {
        let mut req = search("faq", "hi");
        req.top_k = Some(k);
        expect(kb.search(req).await, Code::InvalidArgument, "top_k").await;
    }
    let wrong = pb::SearchRequest { collection: "faq".into(), vector: vec![1.0; 3], ..Default::default() };
    expect(kb.search(wrong).await, Code::InvalidArgument, "dimension 3").await;
    let zero = pb::SearchRequest { collection: "faq".into(), vector: vec![0.0; 384], ..Default::default() };
    expect(kb.search(zero).await, Code::InvalidArgument, "all zeros").await;
    expect(kb.search(search("small", "hello")).await, Code::InvalidArgument, "search it with a vector").await;

    // Upserts that must change nothing.
    let mut two = faq();
    two[1].id = two[0].id.clone();
    expect(kb.upsert(up("faq", two)).await, Code::InvalidArgument, "more than once").await;
    let mut mixed = vec![doc("new-1", "a fine new entry", "x")];
    mixed.push(pb::Document { id: "new-2".into(), vector: vec![1.0; 5], ..Default::default() });
    expect(kb.upsert(up("faq", mixed)).await, Code::InvalidArgument, "dimension 5").await;
    expect(kb.upsert(up("faq", vec![])).await, Code::InvalidArgument, "documents is empty").await;
    expect(kb.upsert(up("faq", vec![doc("", "no id", "x")])).await, Code::InvalidArgument, "no id").await;
    expect(kb.upsert(up("faq", vec![doc("blank", "  ", "x")])).await, Code::InvalidArgument, "neither text nor a vector").await;
    let nan = pb::Document { id: "nan".into(), vector: vec![f32::NAN; 384], ..Default::default() };
    expect(kb.upsert(up("faq", vec![nan])).await, Code::InvalidArgument, "NaN").await;
    expect(kb.upsert(up("small", vec![doc("t", "text needs the tower", "x")])).await, Code::InvalidArgument, "send a vector").await;
    expect(kb.upsert(up("nope", vec![doc("t", "text", "x")])).await, Code::NotFound, "does not exist").await;
    let long = doc("long", &"word ".repeat(400), "x");
    expect(kb.upsert(up("faq", vec![long])).await, Code::InvalidArgument, "limit is 256").await;
    let many = (0..1001).map(|i| pb::Document { id: format!("m{i}"), vector: vec![1.0; 384], ..Default::default() }).collect();
    expect(kb.upsert(up("faq", many)).await, Code::InvalidArgument, "--kb-max-upsert-documents").await;
    expect(kb.delete(pb::DeleteRequest { collection: "faq".into(), ids: vec![] }).await, Code::InvalidArgument, "ids is empty").await;

    let info = kb.get_collection(pb::GetCollectionRequest { name: "faq".into() }).await.unwrap().into_inner();
    assert_eq!(info.documents, 5, "no refused upsert wrote anything");
    let got = kb.get(pb::GetRequest { collection: "faq".into(), ids: vec!["new-1".into(), "returns".into()], with_vectors: false }).await.unwrap().into_inner();
    assert_eq!(got.missing, ["new-1"]);
    running.shutdown().await.unwrap();
}

/// Separate towers: a query tower and a document tower from their own checkpoints (here the
/// same tiny sentence-transformers model with a Dense 32→16 projection, on their own lanes).
/// Collections default to the document tower's dimension, and text search goes through the
/// query tower.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn towers_from_their_own_checkpoints() {
    let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/tiny-st-dense");
    let q = format!("--query-model-dir={}", tiny.display());
    let d = format!("--document-model-dir={}", tiny.display());
    let running = serve(&[&q, &d]).await;
    assert!(!std::sync::Arc::ptr_eq(&running.state.query_tower, &running.state.text));
    let mut kb = kb_client(&running).await;
    let info = kb.create_collection(pb::CreateCollectionRequest { name: "t".into(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(info.dimension, 16, "the document tower's projection sets the dimension");
    assert!(info.embedder.starts_with("tiny-st-dense@"), "{}", info.embedder);
    let documents = vec![doc("a", "the cat sat on the mat", "x"), doc("b", "a completely different sentence about shipping", "x")];
    let up = kb.upsert(pb::UpsertRequest { collection: "t".into(), documents, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(up.model.unwrap().id, "tiny-st-dense");
    let hits = kb.search(search("t", "the cat sat on the mat")).await.unwrap().into_inner();
    assert_eq!(hits.model.unwrap().id, "tiny-st-dense");
    assert_eq!(hits.hits[0].id, "a");
    assert!((hits.hits[0].score - 1.0).abs() < 1e-5, "same text, same towers: cosine 1, got {}", hits.hits[0].score);
    // The text model (384) is still what EmbedText serves.
    assert_eq!(running.state.registry.snapshot().slots.text.active.as_ref().unwrap().dimension, 384);
    running.shutdown().await.unwrap();
}
