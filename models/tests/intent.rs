//! Intent heads: a Hugging Face `BertForSequenceClassification` checkpoint loads as it is and
//! gives PyTorch's logits (fixture from scripts/make_intent_fixture.py: a tiny random BERT with
//! 2 layers, hidden 32, 4 labels, run by transformers in float64). Tolerance: logits and the
//! pooled vector within 1e-4 absolute (measured ~1e-6); the tokenizer gives the same ids.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use concierge_models::intent::{IntentFormat, IntentModel};
use concierge_models::{ModelSource, TextEncoder};
use serde::Deserialize;

const TOL: f32 = 1e-4;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bert-seqcls")
}

#[derive(Deserialize)]
struct Reference {
    text: String,
    ids: Vec<u32>,
    logits: Vec<f32>,
    probs: Vec<f32>,
}

fn references() -> Vec<Reference> {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap()).unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn hf_sequence_classification_matches_transformers() {
    let dev = Device::Cpu;
    assert_eq!(IntentModel::detect(&fixture()), Some(IntentFormat::HfSequenceClassification));
    let encoder = TextEncoder::load(&ModelSource::Dir(fixture()), &dev, DType::F32, None).unwrap();
    let model = IntentModel::load(&fixture(), &dev).unwrap();
    assert_eq!(model.labels(), ["card_arrival", "lost_or_stolen_card", "exchange_rate", "oos"]);
    assert_eq!(model.config().out_of_scope_labels, ["oos"]);
    assert_eq!(model.tap(), None);

    let refs = references();
    let tokens: Vec<_> = refs.iter().enumerate().map(|(i, r)| encoder.tokenize(i, &r.text, false).unwrap()).collect();
    for (t, r) in tokens.iter().zip(&refs) {
        assert_eq!(t.ids, r.ids, "token ids of {:?}", r.text);
    }
    // One packed batch of all four: padding-free batching must not change any answer.
    let batch: Vec<_> = tokens.iter().collect();
    let states = encoder.token_states(&batch).unwrap();
    let logits = model.logits(&states.hidden, &states.lens, &[]).unwrap();
    let got: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    let mut worst = 0f32;
    for (g, r) in got.iter().zip(&refs) {
        worst = worst.max(max_abs(g, &r.logits));
    }
    assert!(worst < TOL, "logits differ from transformers by {worst}");

    let results = model.classify(&logits, 2, None).unwrap();
    for (res, r) in results.iter().zip(&refs) {
        assert_eq!(res.intents.len(), 2);
        let best = r.probs.iter().enumerate().fold((0, f32::MIN), |a, (i, &p)| if p > a.1 { (i, p) } else { a });
        assert_eq!(res.intents[0].label, model.labels()[best.0]);
        assert!((res.intents[0].score - best.1).abs() < TOL);
        assert!(res.intents[0].score >= res.intents[1].score);
        // An HF checkpoint carries no calibration: the default 0.5 applies.
        assert_eq!(res.handoff, best.1 < 0.5 || model.labels()[best.0] == "oos");
    }
    // A per-request threshold above every score hands everything off.
    assert!(model.classify(&logits, 0, Some(1.01)).unwrap().iter().all(|r| r.handoff && r.intents.len() == 4));
}

#[test]
fn text_only_model_refuses_images_and_bad_folders_say_what_is_missing() {
    let dev = Device::Cpu;
    let model = IntentModel::load(&fixture(), &dev).unwrap();
    let encoder = TextEncoder::load(&ModelSource::Dir(fixture()), &dev, DType::F32, None).unwrap();
    let t = encoder.tokenize(0, "i lost my card", false).unwrap();
    let states = encoder.token_states(&[&t]).unwrap();
    let img = candle_core::Tensor::zeros((4, 8), DType::F32, &dev).unwrap();
    let err = model.logits(&states.hidden, &states.lens, &[Some(img)]).unwrap_err().to_string();
    assert!(err.contains("no fusion block"), "{err}");

    let empty = std::env::temp_dir().join(format!("concierge-intent-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let err = IntentModel::load(&empty, &dev).err().expect("an empty folder is not a checkpoint").to_string();
    assert!(err.contains("intent_config.json") && err.contains("BertForSequenceClassification"), "{err}");
    std::fs::remove_dir_all(&empty).ok();
}
