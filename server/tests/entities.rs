//! `Entities/Extract` end to end: the committed English tagger (ATIS slots over the default text
//! model's states) finds the right spans in held-aside queries, offsets are exact code point and
//! byte ranges on tricky text, bad input gets clear statuses, a character-level tagger is routed
//! to its own lane, the committed Chinese tagger serves one flag away, and one encoder pass
//! serves embeddings and entities together.
mod common;

use concierge_proto::v1::entities_client::EntitiesClient;
use concierge_proto::v1::{ExtractRequest, ExtractResponse};
use tonic::Code;

fn request(texts: &[&str]) -> ExtractRequest {
    ExtractRequest { texts: texts.iter().map(|s| s.to_string()).collect(), truncate: None }
}

async fn extract(client: &mut EntitiesClient<tonic::transport::Channel>, texts: &[&str]) -> ExtractResponse {
    client.extract(request(texts)).await.unwrap().into_inner()
}

/// Every entity's offsets select exactly its text, in code points and in bytes.
fn check_offsets(texts: &[&str], resp: &ExtractResponse) {
    assert_eq!(resp.results.len(), texts.len());
    for (text, r) in texts.iter().zip(&resp.results) {
        for e in &r.entities {
            let by_chars: String = text.chars().skip(e.start as usize).take((e.end - e.start) as usize).collect();
            assert_eq!(by_chars, e.text, "{text:?}: code point offsets {}..{}", e.start, e.end);
            assert_eq!(&text[e.byte_start as usize..e.byte_end as usize], e.text, "{text:?}: byte offsets");
            assert!(e.confidence > 0.0 && e.confidence <= 1.0 + 1e-6, "{text:?}: confidence {}", e.confidence);
        }
    }
}

