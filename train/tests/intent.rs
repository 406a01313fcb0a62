//! Tiny real intent training runs.
//!
//! - Banking77 (from ../shared/data, when present): 12 intents, the top encoder layer
//!   fine-tuned for 2 epochs; the dev accuracy must be high, the saved checkpoint must
//!   reproduce the trained model through the serving path, and eval-intent must agree.
//! - Fusion on a constructed task with real photographs (the nine photos set-up fetches for the
//!   image tests): a shopper's message is one of a few generic questions picked at random ("can
//!   I return this?"), and the label is the department of the photographed item, so the text
//!   says nothing about the label. Held-out crops of the same photos are the dev set. A text-only
//!   model cannot beat chance there; the fused model must get nearly all of them right. What it
//!   proves: gradients reach the fusion block and the head learns to read image regions through
//!   it. What it does not: nine photos are nine items, so this is crop-invariant recognition of
//!   seen items, not a product-recognition benchmark.
//!
//! Each skips, saying so, when its data or models are missing.
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Parser;
use concierge_train::intent::{eval, train, DataFormat, EvalIntent, Targets, TrainIntent};
use concierge_train::rng::Rng;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    args: TrainIntent,
}

fn args(extra: &[String]) -> TrainIntent {
    let mut argv = vec!["train-intent".to_string(), "--quiet".into()];
    argv.extend(extra.iter().cloned());
    Wrap::parse_from(argv).args
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("concierge-train-intent-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn banking77_subset_learns_and_the_checkpoint_serves_the_same() {
    let data = repo("../shared/data/banking77/train.csv");
    let encoder = repo("model-store/all-MiniLM-L6-v2");
    if !data.is_file() || !encoder.is_dir() {
        eprintln!("SKIPPED: {} or {} missing (Banking77 comes with ../shared; the encoder from scripts/fetch-default-model.sh)", data.display(), encoder.display());
        return;
    }
    // 12 intents, written as a CSV the Banking77 reader takes.
    let dir = tmp("b77");
    let keep = [
        "card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed", "pin_blocked", "refund_not_showing_up",
        "cash_withdrawal_charge", "change_pin", "country_support", "declined_card_payment", "get_physical_card", "terminate_account",
    ];
    let all = concierge_train::intent::read_banking77(&data).unwrap();
    let subset: Vec<_> = all.into_iter().filter(|e| keep.contains(&e.label.as_str())).collect();
    assert!(subset.len() > 1000, "expected the Banking77 intents, got {}", subset.len());
    let csv = dir.join("subset.csv");
    let mut f = std::fs::File::create(&csv).unwrap();
    writeln!(f, "text,category").unwrap();
    for e in &subset {
        writeln!(f, "\"{}\",{}", e.text.replace('"', "\"\""), e.label).unwrap();
    }
    drop(f);
    let out = dir.join("model");
    let outcome = train(&args(&[
        "--format=banking77".into(), format!("--train={}", csv.display()), format!("--encoder-dir={}", encoder.display()),
        format!("--out={}", out.display()), "--train-layers=1".into(), "--epochs=2".into(), "--seed=3".into(),
    ]))
    .unwrap();
    eprintln!("banking77 subset: {}", outcome.dev);
    assert!(outcome.dev.accuracy > 0.9, "dev accuracy {}", outcome.dev.accuracy);
    assert!(outcome.served_vs_trained_max_diff < 1e-4, "served vs trained: {}", outcome.served_vs_trained_max_diff);
    // Calibrated: the answers kept (not handed off) are right at least --target-precision of the time.
    assert!(outcome.dev.answered_precision >= 0.97, "{}", outcome.dev);
    // eval-intent (the serving path) on the training subset itself: nearly all right.
    let scores = eval(&EvalIntent {
        model: out.clone(),
        format: DataFormat::Banking77,
        data: csv.clone(),
        split: "test".into(),
        encoder_dir: encoder.clone(),
        image_model_dir: repo("model-store/open-nsfw"),
        threshold: None,
        limit: Some(300),
        calibrate: false,
        targets: Targets { precision: 0.97, oos_recall: 0.8 },
    })
    .unwrap();
    assert!(scores.accuracy > 0.9, "{scores}");
    std::fs::remove_dir_all(&dir).ok();
}

/// MPNet's top layer fine-tuned (models/tests/fixtures/mpnet-tiny: a tiny random MPNet with a
/// WordPiece tokenizer over its 50 ids, made by scripts/make_mpnet_fixture.py): the label is
/// which keyword a message holds. The trained model (padded batches, the relative bias added
/// to the mask) and the saved checkpoint as served (the shared encoder's packed pass to layer 1,
/// then the branch's layer through the fused kernel with the bias) must give the same
/// probabilities, in f32 within 1e-5; the checkpoint carries the encoder's relative bias.
/// Accuracy is not asserted: the random 32-wide encoder's states barely separate the keywords
/// (a linear head over them reaches about 50% here, against 100% over all-MiniLM-L6-v2's on the
/// same file); that MPNet fine-tuning learns is measured on CLINC150 (benches/RESULTS.md).
#[test]
fn an_mpnet_branch_serves_as_trained() {
    let encoder = repo("models/tests/fixtures/mpnet-tiny");
    let dir = tmp("mpnet");
    let filler = ["where", "is", "my", "order", "please", "the", "how", "do", "i", "this", "it", "can", "a", "with", "to"];
    let labels = [("refund", ["refund", "return"]), ("shipping", ["shipping", "parcel"]), ("greeting", ["hello", "thanks"])];
    let mut rng = Rng::new(5);
    let mut below = |n: usize| (rng.next_u64() % n as u64) as usize;
    let jsonl = dir.join("train.jsonl");
    let mut f = std::fs::File::create(&jsonl).unwrap();
    for i in 0..150 {
        let (label, keys) = labels[i % 3];
        let n = 1 + below(3);
        let mut words: Vec<&str> = (0..n).map(|_| filler[below(filler.len())]).collect();
        let at = below(words.len() + 1);
        words.insert(at, keys[below(2)]);
        writeln!(f, "{}", serde_json::json!({ "text": words.join(" "), "label": label })).unwrap();
    }
    drop(f);
    let out = dir.join("model");
    let outcome = train(&args(&[
        "--format=jsonl".into(), format!("--train={}", jsonl.display()), format!("--encoder-dir={}", encoder.display()),
        format!("--out={}", out.display()), "--train-layers=1".into(), "--epochs=3".into(), "--seed=3".into(),
        "--branch-f32".into(), "--lr=1e-4".into(), "--head-lr=3e-3".into(), "--dev-fraction=0.2".into(),
    ]))
    .unwrap();
    eprintln!("mpnet-tiny: {}", outcome.dev);
    assert!(outcome.served_vs_trained_max_diff < 1e-5, "served vs trained: {}", outcome.served_vs_trained_max_diff);
    let saved = candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let bias = &saved["encoder.relative_attention_bias.weight"];
    let source = candle_core::safetensors::load(encoder.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let diff = (bias - &source["encoder.relative_attention_bias.weight"]).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "the branch keeps the encoder's relative bias");
    assert!(saved.contains_key("encoder.layer.1.attention.attn.q.weight"), "MPNet's names");
    std::fs::remove_dir_all(&dir).ok();
}

/// Departments of the nine set-up photos (what the item in the photo is filed under).
const PHOTOS: [(&str, &str); 9] = [
    ("astronaut.png", "apparel"),
    ("camera.png", "cameras"),
    ("chelsea.png", "pets"),
    ("china.jpg", "travel"),
    ("coffee.png", "kitchen"),
    ("flower.jpg", "garden"),
    ("logo.png", "stationery"),
    ("motorcycle_left.png", "vehicles"),
    ("rocket.jpg", "toys"),
];

const QUESTIONS: [&str; 6] = [
    "can I return this?",
    "is this still in stock?",
    "how much does this one cost?",
    "do you ship this abroad?",
    "what is this item?",
    "I want to order this",
];

/// Random crops (60–95% of each side), sometimes mirrored, saved as JPEG; a JSONL row per crop
/// with a question picked independently of the photo.
fn photo_task(photos: &Path, dir: &Path, per_photo: usize, seed: u64, with_images: bool) -> PathBuf {
    let mut rng = Rng::new(seed);
    let jsonl = dir.join(format!("task-{seed}-{}.jsonl", if with_images { "fused" } else { "text" }));
    let mut f = std::fs::File::create(&jsonl).unwrap();
    for (file, label) in PHOTOS {
        let img = image::open(photos.join(file)).unwrap().to_rgb8();
        let (w, h) = img.dimensions();
        for k in 0..per_photo {
            let (cw, ch) = ((w as f32 * (0.6 + 0.35 * rng.uniform())) as u32, (h as f32 * (0.6 + 0.35 * rng.uniform())) as u32);
            let (x, y) = ((rng.uniform() * (w - cw) as f32) as u32, (rng.uniform() * (h - ch) as f32) as u32);
            let mut crop = image::imageops::crop_imm(&img, x, y, cw, ch).to_image();
            if rng.uniform() < 0.5 {
                crop = image::imageops::flip_horizontal(&crop);
            }
            let name = format!("{seed}-{label}-{k}.jpg");
            if with_images {
                crop.save(dir.join(&name)).unwrap();
            }
            let q = QUESTIONS[(rng.next_u64() % QUESTIONS.len() as u64) as usize];
            let images: Vec<String> = if with_images { vec![name] } else { vec![] };
            writeln!(f, "{}", serde_json::json!({"text": q, "label": label, "images": images})).unwrap();
        }
    }
    jsonl
}

#[test]
fn fusion_learns_labels_only_the_photo_tells() {
    let photos = repo("model-store/open-nsfw-reference/images");
    let (encoder, image_model) = (repo("model-store/all-MiniLM-L6-v2"), repo("model-store/open-nsfw"));
    if !photos.join("chelsea.png").is_file() || !image_model.join("model.safetensors").is_file() || !encoder.is_dir() {
        eprintln!("SKIPPED: the photos, the image model or the text encoder are missing; run scripts/fetch-default-model.sh");
        return;
    }
    let dir = tmp("photos");
    let run = |with_images: bool, name: &str| {
        let train_file = photo_task(&photos, &dir, 8, 1, with_images);
        let dev_file = photo_task(&photos, &dir, 4, 2, with_images);
        train(&args(&[
            "--format=jsonl".into(), format!("--train={}", train_file.display()), format!("--dev={}", dev_file.display()),
            format!("--encoder-dir={}", encoder.display()), format!("--image-model-dir={}", image_model.display()),
            format!("--out={}", dir.join(name).display()), "--train-layers=0".into(), "--epochs=8".into(),
            "--batch=8".into(), "--lr=1e-3".into(), "--head-lr=3e-3".into(), "--fusion-ffn=256".into(), "--seed=9".into(),
        ]))
        .unwrap()
    };
    let text_only = run(false, "text-only");
    let fused = run(true, "fused");
    eprintln!("photo task, text only: {}\nphoto task, fused: {}", text_only.dev, fused.dev);
    // 9 departments: chance is 1/9; the questions carry no information.
    assert!(text_only.dev.accuracy < 0.3, "text alone should not beat chance: {}", text_only.dev);
    assert!(fused.dev.accuracy >= 0.9, "fused accuracy {}", fused.dev);
    assert!(fused.served_vs_trained_max_diff < 1e-4, "served vs trained: {}", fused.served_vs_trained_max_diff);
    std::fs::remove_dir_all(&dir).ok();
}
