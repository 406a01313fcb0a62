//! Text x image cross-attention fusion for multimodal intent: every text token attends over the
//! image regions (the positions of the image encoder's last feature map), then a feed-forward
//! layer, each sub-layer residual and post-norm as in BERT:
//!
//! ```text
//! kv  = image_proj(image)                      [B, N, C] -> [B, N, H]
//! a   = MHA(query = text, key = kv, value = kv) [B, L, H]
//! x   = norm1(text + a)
//! out = norm2(x + ffn(x))                       ffn = Linear(H, F) -> GELU (exact, erf) -> Linear(F, H)
//! ```
//!
//! Numerically the PyTorch module of `scripts/make_fusion_fixture.py` (`nn.Linear`,
//! `nn.MultiheadAttention(batch_first=True)`, `nn.LayerNorm`, `nn.GELU()`), and its `state_dict`
//! loads as is. Weight names (under whatever prefix the `VarBuilder` has), H = `hidden`,
//! C = `image_channels`, F = `ffn`:
//!
//! | name | shape |
//! |---|---|
//! | `image_proj.weight`, `image_proj.bias` | [H, C], [H] |
//! | `attn.in_proj_weight`, `attn.in_proj_bias` | [3H, H], [3H] (query, key, value rows in that order) |
//! | `attn.out_proj.weight`, `attn.out_proj.bias` | [H, H], [H] |
//! | `norm1.weight`, `norm1.bias` | [H], [H] |
//! | `ffn.0.weight`, `ffn.0.bias` | [F, H], [F] |
//! | `ffn.2.weight`, `ffn.2.bias` | [H, F], [H] |
//! | `norm2.weight`, `norm2.bias` | [H], [H] |
//!
//! Inputs: text [B, L, H] (e.g. BERT's token states; padded tokens just give rows nobody
//! reads), image positions [B, N, C] ([`CrossAttentionFusion::positions`] turns a ResNet feature
//! map into these; several images per row are concatenated along N) and an optional
//! `image_mask` [B, N] (f32 or u8, 1 = real position, 0 = padding: PyTorch's
//! `key_padding_mask` inverted). Masked positions get no attention weight whatever they hold.
//! A row whose mask is all zero (no image at all) gives NaN in PyTorch; here its attention
//! output `a` is zero, so that row's result is `norm2(x + ffn(x))` with `x = norm1(text)`: the
//! text passes through with no image contribution.
//!
//! Plain candle ops only, so it runs on every device and is differentiable. candle-nn's fused
//! `ops::layer_norm` and `ops::softmax_last_dim` (and so `candle_nn::LayerNorm`, which calls the
//! former on contiguous input) are custom ops with no backward: their outputs are cut from the
//! graph and gradients silently stop there. So when anything is being tracked (weights from a
//! `VarBuilder::from_varmap`, or inputs that carry a graph) the block uses layer norm and softmax
//! written from basic ops; otherwise (inference, f32/f16/bf16) it uses the fused ones. The two
//! agree to float rounding (both are checked against PyTorch in `models/tests/fusion.rs`).
use std::path::Path;

