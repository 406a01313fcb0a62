//! The image encoder as served: checkpoint resolution (folder and Hub cache), the moderation
//! head found by its label, batched embedding against the bare ResNet, normalisation, and the
//! full decode + preprocess path on an encoded image.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use concierge_models::imageproc::{self, ImageLimits};
use concierge_models::{ImageEncoder, ModelSource, ResNet};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A copy of a fixture folder with `config.json` edited by `edit`.
fn copy_with(name: &str, tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("concierge-image-encoder-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture(name).join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    dir
}

fn input(seed: u64, len: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

#[test]
fn embeds_a_batch_like_the_bare_network_and_scores_the_unsafe_class() {
    let labels: Vec<String> = (0..10).map(|i| if i == 3 { "NSFW".into() } else { format!("class{i}") }).collect();
    let dir = copy_with("resnet18-tiny", "labels", |c| c["labels"] = serde_json::json!(labels));
    let dev = Device::Cpu;
    let enc = ImageEncoder::load(&ModelSource::Dir(dir.clone()), &dev, DType::F32).unwrap();
    assert!(enc.has_moderation());
    assert_eq!(enc.info().dimension, 64);
    assert!(enc.info().version.starts_with("sha256:"), "{}", enc.info().version);
    assert_eq!(enc.input_len(), 3 * 64 * 64);

    let images: Vec<Vec<f32>> = (0..3).map(|s| input(s, enc.input_len())).collect();
    let refs: Vec<&[f32]> = images.iter().map(Vec::as_slice).collect();
    let out = enc.embed(&refs, &[false, true, false]).unwrap();

    let net = ResNet::from_dir(&dir, &dev, DType::F32).unwrap();
    let x = Tensor::from_vec(images.concat(), (3, 3, 64, 64), &dev).unwrap();
    let want = net.forward(&x).unwrap();
    let pooled: Vec<Vec<f32>> = want.pooled.to_vec2().unwrap();
    let probs: Vec<Vec<f32>> =
        candle_nn::ops::softmax(want.logits.as_ref().unwrap(), D::Minus1).unwrap().to_vec2().unwrap();
    for i in 0..3 {
        let norm = pooled[i].iter().map(|v| v * v).sum::<f32>().sqrt();
        let expect: Vec<f32> = if i == 1 { pooled[i].iter().map(|v| v / norm).collect() } else { pooled[i].clone() };
        let err = out[i].vector.iter().zip(&expect).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(err < 1e-5, "image {i}: vector off by {err}");
        let score = out[i].unsafe_score.unwrap();
        assert!((score - probs[i][3]).abs() < 1e-6, "image {i}: {score} vs {}", probs[i][3]);
    }
    // Batching does not change an image's answer.
    let alone = enc.embed(&refs[2..3], &[false]).unwrap();
    let err = alone[0].vector.iter().zip(&out[2].vector).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(err < 1e-5, "batched vs alone: {err}");
    // A wrongly sized input is refused, not reshaped.
    let short = vec![0.0f32; 10];
    let err = enc.embed(&[&short], &[false]).unwrap_err().to_string();
    assert!(err.contains("10 floats") && err.contains("12288"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn no_moderation_without_an_unsafe_label_and_label_count_is_checked() {
    let dev = Device::Cpu;
    let plain = ImageEncoder::load(&ModelSource::Dir(fixture("resnet18-tiny")), &dev, DType::F32).unwrap();
    assert!(!plain.has_moderation());
    let one = input(1, plain.input_len());
    assert_eq!(plain.embed(&[&one], &[true]).unwrap()[0].unsafe_score, None);

    let hf = copy_with("resnet18-tiny", "id2label", |c| c["id2label"] = serde_json::json!({"0": "safe", "7": "unsafe"}));
    assert!(ImageEncoder::load(&ModelSource::Dir(hf.clone()), &dev, DType::F32).unwrap().has_moderation());
    let bad = copy_with("resnet18-tiny", "badlabels", |c| c["labels"] = serde_json::json!(["safe", "unsafe"]));
    let err = ImageEncoder::load(&ModelSource::Dir(bad.clone()), &dev, DType::F32).err().unwrap().to_string();
    assert!(err.contains("2 labels for a head of 10 classes"), "{err}");
    let missing = ImageEncoder::load(&ModelSource::Dir(fixture("no-such-model")), &dev, DType::F32).err().unwrap();
    assert!(missing.to_string().contains("no-such-model"), "{missing}");
    for d in [hf, bad] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn decodes_and_preprocesses_an_encoded_photo_to_the_models_input() {
    let dev = Device::Cpu;
    let enc = ImageEncoder::load(&ModelSource::Dir(fixture("resnet18-tiny")), &dev, DType::F32).unwrap();
    let bytes = std::fs::read(fixture("images/cmyk.jpg")).unwrap();
    let prepared = enc.prepare(0, &bytes, &ImageLimits::default()).unwrap();
    assert_eq!(prepared.len(), enc.input_len());
    let img = imageproc::decode(0, &bytes, &ImageLimits::default()).unwrap();
    assert_eq!(prepared, imageproc::preprocess(&img, enc.preprocessing()));
    let out = enc.embed(&[&prepared], &[true]).unwrap();
    let norm = out[0].vector.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
    let err = enc.prepare(4, b"not an image", &ImageLimits::default()).unwrap_err().to_string();
    assert!(err.starts_with("image 4"), "{err}");
}
