//! Yahoo's Open-NSFW, converted by scripts/convert_open_nsfw.py, against onnxruntime running the
//! original ONNX graph (references written by scripts/open_nsfw_reference.py; both run by
//! scripts/fetch-image-model.sh, which scripts/fetch-default-model.sh calls). Nothing is
//! downloaded here: without `model-store/open-nsfw` the tests say so and pass.
//!
//! Tolerances: on the reference's own input tensors, probabilities within 1e-4 absolute and the
//! pooled features within 1e-4 of their largest value (both float32 with different conv
//! algorithms; measured 1.8e-7 and 7e-7). From the image files through our own decode +
//! preprocess, pixels differ from PIL's by at most one level, ~0.15 on average (PIL's bilinear
//! resize rounds to 8 bits between its two passes, `image` keeps float), so there the
//! probabilities must agree within 0.01 absolute (measured 1.3e-3, on logo.png) and give the
//! same safe/unsafe decision. All nine photos are safe; none unsafe is fetched.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use concierge_models::imageproc::{decode, preprocess, ImageLimits, Preprocess, Resize};
use concierge_models::resnet::ChannelOrder;
use concierge_models::ResNet;

const PROB_TOL: f32 = 1e-4;
const POOLED_REL_TOL: f32 = 1e-4;
const PIPELINE_PROB_TOL: f32 = 0.01;

/// `model-store/open-nsfw` (or `$CONCIERGE_OPEN_NSFW_DIR`) and its `-reference` sibling; None,
/// having said why, when they are not there.
fn dirs() -> Option<(PathBuf, PathBuf)> {
    let dir = std::env::var_os("CONCIERGE_OPEN_NSFW_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../model-store/open-nsfw"));
    let reference = PathBuf::from(format!("{}-reference", dir.display()));
    if !dir.join("model.safetensors").is_file() || !reference.join("reference.json").is_file() {
        eprintln!(
            "SKIPPED: Open-NSFW or its onnxruntime reference is not at {} / {}; \
             run scripts/fetch-image-model.sh (scripts/fetch-default-model.sh runs it) to fetch and convert it",
            dir.display(),
            reference.display()
        );
        return None;
    }
    Some((dir, reference))
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn probabilities(model: &ResNet, input: &Tensor) -> (Tensor, Tensor) {
    let out = model.forward(input).unwrap();
    let logits = out.logits.expect("Open-NSFW has a 2-class head");
    (candle_nn::ops::softmax_last_dim(&logits).unwrap(), out.pooled)
}

struct Reference {
    files: Vec<(String, usize)>,
    tensors: std::collections::HashMap<String, Tensor>,
}

fn reference(dir: &Path) -> Reference {
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let files = index["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["file"].as_str().unwrap().to_owned(), i["row"].as_u64().unwrap() as usize))
        .collect();
    let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    Reference { files, tensors }
}

#[test]
fn converted_config_reads_as_open_nsfw() {
    let Some((dir, _)) = dirs() else { return };
    let model = ResNet::from_dir(&dir, &Device::Cpu, DType::F32).unwrap();
    let cfg = model.config();
    assert!(cfg.stride_in_1x1);
    assert_eq!((cfg.width_multiplier, cfg.stem_channels, cfg.feature_dim().unwrap()), (0.5, 64, 1024));
    assert_eq!((cfg.stem_pad, cfg.pool_pad, cfg.num_classes), (None, Some([0, 1, 0, 1]), Some(2)));
    let p = Preprocess::from_config(cfg);
    assert_eq!((p.resize, p.crop, p.bgr, p.scale), (Resize::Exact([256, 256]), [224, 224], true, 1.0));
    assert_eq!((cfg.channel_order, cfg.mean, cfg.std), (ChannelOrder::Bgr, [104.0, 117.0, 123.0], [1.0; 3]));
}

/// (a) The same input tensors onnxruntime saw.
#[test]
fn matches_onnxruntime_on_its_own_input_tensors() {
    let Some((dir, ref_dir)) = dirs() else { return };
    let model = ResNet::from_dir(&dir, &Device::Cpu, DType::F32).unwrap();
    let r = reference(&ref_dir);
    let (probs, pooled) = probabilities(&model, &r.tensors["input"]);
    let err = max_abs(&probs, &r.tensors["probabilities"]);
    println!("{} images: probabilities max abs error {err:.2e} (tolerance {PROB_TOL:.0e})", r.files.len());
    assert!(err < PROB_TOL, "probabilities differ from onnxruntime by {err}");
    let want = &r.tensors["pooled"];
    let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let err = max_abs(&pooled, want);
    println!("pooled: max abs error {err:.2e}, {:.2e} of the largest value {scale:.2}", err / scale);
    assert!(err / scale < POOLED_REL_TOL, "pooled differs from onnxruntime by {err} (scale {scale})");
}

/// (b) Our own decode + preprocess from the image files, against onnxruntime on PIL's.
#[test]
fn rust_preprocessing_gives_onnxruntime_scores() {
    let Some((dir, ref_dir)) = dirs() else { return };
    let model = ResNet::from_dir(&dir, &Device::Cpu, DType::F32).unwrap();
    let p = Preprocess::from_config(model.config());
    let r = reference(&ref_dir);
    let side = model.config().input_size;
    let mut inputs = Vec::new();
    for (file, row) in &r.files {
        let bytes = std::fs::read(ref_dir.join("images").join(file)).unwrap();
        let img = decode(*row, &bytes, &ImageLimits::default()).unwrap();
        let x = Tensor::from_vec(preprocess(&img, &p), (1, 3, side, side), &Device::Cpu).unwrap();
        let pil = r.tensors["input"].narrow(0, *row, 1).unwrap();
        let mean = (&x - &pil).unwrap().abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        println!("{file:22} pixels vs PIL: max abs {:5.1}, mean abs {mean:.3} (of 0..255)", max_abs(&x, &pil));
        inputs.push(x);
    }
    let (probs, _) = probabilities(&model, &Tensor::cat(&inputs, 0).unwrap());
    let want = &r.tensors["probabilities"];
    let (got_v, want_v) = (probs.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
    let mut worst = 0f32;
    for (file, row) in &r.files {
        let (g, w) = (got_v[*row][1], want_v[*row][1]);
        println!("{file:22} unsafe: ours {g:.4}, onnxruntime {w:.4}");
        assert_eq!(g >= 0.5, w >= 0.5, "{file}: safe/unsafe decision differs (ours {g}, onnxruntime {w})");
        worst = worst.max((g - w).abs());
    }
    println!("pipeline: probabilities max abs difference {worst:.2e} (tolerance {PIPELINE_PROB_TOL})");
    assert!(worst < PIPELINE_PROB_TOL, "probabilities differ from onnxruntime by {worst}");
}