use candle_core::{DType, Tensor, D};
use candle_nn::init::{self, Init};
use candle_nn::{Linear, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

fn default_eps() -> f64 {
    1e-5
}

/// The block's sizes, as the `config.json` beside its weights.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FusionConfig {
    /// Text width H (the query, key, value and output width).
    pub hidden: usize,
    /// C, the channels of the image encoder's last feature map.
    pub image_channels: usize,
    /// Attention heads; must divide `hidden`.
    pub heads: usize,
    /// The feed-forward layer's inner width F.
    pub ffn: usize,
    /// Both layer norms' epsilon; PyTorch's `nn.LayerNorm` default 1e-5 when absent.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

impl FusionConfig {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bad = |reason: String| ModelError::BadFile { path: path.to_owned(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| bad(format!("expected a fusion config (hidden, image_channels, heads, ffn): {e}")))?;
        cfg.check().map_err(|e| bad(e.to_string()))?;
        Ok(cfg)
    }

    /// Every size non-zero and `heads` dividing `hidden`.
    pub fn check(&self) -> Result<()> {
        if self.hidden == 0 || self.image_channels == 0 || self.heads == 0 || self.ffn == 0 {
            return Err(ModelError::Unsupported(format!("fusion sizes must be non-zero: {self:?}")));
        }
        if !self.hidden.is_multiple_of(self.heads) {
            return Err(ModelError::Unsupported(format!(
                "fusion hidden {} is not a multiple of heads {}",
                self.hidden, self.heads
            )));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps < 0.0 {
            return Err(ModelError::Unsupported(format!("layer_norm_eps {} must be >= 0", self.layer_norm_eps)));
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// Layer norm over the last dimension with weight and bias, PyTorch's `nn.LayerNorm` (biased
/// variance, eps inside the square root).
#[derive(Debug, Clone)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    fn load(vb: VarBuilder, h: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(h, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(h, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    fn forward(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        if fused {
            let x = x.contiguous()?;
            return Ok(candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps as f32)?);
        }
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// The fusion block; see the module docs. Cheap to clone (tensors are shared).
#[derive(Debug, Clone)]
pub struct CrossAttentionFusion {
    cfg: FusionConfig,
    image_proj: Linear,
    q: Linear,
    k: Linear,
    v: Linear,
    out_proj: Linear,
    norm1: Norm,
    ffn_in: Linear,
    ffn_out: Linear,
    norm2: Norm,
    /// Some weight is a variable (or depends on one): take the differentiable path.
    weights_tracked: bool,
}

fn bad_shape(what: &str, t: &Tensor, want: &str) -> ModelError {
    ModelError::InvalidInput(format!("fusion: {what} is {:?}; expected {want}", t.dims()))
}

impl CrossAttentionFusion {
    /// Loads the weights named as the PyTorch reference's `state_dict` (see the module docs).
    /// With a `VarBuilder::from_varmap` the missing variables are created as PyTorch initialises
    /// the attention and norms (Xavier-uniform in-projection, zero attention biases, LayerNorm
    /// weight 1 and bias 0) and as `candle_nn::linear` initialises the Linear layers.
    pub fn load(vb: VarBuilder, cfg: &FusionConfig) -> Result<Self> {
        cfg.check()?;
        let (h, c, f) = (cfg.hidden, cfg.image_channels, cfg.ffn);
        let image_proj = candle_nn::linear(c, h, vb.pp("image_proj"))?;
        let attn = vb.pp("attn");
        let bound = (6.0 / (h + 3 * h) as f64).sqrt();
        let in_w = attn.get_with_hints((3 * h, h), "in_proj_weight", Init::Uniform { lo: -bound, up: bound })?;
        let in_b = attn.get_with_hints(3 * h, "in_proj_bias", init::ZERO)?;
        let part = |i: usize| -> Result<Linear> {
            Ok(Linear::new(in_w.narrow(0, i * h, h)?, Some(in_b.narrow(0, i * h, h)?)))
        };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let out = attn.pp("out_proj");
        let out_w = out.get_with_hints((h, h), "weight", init::DEFAULT_KAIMING_NORMAL)?;
        let out_b = out.get_with_hints(h, "bias", init::ZERO)?;
        let out_proj = Linear::new(out_w, Some(out_b));
        let norm1 = Norm::load(vb.pp("norm1"), h, cfg.layer_norm_eps)?;
        let ffn_in = candle_nn::linear(h, f, vb.pp("ffn.0"))?;
        let ffn_out = candle_nn::linear(f, h, vb.pp("ffn.2"))?;
        let norm2 = Norm::load(vb.pp("norm2"), h, cfg.layer_norm_eps)?;
        let mut weights = vec![&in_w, &in_b, out_proj.weight(), &norm1.weight, &norm1.bias, &norm2.weight, &norm2.bias];
        for l in [&image_proj, &ffn_in, &ffn_out] {
            weights.push(l.weight());
            weights.extend(l.bias());
        }
        let weights_tracked = weights.iter().any(|t| t.track_op());
        Ok(Self {
            cfg: cfg.clone(),
            image_proj,
            q,
            k,
            v,
            out_proj,
            norm1,
            ffn_in,
            ffn_out,
            norm2,
            weights_tracked,
        })
    }

    pub fn config(&self) -> &FusionConfig {
        &self.cfg
    }

    /// text [B, L, H], image [B, N, C], image_mask [B, N] (f32 or u8, 1 = real position) ->
    /// [B, L, H]. See the module docs; a row with no real position gets no image contribution.
    pub fn forward(&self, text: &Tensor, image: &Tensor, image_mask: Option<&Tensor>) -> Result<Tensor> {
        let (h, heads, d) = (self.cfg.hidden, self.cfg.heads, self.cfg.head_dim());
        let (b, l, th) = text.dims3().map_err(|_| bad_shape("text", text, "[B, L, hidden]"))?;
        let (ib, n, c) = image.dims3().map_err(|_| bad_shape("image", image, "[B, N, image_channels]"))?;
        if th != h || ib != b || c != self.cfg.image_channels {
            return Err(ModelError::InvalidInput(format!(
                "fusion: text {:?} and image {:?} must be [B, L, {h}] and [B, N, {}]",
                text.dims(),
                image.dims(),
                self.cfg.image_channels
            )));
        }
        if n == 0 {
            return Err(ModelError::InvalidInput("fusion: the image has no positions (N = 0)".into()));
        }
        // Real-position predicate [B, N] (u8: 1 where the mask is non-zero).
        let keep = match image_mask {
            None => None,
            Some(m) => {
                if m.dims() != [b, n] {
                    return Err(ModelError::InvalidInput(format!(
                        "fusion: image_mask is {:?}; expected [{b}, {n}] (batch, image positions)",
                        m.dims()
                    )));
                }
                Some(m.to_dtype(DType::F32)?.ne(0f64)?)
            }
        };
        let fused = !(self.weights_tracked || text.track_op() || image.track_op()) && text.dtype() != DType::F64;

        let kv = self.image_proj.forward(image)?; // [B, N, H]
        let heads_first = |x: Tensor, len: usize| -> Result<Tensor> {
            Ok(x.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()?)
        };
        let q = heads_first(self.q.forward(text)?, l)?; // [B, heads, L, d]
        let k = heads_first(self.k.forward(&kv)?, n)?; // [B, heads, N, d]
        let v = heads_first(self.v.forward(&kv)?, n)?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?; // [B, heads, L, N]
        let scores = match &keep {
            None => scores,
            Some(keep) => {
                // Fill, not add: a finite fill keeps an all-padding row finite (uniform weights,
                // zeroed below) and masked logits exactly out of the softmax (exp underflows to 0).
                let fill = match scores.dtype() {
                    DType::F16 => -65504.0,
                    _ => -1e30,
                };
                let shape = scores.shape().clone();
                let keep = keep.reshape((b, 1, 1, n))?.broadcast_as(&shape)?;
                let fill = Tensor::new(fill, scores.device())?.to_dtype(scores.dtype())?.broadcast_as(&shape)?;
                keep.where_cond(&scores, &fill)?
            }
        };
        let probs = if fused {
            candle_nn::ops::softmax_last_dim(&scores.contiguous()?)?
        } else {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        };
        let a = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))?; // [B, L, H]
        let mut a = self.out_proj.forward(&a)?;
        if let Some(keep) = &keep {
            // Rows with no real image position: no attention output at all.
            let any = keep.max_keepdim(1)?.to_dtype(a.dtype())?.reshape((b, 1, 1))?;
            a = a.broadcast_mul(&any)?;
        }
        let x = self.norm1.forward(&(text + a)?, fused)?;
        let y = self.ffn_out.forward(&self.ffn_in.forward(&x)?.gelu_erf()?)?;
        self.norm2.forward(&(x + y)?, fused)
    }

    /// A ResNet feature map [C, h, w] (or [B, C, h, w]) as image positions [h*w, C] (or
    /// [B, h*w, C]), row-major over (h, w): position `i * w + j` is pixel (i, j).
    pub fn positions(features: &Tensor) -> Result<Tensor> {
        match *features.dims() {
            [c, h, w] => Ok(features.reshape((c, h * w))?.t()?.contiguous()?),
            [b, c, h, w] => Ok(features.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?),
            _ => Err(ModelError::InvalidInput(format!(
                "fusion positions: expected a feature map [C, h, w] or [B, C, h, w], got {:?}",
                features.dims()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    fn cfg() -> FusionConfig {
        FusionConfig { hidden: 16, image_channels: 12, heads: 4, ffn: 24, layer_norm_eps: 1e-5 }
    }

    /// Built from a fresh VarMap (PyTorch's initialisation), then LayerNorm weights and the
    /// attention biases (1 and 0 at init) moved off their initial values, so every parameter's
    /// gradient is generic. The loss weights the output by a fixed random probe: the plain sum
    /// of a LayerNorm's output has zero gradient before it when its weight is constant.
    #[test]
    fn gradients_reach_every_parameter() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let cfg = cfg();
        let model = CrossAttentionFusion::load(vb, &cfg).unwrap();
        assert!(model.weights_tracked);
        for (name, var) in varmap.data().lock().unwrap().iter() {
            let t = var.as_tensor();
            if name.starts_with("norm") || name.ends_with("bias") {
                let noise = Tensor::randn(0f32, 0.3, t.shape(), &dev).unwrap();
                var.set(&(t + noise).unwrap()).unwrap();
            }
        }
        let text = Tensor::randn(0f32, 1.0, (2, 5, cfg.hidden), &dev).unwrap();
        let image = Var::randn(0f32, 1.0, (2, 6, cfg.image_channels), &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 1., 1., 1., 1., 1.], [1., 1., 1., 0., 0., 0.]], &dev).unwrap();
        let out = model.forward(&text, image.as_tensor(), Some(&mask)).unwrap();
        let probe = Tensor::randn(0f32, 1.0, out.shape(), &dev).unwrap();
        let grads = (out * probe).unwrap().sum_all().unwrap().backward().unwrap();
        let data = varmap.data().lock().unwrap();
        assert_eq!(data.len(), 14, "{:?}", data.keys());
        for (name, var) in data.iter() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
            assert_eq!(g.dims(), var.dims(), "{name}");
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
            assert!(norm.is_finite() && norm > 1e-6, "{name}: gradient norm {norm}");
        }
        // The input gets gradient at real positions only.
        let gi = grads.get(image.as_tensor()).unwrap();
        let padded = gi.narrow(0, 1, 1).unwrap().narrow(1, 3, 3).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(padded.to_scalar::<f32>().unwrap(), 0.0);
        let real = gi.narrow(1, 0, 3).unwrap().abs().unwrap().max_all().unwrap();
        assert!(real.to_scalar::<f32>().unwrap() > 0.0);
    }

    #[test]
    fn config_defaults_eps_and_checks_heads() {
        let c: FusionConfig = serde_json::from_str(r#"{"hidden": 8, "image_channels": 4, "heads": 2, "ffn": 16}"#).unwrap();
        assert_eq!(c.layer_norm_eps, 1e-5);
        assert_eq!(c.head_dim(), 4);
        let bad = FusionConfig { heads: 3, ..c.clone() };
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        assert!(matches!(CrossAttentionFusion::load(vb, &bad), Err(ModelError::Unsupported(_))));
    }

    #[test]
    fn positions_is_row_major_over_h_w() {
        let dev = Device::Cpu;
        // [C=2, h=2, w=3]: channel c, pixel (i, j) holds 100c + 10i + j.
        let v: Vec<f32> = (0..2).flat_map(|c| (0..2).flat_map(move |i| (0..3).map(move |j| (100 * c + 10 * i + j) as f32))).collect();
        let f = Tensor::from_vec(v, (2, 2, 3), &dev).unwrap();
        let p = CrossAttentionFusion::positions(&f).unwrap();
        assert_eq!(p.dims(), [6, 2]);
        let rows = p.to_vec2::<f32>().unwrap();
        for (pos, row) in rows.iter().enumerate() {
            let (i, j) = (pos / 3, pos % 3);
            assert_eq!(row, &[(10 * i + j) as f32, (100 + 10 * i + j) as f32]);
        }
        let batched = CrossAttentionFusion::positions(&f.unsqueeze(0).unwrap()).unwrap();
        assert_eq!(batched.squeeze(0).unwrap().to_vec2::<f32>().unwrap(), rows);
        assert!(CrossAttentionFusion::positions(&p).is_err());
    }
}
