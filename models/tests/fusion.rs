//! The text x image cross-attention fusion block against PyTorch (fixture made by
//! scripts/make_fusion_fixture.py: a module built on `nn.MultiheadAttention`, float64 reference
//! outputs and input gradients cast to float32).
//!
//! Tolerance: max abs error of the output within `TOL` = 1e-5 (outputs are LayerNorm-scaled,
//! |output| up to about 4), on both paths of the block: the inference one (weights from
//! `VarBuilder::from_tensors`: candle-nn's fused layer norm and softmax) and the differentiable
//! one (weights from a `VarMap`: the same from basic ops). Measured on the CPU: 4.8e-7 on both
//! paths for the masked batch and 4.8e-7 for the feature-map case. The gradients of
//! sum(output * probe) with respect to text and image match PyTorch's within `GRAD_TOL` = 1e-5
//! (measured 4.8e-7 and 5.2e-8), and parameter gradients match f64 central finite differences
//! within 1e-5 relative (measured 3e-7, most of it candle's rounded 1/sqrt(2 pi) in GELU's
//! backward).
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use concierge_models::{CrossAttentionFusion, FusionConfig, ModelError};

const TOL: f32 = 1e-5;
const GRAD_TOL: f32 = 1e-5;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fusion-tiny")
}

fn config() -> FusionConfig {
    FusionConfig::from_file(&fixture_dir().join("config.json")).unwrap()
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("reference.safetensors"), &Device::Cpu).unwrap()
}

/// Inference weights: plain tensors, nothing tracked.
fn load_plain() -> CrossAttentionFusion {
    let weights = candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    CrossAttentionFusion::load(VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu), &config()).unwrap()
}

/// Training weights: variables of a VarMap, filled from the fixture.
fn load_varmap(dtype: DType) -> (CrossAttentionFusion, VarMap) {
    let varmap = VarMap::new();
    let model = CrossAttentionFusion::load(VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu), &config()).unwrap();
    let weights = candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    let data = varmap.data().lock().unwrap();
    assert_eq!(data.len(), weights.len());
    for (name, var) in data.iter() {
        var.set(&weights[name].to_dtype(dtype).unwrap()).unwrap();
    }
    drop(data);
    (model, varmap)
}

