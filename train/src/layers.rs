//! Trainable (autograd) BERT pieces the trainers share: a dense layer, a LayerNorm built from
//! basic ops (candle's fused one has no backward pass), BERT's post-LN transformer layer in
//! PyTorch's names, and dropout with masks from our seeded RNG.
use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use concierge_models::bert::Config as BertConfig;

use crate::rng::Rng;

pub(crate) struct Dense {
    w: Tensor,
    b: Tensor,
}

impl Dense {
    pub(crate) fn new(vb: &VarBuilder, d_in: usize, d_out: usize) -> candle_core::Result<Self> {
        let bound = 1.0 / (d_in as f64).sqrt();
        Ok(Self {
            w: vb.get_with_hints((d_out, d_in), "weight", candle_nn::Init::Uniform { lo: -bound, up: bound })?,
            b: vb.get_with_hints(d_out, "bias", candle_nn::Init::Const(0.0))?,
        })
    }
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_matmul(&self.w.t()?)?.broadcast_add(&self.b)
    }
}

pub(crate) struct Norm {
    w: Tensor,
    b: Tensor,
    eps: f32,
}

impl Norm {
    pub(crate) fn new(vb: &VarBuilder, h: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            w: vb.get_with_hints(h, "weight", candle_nn::Init::Const(1.0))?,
            b: vb.get_with_hints(h, "bias", candle_nn::Init::Const(0.0))?,
            eps: eps as f32,
        })
    }
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // The fused layer_norm op has no backward pass; this one is built from basic ops.
        candle_nn::ops::layer_norm_slow(x, &self.w, &self.b, self.eps)
    }
}

/// BERT's transformer layer (post-LN), named as PyTorch names it, on `[B, L, H]` with an
/// additive key mask `[B, 1, 1, L]`.
pub(crate) struct TrainLayer {
    q: Dense,
    k: Dense,
    v: Dense,
    o: Dense,
    ln1: Norm,
    inter: Dense,
    out: Dense,
    ln2: Norm,
    heads: usize,
}

impl TrainLayer {
    /// BERT's names, or MPNet's (`attention.attn.{q,k,v,o}`, `attention.LayerNorm`) when `cfg`
    /// is an MPNet config; MPNet's relative bias comes with the mask (see [`RelativeBias`]).
    pub(crate) fn new(vb: VarBuilder, cfg: &BertConfig) -> candle_core::Result<Self> {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let a = vb.pp("attention");
        let names = match concierge_models::bert::is_mpnet(cfg) {
            true => ["attn.q", "attn.k", "attn.v", "attn.o", "LayerNorm"],
            false => ["self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"],
        };
        Ok(Self {
            q: Dense::new(&a.pp(names[0]), h, h)?,
            k: Dense::new(&a.pp(names[1]), h, h)?,
            v: Dense::new(&a.pp(names[2]), h, h)?,
            o: Dense::new(&a.pp(names[3]), h, h)?,
            ln1: Norm::new(&a.pp(names[4]), h, cfg.layer_norm_eps)?,
            inter: Dense::new(&vb.pp("intermediate.dense"), h, f)?,
            out: Dense::new(&vb.pp("output.dense"), f, h)?,
            ln2: Norm::new(&vb.pp("output.LayerNorm"), h, cfg.layer_norm_eps)?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `mask`: additive, `[B, 1, 1, L]`, or `[B, heads, L, L]` with a relative bias in it.
    pub(crate) fn forward(&self, x: &Tensor, mask: &Tensor, drop: &mut Dropout) -> candle_core::Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let d = h / self.heads;
        let split = |t: Tensor| t.reshape((b, l, self.heads, d))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (split(self.q.forward(x)?)?, split(self.k.forward(x)?)?, split(self.v.forward(x)?)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?.broadcast_add(mask)?;
        let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let ctx = p.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))?;
        let a = drop.apply(&self.o.forward(&ctx)?)?;
        let x = self.ln1.forward(&(x + a)?)?;
        let i = self.inter.forward(&x)?.gelu_erf()?;
        let o = drop.apply(&self.out.forward(&i)?)?;
        self.ln2.forward(&(x + o)?)
    }
}

/// MPNet's relative-position bias (`encoder.relative_attention_bias.weight`, `[32, heads]`),
/// kept frozen at the encoder's values while top layers are fine-tuned (so the served branch
/// and the shared encoder below it agree), added to the attention mask.
pub(crate) struct RelativeBias {
    pub(crate) weight: Tensor,
}

impl RelativeBias {
    /// The encoder's table when `cfg` is MPNet's, else None.
    pub(crate) fn from_encoder(cfg: &BertConfig, weights: &HashMap<String, Tensor>, path: &Path) -> anyhow::Result<Option<Self>> {
        if !concierge_models::bert::is_mpnet(cfg) {
            return Ok(None);
        }
        Ok(Some(Self { weight: encoder_weight(weights, "encoder.relative_attention_bias.weight", path)? }))
    }

