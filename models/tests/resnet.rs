//! The ResNet image encoder against PyTorch (fixtures made by scripts/make_resnet_fixture.py:
//! torchvision's ResNet with BasicBlock and Bottleneck, and a plain-PyTorch Caffe-style
//! bottleneck ResNet with asymmetric stem/pool padding saved with batch-norm pre-folded).
//! Tolerance: max abs error of pooled, feature map and logits within 1e-4 of the largest
//! reference value of that output (the references run unfolded batch-norm in float64; measured
//! errors are around 1e-6 relative), on both the CPU fast path (`forward`: channels-last packed
//! GEMM convs) and the plain-candle one (`forward_reference`). The two paths also agree with
//! each other within `FAST_REL_TOL` on every fixture and on Open-NSFW when it is fetched.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use concierge_models::resnet::{BlockKind, ChannelOrder};
use concierge_models::{ModelError, ResNet, ResNetConfig};

const REL_TOL: f32 = 1e-4;
/// Fast path vs the candle path: both f32, summing in different orders.
const FAST_REL_TOL: f32 = 1e-5;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Max abs difference over the largest reference magnitude.
fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let diff = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    diff / scale
}

fn check_parity(name: &str) -> ResNet {
    let dir = fixture_dir(name);
    let dev = Device::Cpu;
    let model = ResNet::from_dir(&dir, &dev, DType::F32).unwrap();
    let reference = candle_core::safetensors::load(dir.join("reference.safetensors"), &dev).unwrap();
    for (path, out) in [("fast", model.forward(&reference["input"])), ("candle", model.forward_reference(&reference["input"]))] {
        let out = out.unwrap();
        let logits = out.logits.as_ref().expect("the fixture has an fc head");
        for (what, got) in [("pooled", &out.pooled), ("features", &out.features), ("logits", logits)] {
            let err = rel_err(got, &reference[what]);
            println!("{name} {path} {what}: max abs error {err:.2e} of the output's scale");
            assert!(err < REL_TOL, "{name} {path} {what}: max abs error {err} of the output's scale");
        }
        assert_eq!(out.pooled.dims()[1], model.config().feature_dim().unwrap());
    }
    model
}

#[test]
fn torchvision_basic_block_resnet_matches_pytorch() {
    let m = check_parity("resnet18-tiny");
    assert_eq!(m.config().block, BlockKind::Basic);
}

#[test]
fn torchvision_bottleneck_resnet_matches_pytorch() {
    let m = check_parity("resnet50-tiny");
    assert_eq!(m.config().stage_channels().unwrap(), [16, 32, 64, 128]);
}

#[test]
fn caffe_style_prefolded_resnet_with_asymmetric_padding_matches_pytorch() {
    let m = check_parity("resnet-caffe-tiny");
    let cfg = m.config();
    assert!(cfg.stride_in_1x1);
    assert_eq!((cfg.stem_pad, cfg.pool_pad), (Some([2, 3, 1, 3]), Some([0, 1, 1, 1])));
    assert_eq!((cfg.channel_order, cfg.scale, cfg.mean), (ChannelOrder::Bgr, 255.0, [104.0, 117.0, 123.0]));
}

/// Folding inside the loader equals folding done by PyTorch: the same network saved unfolded
/// (conv + bn tensors) and folded (conv weight + bias) gives the same outputs. The unfolded copy
/// is rebuilt here from the folded one by adding identity batch-norms with non-trivial stats
/// that exactly undo a scale and shift applied to the conv.
#[test]
fn loader_folding_equals_prefolded_weights() {
    let dir = fixture_dir("resnet-caffe-tiny");
    let dev = Device::Cpu;
    let cfg = ResNetConfig::from_file(&dir.join("config.json")).unwrap();
    let folded = candle_core::safetensors::load(dir.join("model.safetensors"), &dev).unwrap();
    let mut unfolded = HashMap::new();
    for (name, t) in &folded {
        // Every conv bias (not fc.bias) becomes a conv with a batch-norm after it.
        let conv = name.strip_suffix(".bias").filter(|c| *c != "fc");
        let Some(conv) = conv.filter(|c| folded.contains_key(&format!("{c}.weight"))) else {
            unfolded.entry(name.clone()).or_insert_with(|| t.clone());
            continue;
        };
        let bn = match conv.strip_suffix(".0") {
            Some(ds) => format!("{ds}.1"),
            None => conv.replacen("conv", "bn", 1),
        };
        let c = t.dims1().unwrap();
        // With s = gamma / sqrt(var + eps) and the conv weight divided by s,
        // bn(conv(x)) = s (W x / s - mean) + beta = W x + b when beta = b + s mean.
        let eps = cfg.bn_eps;
        let gamma = Tensor::full(2f32, c, &dev).unwrap();
        let var = Tensor::full(3f32, c, &dev).unwrap();
        let mean = Tensor::full(0.5f32, c, &dev).unwrap();
        let s = 2.0 / (3.0 + eps).sqrt();
        let w = (&folded[&format!("{conv}.weight")] / s).unwrap();
        let beta = (t + 0.5 * s).unwrap();
        unfolded.insert(format!("{conv}.weight"), w);
        unfolded.insert(format!("{bn}.weight"), gamma);
        unfolded.insert(format!("{bn}.bias"), beta);
        unfolded.insert(format!("{bn}.running_mean"), mean);
        unfolded.insert(format!("{bn}.running_var"), var);
    }
    assert!(!unfolded.contains_key("conv1.bias") && !unfolded.contains_key("layer1.0.downsample.0.bias"));
    assert!(unfolded.contains_key("layer1.0.downsample.1.running_var") && unfolded.contains_key("bn1.running_mean"));
    let x = candle_core::safetensors::load(dir.join("reference.safetensors"), &dev).unwrap().remove("input").unwrap();
    let a = ResNet::load(VarBuilder::from_tensors(folded, DType::F32, &dev), &cfg).unwrap().forward(&x).unwrap();
    let b = ResNet::load(VarBuilder::from_tensors(unfolded, DType::F32, &dev), &cfg).unwrap().forward(&x).unwrap();
    let err = rel_err(&b.features, &a.features);
    assert!(err < 1e-5, "folded vs unfolded: {err}");
}