fn max_abs_diff(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let diff = (got.to_dtype(DType::F32).unwrap() - want).unwrap().abs().unwrap();
    diff.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn config_reads_the_fixture() {
    let cfg = config();
    assert_eq!(
        cfg,
        FusionConfig { hidden: 32, image_channels: 48, heads: 4, ffn: 64, layer_norm_eps: 1e-5 }
    );
    let model = load_plain();
    assert_eq!(model.config(), &cfg);
}

#[test]
fn matches_pytorch_with_a_padded_row() {
    let r = reference();
    let (text, image, mask) = (&r["text"], &r["image"], &r["image_mask"]);
    let plain = load_plain().forward(text, image, Some(mask)).unwrap();
    let err = max_abs_diff(&plain, &r["output"]);
    println!("fused path: max abs error {err:.2e}");
    assert!(err <= TOL, "fused path: max abs error {err}");

    let (model, _varmap) = load_varmap(DType::F32);
    let tracked = model.forward(text, image, Some(mask)).unwrap();
    let err = max_abs_diff(&tracked, &r["output"]);
    println!("differentiable path: max abs error {err:.2e}");
    assert!(err <= TOL, "differentiable path: max abs error {err}");
    println!("fused vs differentiable: {:.2e}", max_abs_diff(&plain, &tracked));
}

/// The same mask as u8 gives the same output; garbage of any size at the padded positions
/// changes nothing; without the mask the garbage does change the padded row (so the mask is
/// what keeps it out) and leaves the unpadded rows alone.
#[test]
fn padded_positions_are_ignored() {
    let r = reference();
    let (text, image, mask) = (&r["text"], &r["image"], &r["image_mask"]);
    let model = load_plain();
    let base = model.forward(text, image, Some(mask)).unwrap();

    let mask_u8 = mask.to_dtype(DType::U8).unwrap();
    assert_eq!(max_abs_diff(&model.forward(text, image, Some(&mask_u8)).unwrap(), &base), 0.0);

    // Replace the padded positions with other garbage (1e4 * noise).
    let keep = mask.unsqueeze(2).unwrap().broadcast_as(image.shape()).unwrap().contiguous().unwrap();
    let noise = Tensor::randn(0f32, 1e4, image.shape(), &Device::Cpu).unwrap();
    let other = keep.ne(0f64).unwrap().where_cond(image, &noise).unwrap();
    assert!(max_abs_diff(&other, image) > 1.0);
    let err = max_abs_diff(&model.forward(text, &other, Some(mask)).unwrap(), &base);
    assert_eq!(err, 0.0, "garbage at padded positions changed the output by {err}");

    let unmasked = model.forward(text, image, None).unwrap();
    let row = |t: &Tensor, i: usize| t.narrow(0, i, 1).unwrap();
    assert!(max_abs_diff(&row(&unmasked, 1), &row(&base, 1)) > 1e-3);
    for i in [0, 2] {
        assert_eq!(max_abs_diff(&row(&unmasked, i), &row(&base, i)), 0.0);
    }
}

/// A row with no image at all: PyTorch gives NaN; here the attention output is zero, so the
/// row is the block without its attention term, norm2(x + ffn(x)) with x = norm1(text), on
/// both paths; the other rows are unchanged.
#[test]
fn a_row_without_any_image_is_finite_and_text_only() {
    let r = reference();
    let (text, image, mask) = (&r["text"], &r["image"], &r["image_mask"]);
    let mut m = mask.to_vec2::<f32>().unwrap();
    m[2].iter_mut().for_each(|v| *v = 0.0);
    let empty = Tensor::new(m, &Device::Cpu).unwrap();

    // The same block with a zero attention output: zero value and out-projection weights.
    let mut weights = candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    for name in ["attn.out_proj.weight", "attn.out_proj.bias"] {
        let z = weights[name].zeros_like().unwrap();
        weights.insert(name.to_string(), z);
    }
    let no_attn = CrossAttentionFusion::load(VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu), &config())
        .unwrap()
        .forward(text, image, None)
        .unwrap();

    let base = load_plain().forward(text, image, Some(mask)).unwrap();
    let (model, _varmap) = load_varmap(DType::F32);
    for (path, out) in [
        ("fused", load_plain().forward(text, image, Some(&empty)).unwrap()),
        ("differentiable", model.forward(text, image, Some(&empty)).unwrap()),
    ] {
        let row = |t: &Tensor, i: usize| t.narrow(0, i, 1).unwrap();
        let finite = row(&out, 2).abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(finite.is_finite(), "{path}: the row with no image is not finite");
        let err = max_abs_diff(&row(&out, 2), &row(&no_attn, 2));
        assert!(err <= 1e-5, "{path}: the row with no image differs from text-only by {err}");
        for i in [0, 1] {
            assert!(max_abs_diff(&row(&out, i), &row(&base, i)) <= 1e-5, "{path}: row {i} changed");
        }
    }
}

/// The gradients of sum(output * probe) with respect to the inputs match PyTorch's: the backward
/// pass through every op of the block (image projection, attention with the padding mask,
/// softmax, layer norms, GELU) is right, and padded positions get exactly zero.
#[test]
fn input_gradients_match_pytorch() {
    let r = reference();
    let (model, varmap) = load_varmap(DType::F32);
    let text = Var::from_tensor(&r["text"]).unwrap();
    let image = Var::from_tensor(&r["image"]).unwrap();
    let out = model.forward(text.as_tensor(), image.as_tensor(), Some(&r["image_mask"])).unwrap();
    let loss = (out * &r["probe"]).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for (what, var) in [("grad_text", &text), ("grad_image", &image)] {
        let g = grads.get(var.as_tensor()).unwrap();
        let err = max_abs_diff(g, &r[what]);
        println!("{what}: max abs error {err:.2e}");
        assert!(err <= GRAD_TOL, "{what}: max abs error {err}");
    }
    let padded = grads.get(image.as_tensor()).unwrap().narrow(0, 1, 1).unwrap().narrow(1, 9, 9).unwrap();
    assert_eq!(padded.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    // Every parameter gets a non-zero gradient.
    let data = varmap.data().lock().unwrap();
    assert_eq!(data.len(), 14);
    for (name, var) in data.iter() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
        let m = g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(m.is_finite() && m > 0.0, "{name}: gradient max {m}");
    }
}

