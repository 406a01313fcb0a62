//! sentence-transformers Dense and Normalize modules, against a tiny random model made by
//! scripts/make_dense_fixture.py (BERT 32 wide, mean pooling, Dense 32 -> 16 with Tanh,
//! Normalize). Tolerance: every component within 1e-5 absolute of sentence-transformers'
//! output, both before Normalize and after it; the measured worst case is printed.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use concierge_models::{ModelError, ModelSource, TextEncoder};
use serde_json::Value;

const TOLERANCE: f32 = 1e-5;
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-st-dense");

fn fixture() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny_st_dense.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

fn load(dir: &Path) -> Result<TextEncoder, ModelError> {
    TextEncoder::load(&ModelSource::Dir(dir.to_owned()), &Device::Cpu, DType::F32, None)
}

/// Checks an encoder against the fixture; returns the worst absolute error seen.
fn check_against_fixture(enc: &TextEncoder) -> f32 {
    let fx = fixture();
    assert_eq!(enc.info().dimension, 16);
    assert_eq!(enc.info().dimension as u64, fx["dimension"].as_u64().unwrap());
    assert!(enc.normalizes(), "the checkpoint ends with Normalize");
    let rows = fx["sentences"].as_array().unwrap();
    let toks: Vec<_> = rows.iter().enumerate().map(|(i, r)| enc.tokenize(i, r["text"].as_str().unwrap(), false).unwrap()).collect();
    for (t, r) in toks.iter().zip(rows) {
        let want: Vec<u32> = r["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(t.ids, want, "token ids of {:?}", r["text"]);
    }
    let refs: Vec<_> = toks.iter().collect();
    let unit = enc.embed(&refs, &vec![true; refs.len()]).unwrap();
    let raw = enc.embed(&refs, &vec![false; refs.len()]).unwrap();
    let mut worst = 0f32;
    for (i, r) in rows.iter().enumerate() {
        let alone = enc.embed(&[&toks[i]], &[true]).unwrap().remove(0);
        for (what, got, want) in [
            ("normalised, batched", &unit[i], floats(&r["embedding"])),
            ("normalised, alone", &alone, floats(&r["embedding"])),
            ("before Normalize", &raw[i], floats(&r["dense"])),
        ] {
            let err = max_abs(got, &want);
            assert!(err <= TOLERANCE, "{what}: sentence {i} {:?}: max abs error {err}", r["text"]);
            worst = worst.max(err);
        }
    }
    worst
}

#[test]
fn dense_and_normalize_match_sentence_transformers() {
    let enc = load(Path::new(FIXTURE)).unwrap();
    assert_eq!(enc.info().max_input_tokens, fixture()["max_seq_length"].as_u64().unwrap() as usize);
    let worst = check_against_fixture(&enc);
    println!("tiny-st-dense: worst max abs error {worst:e} (tolerance {TOLERANCE:e})");
}

/// A copy of the fixture in a fresh temporary folder, to edit.
fn copy_fixture(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("concierge-dense-{tag}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    copy_dir(Path::new(FIXTURE), &dir);
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn classic_module_names_and_pooling_config_give_the_same_vectors() {
    // sentence-transformers before 6 (most checkpoints on the Hub) writes these forms.
    let dir = copy_fixture("classic");
    edit_json(&dir.join("modules.json"), |v| {
        for (m, class) in v.as_array_mut().unwrap().iter_mut().zip(["Transformer", "Pooling", "Dense", "Normalize"]) {
            m["type"] = format!("sentence_transformers.models.{class}").into();
        }
    });
    std::fs::write(
        dir.join("1_Pooling/config.json"),
        r#"{"word_embedding_dimension": 32, "pooling_mode_cls_token": false, "pooling_mode_mean_tokens": true,
            "pooling_mode_max_tokens": false, "pooling_mode_mean_sqrt_len_tokens": false}"#,
    )
    .unwrap();
    edit_json(&dir.join("2_Dense/config.json"), |v| {
        let o = v.as_object_mut().unwrap();
        o.remove("module_input_name");
        o.remove("module_output_name");
    });
    check_against_fixture(&load(&dir).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unsupported_activation_is_named_with_its_file() {
    let dir = copy_fixture("activation");
    edit_json(&dir.join("2_Dense/config.json"), |v| v["activation_function"] = "torch.nn.modules.activation.SiLU".into());
    let err = load(&dir).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Unsupported(_)), "{msg}");
    assert!(msg.contains("2_Dense/config.json") && msg.contains("\"torch.nn.modules.activation.SiLU\""), "{msg}");
    assert!(msg.contains("Tanh") && msg.contains("GELU"), "says what is supported: {msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dense_without_safetensors_weights_is_refused_clearly() {
    let dir = copy_fixture("weights");
    std::fs::remove_file(dir.join("2_Dense/model.safetensors")).unwrap();
    let err = load(&dir).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::MissingFile { .. }), "{msg}");
    assert!(msg.contains("2_Dense/model.safetensors") && msg.contains("linear.weight"), "{msg}");

    // Only the legacy PyTorch pickle: say so, and how to convert.
    std::fs::write(dir.join("2_Dense/pytorch_model.bin"), b"not read").unwrap();
    let err = load(&dir).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Unsupported(_)), "{msg}");
    assert!(msg.contains("2_Dense/pytorch_model.bin") && msg.contains("only model.safetensors is read"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dense_weights_that_do_not_match_the_config_are_named() {
    let dir = copy_fixture("shape");
    edit_json(&dir.join("2_Dense/config.json"), |v| v["out_features"] = 8.into());
    let msg = load(&dir).err().unwrap().to_string();
    assert!(msg.contains("2_Dense/model.safetensors") && msg.contains("linear.weight") && msg.contains("[16, 32]"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_modules_are_errors_not_skipped() {
    let dir = copy_fixture("unknown");
    edit_json(&dir.join("modules.json"), |v| {
        v.as_array_mut().unwrap().insert(
            3,
            serde_json::json!({"idx": 3, "name": "3", "path": "3_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}),
        );
    });
    let err = load(&dir).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Unsupported(_)), "{msg}");
    assert!(msg.contains("modules.json") && msg.contains("sentence_transformers.models.LayerNorm"), "{msg}");

    // A Dense before Pooling would run per token: refused too.
    edit_json(&dir.join("modules.json"), |v| {
        let a = v.as_array_mut().unwrap();
        a.remove(3);
        a.swap(1, 2);
    });
    let msg = load(&dir).err().unwrap().to_string();
    assert!(msg.contains("before Pooling"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_version_covers_the_dense_weights() {
    let dir = copy_fixture("version");
    let before = load(&dir).unwrap().info().version.clone();
    // Same transformer weights, another projection: another version.
    let bytes = std::fs::read(dir.join("2_Dense/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let w = st.tensor("linear.weight").unwrap();
    let mut data = w.data().to_vec();
    data[0] ^= 1;
    let b = st.tensor("linear.bias").unwrap();
    let views = [
        ("linear.weight", safetensors::tensor::TensorView::new(w.dtype(), w.shape().to_vec(), &data).unwrap()),
        ("linear.bias", safetensors::tensor::TensorView::new(b.dtype(), b.shape().to_vec(), b.data()).unwrap()),
    ];
    safetensors::serialize_to_file(views, None, &dir.join("2_Dense/model.safetensors")).unwrap();
    let after = load(&dir).unwrap().info().version.clone();
    assert_ne!(before, after);
    std::fs::remove_dir_all(&dir).unwrap();
}