/// Deterministic values in [-scale, scale).
fn pseudo_random(dims: (usize, usize, usize, usize), scale: f32) -> Tensor {
    let n = dims.0 * dims.1 * dims.2 * dims.3;
    let mut s = 0x9e3779b97f4a7c15u64;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// The fast path against the candle path on the same input: every output within
/// `FAST_REL_TOL` of its largest value. Returns the worst error.
fn fast_equals_reference(name: &str, model: &ResNet, x: &Tensor) -> f32 {
    assert!(model.has_cpu_fast_path(), "{name}: f32 on the CPU has the fast path");
    let (fast, slow) = (model.forward(x).unwrap(), model.forward_reference(x).unwrap());
    let mut outputs = vec![("pooled", &fast.pooled, &slow.pooled), ("features", &fast.features, &slow.features)];
    if let (Some(a), Some(b)) = (&fast.logits, &slow.logits) {
        outputs.push(("logits", a, b));
    }
    let mut worst = 0f32;
    for (what, a, b) in outputs {
        let err = rel_err(a, b);
        println!("{name} fast vs candle {what} {:?}: {err:.2e} of the output's scale", a.dims());
        assert!(err < FAST_REL_TOL, "{name} {what}: fast path differs from the candle path by {err}");
        worst = worst.max(err);
    }
    worst
}

#[test]
fn fast_path_equals_candle_path() {
    let dev = Device::Cpu;
    for name in ["resnet18-tiny", "resnet50-tiny", "resnet-caffe-tiny"] {
        let dir = fixture_dir(name);
        let model = ResNet::from_dir(&dir, &dev, DType::F32).unwrap();
        let x = candle_core::safetensors::load(dir.join("reference.safetensors"), &dev).unwrap().remove("input").unwrap();
        fast_equals_reference(name, &model, &x);
        // Another batch size and an odd, non-square size (borders and padding differ), and one
        // big enough that the first stage runs image by image.
        let (b, c, h, w) = x.dims4().unwrap();
        for dims in [(b + 2, c, h + 5, w - 3), (3, c, 2 * h - 9, 2 * w - 7)] {
            let odd = pseudo_random(dims, 1.0);
            fast_equals_reference(&format!("{name} {dims:?}"), &model, &odd);
        }
    }
    let open_nsfw = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model-store/open-nsfw");
    if !open_nsfw.join("model.safetensors").is_file() {
        eprintln!("SKIPPED Open-NSFW: no {} (scripts/fetch-image-model.sh fetches it)", open_nsfw.display());
        return;
    }
    let model = ResNet::from_dir(&open_nsfw, &dev, DType::F32).unwrap();
    // Preprocessed Caffe-style inputs are pixel values minus the mean: tens, not units.
    let x = pseudo_random((3, 3, 224, 224), 60.0);
    fast_equals_reference("open-nsfw", &model, &x);
}

#[test]
fn both_paths_refuse_the_wrong_channel_count() {
    let dir = fixture_dir("resnet18-tiny");
    let model = ResNet::from_dir(&dir, &Device::Cpu, DType::F32).unwrap();
    for dims in [(1, 4, 32, 32), (2, 1, 64, 64)] {
        let x = Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
        assert!(model.forward(&x).is_err(), "{dims:?}");
        assert!(model.forward_reference(&x).is_err(), "{dims:?}");
    }
}

fn load_with(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> ModelError {
    let dir = fixture_dir("resnet50-tiny");
    let dev = Device::Cpu;
    let cfg = ResNetConfig::from_file(&dir.join("config.json")).unwrap();
    let mut ts = candle_core::safetensors::load(dir.join("model.safetensors"), &dev).unwrap();
    edit(&mut ts);
    // Through a file too, so the error carries the path.
    let tag = format!("concierge-resnet-{}-{:?}", std::process::id(), std::thread::current().id());
    let tmp = std::env::temp_dir().join(tag);
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(dir.join("config.json"), tmp.join("config.json")).unwrap();
    candle_core::safetensors::save(&ts, tmp.join("model.safetensors")).unwrap();
    let direct = ResNet::load(VarBuilder::from_tensors(ts, DType::F32, &dev), &cfg).unwrap_err();
    let from_dir = ResNet::from_dir(&tmp, &dev, DType::F32).unwrap_err();
    std::fs::remove_dir_all(&tmp).unwrap();
    let names_file = matches!(&from_dir, ModelError::BadFile { path, .. } if path.ends_with("model.safetensors"));
    assert!(names_file, "{from_dir}");
    assert!(from_dir.to_string().contains(&direct.to_string()), "{from_dir} / {direct}");
    direct
}

#[test]
fn a_missing_tensor_is_named() {
    let err = load_with(|ts| {
        ts.remove("layer3.1.bn2.running_var");
    })
    .to_string();
    assert!(err.contains("layer3.1.bn2.running_var is missing"), "{err}");
    let err = load_with(|ts| {
        ts.remove("fc.weight");
    })
    .to_string();
    assert!(err.contains("fc.weight is missing"), "{err}");
}

#[test]
fn a_conv_without_batch_norm_or_bias_is_named() {
    let err = load_with(|ts| ts.retain(|k, _| !k.starts_with("layer2.0.downsample.1."))).to_string();
    assert!(err.contains("layer2.0.downsample.1.running_mean") && err.contains("layer2.0.downsample.0.bias"), "{err}");
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named() {
    let err = load_with(|ts| {
        let w = Tensor::zeros((16, 3, 5, 5), DType::F32, &Device::Cpu).unwrap();
        ts.insert("conv1.weight".into(), w);
    })
    .to_string();
    assert!(err.contains("conv1.weight has shape [16, 3, 5, 5]; the config implies [16, 3, 7, 7]"), "{err}");
}

#[test]
fn constructors_give_torchvision_widths() {
    let r50 = ResNetConfig::resnet50();
    assert_eq!(r50.stage_channels().unwrap(), [256, 512, 1024, 2048]);
    let half = ResNetConfig { width_multiplier: 0.5, ..ResNetConfig::resnet50() };
    assert_eq!(half.stage_widths().unwrap(), [32, 64, 128, 256]);
    assert_eq!(half.stage_channels().unwrap(), [128, 256, 512, 1024]);
    assert_eq!((half.stem_channels, half.feature_dim().unwrap()), (64, 1024));
    assert_eq!(ResNetConfig::resnet18().stage_channels().unwrap(), [64, 128, 256, 512]);
    assert_eq!(ResNetConfig::resnet34().layers, [3, 4, 6, 3]);
    assert_eq!(ResNetConfig::resnet101().layers, [3, 4, 23, 3]);
    assert_eq!(ResNetConfig::resnet152().feature_dim().unwrap(), 2048);
    let odd = ResNetConfig { width_multiplier: 0.3, ..ResNetConfig::resnet18() };
    assert!(odd.stage_widths().unwrap_err().to_string().contains("whole numbers"));
}

#[test]
fn a_minimal_config_json_takes_torchvision_defaults() {
    let cfg: ResNetConfig = serde_json::from_str(r#"{"block": "bottleneck", "layers": [3, 4, 6, 3]}"#).unwrap();
    assert_eq!(cfg, ResNetConfig { num_classes: None, ..ResNetConfig::resnet50() });
}

#[test]
fn no_head_gives_no_logits() {
    let dir = fixture_dir("resnet18-tiny");
    let dev = Device::Cpu;
    let cfg = ResNetConfig { num_classes: None, ..ResNetConfig::from_file(&dir.join("config.json")).unwrap() };
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &dev).unwrap();
    let model = ResNet::load(VarBuilder::from_tensors(weights, DType::F32, &dev), &cfg).unwrap();
    let out = model.forward(&Tensor::zeros((1, 3, 32, 48), DType::F32, &dev).unwrap()).unwrap();
    assert!(out.logits.is_none());
    assert_eq!(out.pooled.dims(), &[1, 64]);
    assert_eq!(out.features.dims(), &[1, 64, 1, 2]);
}