fn labels(r: &concierge_proto::v1::TextEntities) -> Vec<(String, String)> {
    r.entities.iter().map(|e| (e.label.clone(), e.text.clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_tagger_finds_the_slots_of_real_queries() {
    let running = common::serve(&[]).await;
    let mut client = EntitiesClient::connect(format!("http://{}", running.grpc_addr)).await.unwrap();
    // Written for this test, in ATIS's domain (not taken from its files).
    let texts = [
        "show me flights from boston to denver on monday",
        "I need a cheap flight from Pittsburgh to Atlanta tomorrow morning",
        "what is the fare from dallas to san francisco",
    ];
    let resp = extract(&mut client, &texts).await;
    check_offsets(&texts, &resp);
    let want: [&[(&str, &str)]; 3] = [
        &[("fromloc.city_name", "boston"), ("toloc.city_name", "denver"), ("depart_date.day_name", "monday")],
        &[("fromloc.city_name", "Pittsburgh"), ("toloc.city_name", "Atlanta")],
        &[("fromloc.city_name", "dallas"), ("toloc.city_name", "san francisco")],
    ];
    for (i, w) in want.iter().enumerate() {
        let got = labels(&resp.results[i]);
        for (label, text) in w.iter() {
            assert!(got.iter().any(|(l, t)| l == label && t == text), "{:?}: no {label} {text:?} in {got:?}", texts[i]);
        }
    }
    assert_eq!(resp.model.unwrap().id, "entities-en-atis");

    // Offsets stay exact around accents, CJK and emoji before and inside the text.
    let tricky = ["😀😀 flights from Zürich to boston", "café ☕ — flights from new york to miami 🛫", "  boston  "];
    let resp = extract(&mut client, &tricky).await;
    check_offsets(&tricky, &resp);
    let got = labels(&resp.results[0]);
    assert!(got.iter().any(|(l, t)| l == "toloc.city_name" && t == "boston"), "{got:?}");
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_statuses() {
    let running = common::serve(&["--max-client-batch-size=4"]).await;
    let mut client = EntitiesClient::connect(format!("http://{}", running.grpc_addr)).await.unwrap();
    let long = "boston ".repeat(400);
    for (what, req, code, needle) in [
        ("empty list", request(&[]), Code::InvalidArgument, "texts is empty"),
        ("empty text", request(&["flights to boston", " "]), Code::InvalidArgument, "text 1 is empty"),
        ("too many", request(&["a"; 5]), Code::InvalidArgument, "limit is 4"),
        ("over-long", request(&["ok", &long]), Code::InvalidArgument, "input 1 has"),
    ] {
        let err = client.extract(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(err.message().contains(needle), "{what}: {:?} lacks {needle:?}", err.message());
    }
    // truncate=true tags the first part instead.
    let resp = client.extract(ExtractRequest { texts: vec![long.clone()], truncate: Some(true) }).await.unwrap().into_inner();
    check_offsets(&[&long], &resp);
    running.shutdown().await.unwrap();

    let running = common::serve(&["--no-entity-model"]).await;
    let mut client = EntitiesClient::connect(format!("http://{}", running.grpc_addr)).await.unwrap();
    let err = client.extract(request(&["flights to boston"])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    running.shutdown().await.unwrap();
}

/// Calls that arrive while the models are still loading (the server answers from its first
/// moment) are told to retry: UNAVAILABLE, "still loading", never UNIMPLEMENTED as if the server
/// had been started without a tagger. Then the same call answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_during_start_up_is_told_to_retry() {
    let running = concierge_server::start(common::config(&[])).await.expect("server starts");
    let mut client = EntitiesClient::connect(format!("http://{}", running.grpc_addr)).await.unwrap();
    let t0 = std::time::Instant::now();
    let mut retries = 0;
    loop {
        match client.extract(request(&["flights to boston"])).await {
            Ok(resp) => {
                assert_eq!(labels(&resp.into_inner().results[0]), [("toloc.city_name".to_string(), "boston".to_string())]);
                break;
            }
            Err(err) => {
                assert_eq!(err.code(), Code::Unavailable, "{err:?}");
                assert!(err.message().contains("still loading"), "{}", err.message());
                retries += 1;
            }
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(60), "still no answer after {retries} retries");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    eprintln!("answered after {retries} retries");
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_character_tagger_runs_on_its_own_lane_with_exact_offsets() {
    // The models crate's tiny random character taggers (characters alone, with character
    // bigrams, and with bigrams and lexicon features): what they find is noise, but routing,
    // batching and offsets are real.
    for name in ["tagger-chars-tiny", "tagger-bigram-tiny", "tagger-lexicon-tiny"] {
        let dir = common::repo_path(&format!("models/tests/fixtures/{name}"));
        let running = common::serve(&[&format!("--entity-model-dir={}", dir.display())]).await;
        let mut client = EntitiesClient::connect(format!("http://{}", running.grpc_addr)).await.unwrap();
        let texts = ["北京烤鸭很好吃", "我在上海买了一件蓝色的外套😀", "ok"];
        let resp = extract(&mut client, &texts).await;
        check_offsets(&texts, &resp);
        assert_eq!(resp.model.unwrap().id, name);
        let (_, metrics) = common::http_get(running.metrics_addr, "/metrics").await;
        assert!(common::sample(&metrics, "concierge_batch_size_count{lane=\"entities\"}") >= 1.0, "{metrics}");
        let long: String = "北".repeat(1001);
        let err = client.extract(request(&[&long])).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("1001 characters"), "{}", err.message());
        running.shutdown().await.unwrap();
    }
}

/// The committed Chinese tagger (`checkpoints/entities-zh-msra`: characters, LAC, the lexicon
/// and m3e-small's states) served the way the README says, one flag away: whole spans in
/// sentences written for this test, exact offsets around emoji and full-width text, and a text
/// of the longest length allowed (1,000 characters), which the BERT reads in windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committed_chinese_tagger_serves_people_places_and_organisations() {
    let dir = common::repo_path("checkpoints/entities-zh-msra");
    let running = common::serve(&[&format!("--entity-model-dir={}", dir.display())]).await;
    let mut client = EntitiesClient::connect(format!("http://{}", running.grpc_addr)).await.unwrap();
    let long: String = "她毕业于北京大学，现在在联合国工作。".repeat(56).chars().take(1000).collect();
    // A name list run together without separators, as news text writes it: one span a name.
    let names = "出席会议的有江泽民李鹏乔石朱镕基等领导同志。";
    let texts = ["她毕业于北京大学，现在在联合国工作。", "😀我明天要去上海出差，ＯＫ？", "邓小平是四川人。", long.as_str(), names];
    let resp = extract(&mut client, &texts).await;
    check_offsets(&texts, &resp);
    let want: [(usize, &[(&str, &str, u32)]); 4] = [
        (0, &[("ORG", "北京大学", 4), ("ORG", "联合国", 12)]),
        (1, &[("LOC", "上海", 6)]),
        (2, &[("PER", "邓小平", 0), ("LOC", "四川", 4)]),
        (4, &[("PER", "江泽民", 6), ("PER", "李鹏", 9), ("PER", "乔石", 11), ("PER", "朱镕基", 13)]),
    ];
    for (i, w) in want {
        let got: Vec<(String, String, u32)> = resp.results[i].entities.iter().map(|e| (e.label.clone(), e.text.clone(), e.start)).collect();
        for (label, text, start) in w.iter() {
            assert!(got.iter().any(|(l, t, s)| l == label && t == text && s == start), "{:?}: no {label} {text:?} at {start} in {got:?}", texts[i]);
        }
    }
    // The long text repeats the first sentence: its universities are found past the BERT's
    // first 510-character window too.
    let far = resp.results[3].entities.iter().filter(|e| e.text == "北京大学" && e.start > 510).count();
    assert!(far >= 20, "{far} of the long text's later universities found");
    assert_eq!(resp.model.unwrap().id, "entities-zh-msra");
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_encoder_pass_serves_embeddings_and_entities() {
    use concierge_engine::Backend;
    use concierge_server::text::{Tasks, TextInput, TextModel};
    let dev = candle_core::Device::Cpu;
    let src = concierge_models::ModelSource::Dir(common::model_dir());
    let encoder = concierge_models::TextEncoder::load(&src, &dev, candle_core::DType::F32, None).unwrap();
    let tagger = concierge_models::BiLstmCrf::load(&common::repo_path("checkpoints/entities-en-atis"), &dev, candle_core::DType::F32).unwrap();
    let encoder = concierge_server::registry::Version::wrap("test", "test", 0, encoder);
    let tagger = concierge_server::registry::Version::wrap("tagger", "tagger", 0, concierge_server::registry::Tagger { model: tagger, reads: None });
    let model = TextModel { encoder, tagger: Some(tagger), intent: None };
    let texts = ["flights from boston to denver", "where is my parcel", "fare from dallas to miami"];
    let input = |i: usize, tasks| TextInput { tokens: model.encoder.tokenize(i, texts[i], false).unwrap(), normalize: true, tasks, images: Vec::new() };
    let both = Tasks { embed: true, entities: true, intent: false };
    let batch = [input(0, both), input(1, Tasks::EMBED), input(2, Tasks::ENTITIES)];
    let out = model.run(&batch.iter().collect::<Vec<_>>()).unwrap();
    assert!(out[0].embedding.is_some() && out[0].entities.is_some());
    assert!(out[1].embedding.is_some() && out[1].entities.is_none());
    assert!(out[2].embedding.is_none() && out[2].entities.is_some());
    // Each answer equals what the input alone asking for one thing gets.
    let alone_vec = model.run(&[&input(0, Tasks::EMBED)]).unwrap().remove(0).embedding.unwrap();
    let err = alone_vec.iter().zip(out[0].embedding.as_ref().unwrap()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(err < 1e-5, "{err}");
    let alone_ents = model.run(&[&input(2, Tasks::ENTITIES)]).unwrap().remove(0).entities.unwrap();
    assert_eq!(alone_ents.iter().map(|e| (&e.label, e.start, e.end)).collect::<Vec<_>>(),
        out[2].entities.as_ref().unwrap().iter().map(|e| (&e.label, e.start, e.end)).collect::<Vec<_>>());
    assert!(!alone_ents.is_empty(), "the tagger found nothing in {:?}", texts[2]);
}