/// Parameter gradients against central finite differences, in f64 on the differentiable path.
/// (The key part of `attn.in_proj_bias` has zero gradient by construction: a per-row constant
/// added to the scores does not change the softmax.)
#[test]
fn parameter_gradients_match_finite_differences() {
    let r = reference();
    let (model, varmap) = load_varmap(DType::F64);
    let f64t = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let (text, image, mask, probe) = (f64t(&r["text"]), f64t(&r["image"]), &r["image_mask"], f64t(&r["probe"]));
    let loss = || -> f64 {
        let out = model.forward(&text, &image, Some(mask)).unwrap();
        (out * &probe).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let grads = {
        let out = model.forward(&text, &image, Some(mask)).unwrap();
        (out * &probe).unwrap().sum_all().unwrap().backward().unwrap()
    };
    let data = varmap.data().lock().unwrap();
    let eps = 1e-5;
    let mut worst = 0f64;
    for (name, var) in data.iter() {
        let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let orig = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // A few spread-out entries of each parameter.
        for idx in [0, orig.len() / 3, orig.len() / 2 + 1, orig.len() - 1] {
            let at = |delta: f64| {
                let mut v = orig.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                loss()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
            let err = (fd - g[idx]).abs() / (1.0 + fd.abs());
            worst = worst.max(err);
            assert!(err < 1e-5, "{name}[{idx}]: backward {} vs finite difference {fd}", g[idx]);
        }
    }
    println!("parameter gradients vs finite differences: worst relative error {worst:.1e}");
}

#[test]
fn feature_map_positions_match_pytorch() {
    let r = reference();
    let positions = CrossAttentionFusion::positions(&r["features"]).unwrap();
    assert_eq!(positions.dims(), [3, 9, 48]);
    assert_eq!(max_abs_diff(&positions, &r["feature_positions"]), 0.0);
    // One image's [C, h, w] map gives that row.
    let one = CrossAttentionFusion::positions(&r["features"].get(1).unwrap()).unwrap();
    assert_eq!(max_abs_diff(&one, &r["feature_positions"].get(1).unwrap()), 0.0);

    let out = load_plain().forward(&r["text"], &positions, None).unwrap();
    let err = max_abs_diff(&out, &r["feature_output"]);
    println!("feature map: max abs error {err:.2e}");
    assert!(err <= TOL, "feature map: max abs error {err}");
}

#[test]
fn bad_shapes_are_invalid_input() {
    let r = reference();
    let model = load_plain();
    let (text, image, mask) = (&r["text"], &r["image"], &r["image_mask"]);
    let wrong_mask = mask.narrow(1, 0, 5).unwrap();
    let wrong_image = image.narrow(2, 0, 40).unwrap();
    let wrong_batch = image.narrow(0, 0, 2).unwrap();
    for (what, res) in [
        ("mask", model.forward(text, image, Some(&wrong_mask))),
        ("channels", model.forward(text, &wrong_image, Some(mask))),
        ("batch", model.forward(text, &wrong_batch, None)),
        ("text rank", model.forward(&text.flatten(0, 1).unwrap(), image, None)),
    ] {
        assert!(matches!(res, Err(ModelError::InvalidInput(_))), "{what}: {res:?}");
    }
}