    /// `mask [B, 1, 1, L]` plus the bias of every query-key offset: `[B, heads, L, L]`.
    pub(crate) fn add_to(&self, mask: &Tensor) -> candle_core::Result<Tensor> {
        let l = mask.dim(3)?;
        let buckets: Vec<u32> = (0..l)
            .flat_map(|i| (0..l).map(move |j| concierge_models::bert::mpnet_bucket(j as i64 - i as i64) as u32))
            .collect();
        let idx = Tensor::from_vec(buckets, l * l, mask.device())?;
        let heads = self.weight.dim(1)?;
        let bias = self.weight.to_device(mask.device())?.index_select(&idx, 0)?.reshape((l, l, heads))?.permute((2, 0, 1))?;
        mask.broadcast_add(&bias.unsqueeze(0)?)
    }
}

/// Dropout with masks from our seeded RNG (None: evaluation).
pub(crate) struct Dropout<'a>(pub(crate) Option<(f32, &'a mut Rng)>);

impl Dropout<'_> {
    pub(crate) fn apply(&mut self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Some((p, rng)) = self.0.as_mut() else { return Ok(x.clone()) };
        if *p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - *p;
        let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.uniform() < keep { 1.0 / keep } else { 0.0 }).collect();
        x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?)
    }
}


/// Pads `[len_i, W]` rows to `[B, max_len, W]` (zeros past each length), with the mask
/// `[B, max_len]` (1 on real rows).
pub(crate) fn pad_rows(rows: &[&Tensor], device: &Device) -> anyhow::Result<(Tensor, Tensor)> {
    let max = rows.iter().map(|r| r.dim(0)).collect::<Result<Vec<_>, _>>()?.into_iter().max().unwrap_or(1);
    let width = rows[0].dim(1)?;
    let mut padded = Vec::with_capacity(rows.len());
    let mut mask = Vec::with_capacity(rows.len() * max);
    for r in rows {
        let n = r.dim(0)?;
        padded.push(if n < max { Tensor::cat(&[(*r).clone(), Tensor::zeros((max - n, width), DType::F32, device)?], 0)? } else { (*r).clone() });
        mask.extend((0..max).map(|i| if i < n { 1f32 } else { 0.0 }));
    }
    Ok((Tensor::stack(&padded, 0)?, Tensor::from_vec(mask, (rows.len(), max), device)?))
}


/// The encoder checkpoint's tensor for a trainable layer's variable `name` (`encoder.layer...`,
/// also found under the `bert.` or `mpnet.` prefix), as f32; `path` names the checkpoint in the error.
pub(crate) fn encoder_weight(weights: &HashMap<String, Tensor>, name: &str, path: &Path) -> anyhow::Result<Tensor> {
    let t = weights
        .get(name)
        .or_else(|| weights.get(&format!("bert.{name}")))
        .or_else(|| weights.get(&format!("mpnet.{name}")))
        .with_context(|| format!("{} has no {name}", path.display()))?;
    Ok(t.to_dtype(DType::F32)?)
}
