//! BERT (Devlin et al., 2019, "BERT: Pre-training of Deep Bidirectional Transformers for
//! Language Understanding") as a sentence encoder over *packed* batches: the tokens of every
//! sequence in a batch are laid end to end in one `[T, H]` matrix, so the dense layers never
//! compute padding. Only attention needs sequence boundaries: on CPU a fused variable-length
//! kernel (`concierge_kernels::attention`) reads them directly; elsewhere the batch is padded
//! to its longest member for attention alone, with padding masked out.
//!
//! Weights are named as in PyTorch's `transformers.BertModel` (`embeddings.word_embeddings`,
//! `encoder.layer.N.attention.self.query`, ...), with or without the `bert.` prefix that task
//! checkpoints carry. candle-transformers' `BertModel` is the reference it is tested against.
//!
//! The same code runs MPNet (Song et al., 2020; `model_type: "mpnet"`, e.g. all-mpnet-base-v2),
//! which is BERT's post-LN layer with three differences: no token-type embeddings, positions
//! counted from `pad_token_id + 1`, and a learned relative-position bias (32 buckets per head,
//! `encoder.relative_attention_bias`) added to every layer's attention scores. Its weights keep
//! `transformers.MPNetModel`'s names (`encoder.layer.N.attention.attn.q`, ...);
//! `scripts/make_mpnet_fixture.py` is the NumPy reference it is tested against. RoBERTa
//! (`model_type: "roberta"`) is BERT with positions counted from `pad_token_id + 1`, tested the
//! same way.
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use concierge_kernels::attention::RelativeBias;
use concierge_kernels::linear::{Act, PackedLinear};
pub use candle_transformers::models::bert::{Config, HiddenAct, PositionEmbeddingType};

use crate::error::{ModelError, Result};

/// MPNet's relative-position buckets and the distance past which they stop growing
/// (`transformers`' `MPNetEncoder`; the only values its checkpoints use).
const MPNET_BUCKETS: usize = 32;
const MPNET_MAX_DISTANCE: usize = 128;

/// Whether `cfg` describes an MPNet checkpoint (rather than BERT or RoBERTa).
pub fn is_mpnet(cfg: &Config) -> bool {
    cfg.model_type.as_deref() == Some("mpnet")
}

/// Reads a BERT or MPNet `config.json`. MPNet's has no `type_vocab_size` (it has no token
/// types: one all-zero type row stands in) and names its bucket count, which must be 32.
pub fn read_config(path: &Path) -> Result<Config> {
    let bad = |reason: String| ModelError::BadFile { path: path.to_owned(), reason };
    let mut value: serde_json::Value = crate::encoder::read_json(path, "a BERT or MPNet config.json")?;
    if value.get("model_type").and_then(|t| t.as_str()) == Some("mpnet") {
        let buckets = value.get("relative_attention_num_buckets").and_then(|b| b.as_u64()).unwrap_or(MPNET_BUCKETS as u64);
        if buckets != MPNET_BUCKETS as u64 {
            return Err(bad(format!("relative_attention_num_buckets {buckets}: MPNet checkpoints use {MPNET_BUCKETS}")));
        }
        if let Some(map) = value.as_object_mut() {
            map.entry("type_vocab_size").or_insert(1.into());
        }
    }
    serde_json::from_value(value).map_err(|e| bad(format!("expected a BERT or MPNet config.json (hidden_size, num_attention_heads, ...): {e}")))
}

/// `transformers`' `MPNetEncoder.relative_position_bucket` for one key-minus-query offset.
/// Bucket edges fall where `ln(n / 8) / ln(16) * 8` is a whole number; PyTorch's float32
/// arithmetic lands on them exactly (n = 16, 32, 64), so this computes in f64 with a nudge of
/// 1e-9 against f64's own rounding there.
pub fn mpnet_bucket(relative: i64) -> usize {
    let half = (MPNET_BUCKETS / 2) as i64;
    let max_exact = half / 2;
    let n = -relative;
    let side = if n < 0 { half } else { 0 };
    let n = n.abs();
    let within = if n < max_exact {
        n
    } else {
        let log_ratio = (n as f64 / max_exact as f64).ln() / (MPNET_MAX_DISTANCE as f64 / max_exact as f64).ln();
        (max_exact + (log_ratio * (half - max_exact) as f64 + 1e-9) as i64).min(half - 1)
    };
    (side + within) as usize
}

/// MPNet's learned relative bias (`[buckets, heads]`), expanded per batch for the attention
/// kernel.
struct RelativeTable {
    /// `[buckets][heads]`, f32.
    weight: Vec<f32>,
    heads: usize,
}

impl RelativeTable {
    fn load(vb: &VarBuilder, heads: usize) -> Result<Self> {
        let w = vb.get((MPNET_BUCKETS, heads), "encoder.relative_attention_bias.weight")?;
        Ok(Self { weight: w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, heads })
    }

    /// The bias of every offset between sequences of up to `span` tokens.
    fn expand(&self, span: usize) -> RelativeBias {
        let width = 2 * span - 1;
        let mut table = vec![0f32; self.heads * width];
        for k in 0..width {
            let bucket = mpnet_bucket(k as i64 - (span as i64 - 1));
            for h in 0..self.heads {
                table[h * width + k] = self.weight[bucket * self.heads + h];
            }
        }
        RelativeBias { table, span }
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    /// Weights in f32 whatever the checkpoint's dtype: a half-precision encoder normalises its
    /// f32 residual stream (see [`BertLayers`]).
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        let get = |name: &str| -> Result<Tensor> { Ok(vb.get(size, name)?.to_dtype(DType::F32)?) };
        Ok(Self { weight: get("weight")?, bias: get("bias")?, eps: eps as f32 })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fast_cpu(x) {
            return Ok(concierge_kernels::norm::layer_norm(x, &self.weight, &self.bias, self.eps)?);
        }
        Ok(candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps)?)
    }
}

/// Whether the fused CPU kernels apply: an f32 tensor on the CPU.
fn fast_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// A dense layer holding `W^T` (`[in, out]`, contiguous) so `x @ W^T` needs no transpose.
/// On CPU in f32, `W^T` is also packed once for the fused GEMM (bias, activation and residual
/// applied as the tiles are written).
struct Linear {
    wt: Tensor,
    bias: Tensor,
    packed: Option<PackedLinear>,
}

impl Linear {
    fn new(wt: Tensor, bias: Tensor) -> Result<Self> {
        let packed = if fast_cpu(&wt) { Some(PackedLinear::new(&wt, Some(&bias))?) } else { None };
        Ok(Self { wt, bias, packed })
    }

    fn load(vb: VarBuilder, d_in: usize, d_out: usize) -> Result<Self> {
        let w = vb.get((d_out, d_in), "weight")?;
        Self::new(w.t()?.contiguous()?, vb.get(d_out, "bias")?)
    }
    /// q, k and v fused into one `[in, 3 * out]` product.
    fn load_fused(vbs: &[VarBuilder], d_in: usize, d_out: usize) -> Result<Self> {
        let ws = vbs.iter().map(|vb| vb.get((d_out, d_in), "weight")).collect::<Result<Vec<_>, _>>()?;
        let bs = vbs.iter().map(|vb| vb.get(d_out, "bias")).collect::<Result<Vec<_>, _>>()?;
        Self::new(Tensor::cat(&ws, 0)?.t()?.contiguous()?, Tensor::cat(&bs, 0)?)
    }

    /// `act(x @ W^T + b) [+ residual]`.
    fn forward(&self, x: &Tensor, act: Option<HiddenAct>, residual: Option<&Tensor>) -> Result<Tensor> {
        if let Some(p) = self.packed.as_ref().filter(|_| fast_cpu(x) && residual.is_none_or(fast_cpu)) {
            let act = match act {
                None => Act::None,
                Some(HiddenAct::Gelu) => Act::GeluErf,
                Some(HiddenAct::GeluApproximate) => Act::GeluTanh,
                Some(HiddenAct::Relu) => Act::Relu,
            };
            return Ok(p.forward(&x.contiguous()?, act, residual.map(|r| r.contiguous()).transpose()?.as_ref())?);
        }
        let y = x.matmul(&self.wt)?.broadcast_add(&self.bias)?;
        let y = match act {
            None => y,
            Some(HiddenAct::Gelu) => y.gelu_erf()?,
            Some(HiddenAct::GeluApproximate) => y.gelu()?,
            Some(HiddenAct::Relu) => y.relu()?,
        };
        Ok(match residual {
            Some(r) => (y + r)?,
            None => y,
        })
    }
}

struct Layer {
    qkv: Linear,
    attn_out: Linear,
    attn_ln: LayerNorm,
    inter: Linear,
    out: Linear,
    out_ln: LayerNorm,
}

/// A run of transformer layers (`encoder.layer.N` for N in a range) over packed token states:
/// the whole encoder's stack, or the top layers a task head fine-tuned for itself (a *branch*
/// that continues from the shared encoder's states at some layer).
pub struct BertLayers {
    layers: Vec<Layer>,
    first: usize,
    act: HiddenAct,
    heads: usize,
    /// MPNet's relative-position bias, shared by its layers.
    relative: Option<RelativeTable>,
}

impl BertLayers {
    /// Layers `range` of `cfg`, from a VarBuilder at the model root (`encoder.layer.N...`, with
    /// or without the `bert.` prefix).
    /// MPNet's layers (`cfg.model_type == "mpnet"`) read `encoder.layer.N.attention.attn.*` and
    /// the shared `encoder.relative_attention_bias`, with or without the `mpnet.` prefix.
    pub fn load(vb: VarBuilder, cfg: &Config, range: std::ops::Range<usize>) -> Result<Self> {
        let mpnet = is_mpnet(cfg);
        let probe = match mpnet {
            true => format!("encoder.layer.{}.attention.attn.q.weight", range.start),
            false => format!("encoder.layer.{}.attention.self.query.weight", range.start),
        };
        let vb = match (vb.contains_tensor(&probe), mpnet) {
            (true, _) => vb,
            (false, true) => vb.pp("mpnet"),
            (false, false) => vb.pp("bert"),
        };
        let h = cfg.hidden_size;
        let first = range.start;
        let relative = if mpnet { Some(RelativeTable::load(&vb, cfg.num_attention_heads)?) } else { None };
        let layers = range
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let a = l.pp("attention");
                let (qkv, attn_out, attn_ln) = match mpnet {
                    true => (
                        Linear::load_fused(&[a.pp("attn.q"), a.pp("attn.k"), a.pp("attn.v")], h, h)?,
                        Linear::load(a.pp("attn.o"), h, h)?,
                        LayerNorm::load(a.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
                    ),
                    false => (
                        Linear::load_fused(&[a.pp("self.query"), a.pp("self.key"), a.pp("self.value")], h, h)?,
                        Linear::load(a.pp("output.dense"), h, h)?,
                        LayerNorm::load(a.pp("output.LayerNorm"), h, cfg.layer_norm_eps)?,
                    ),
                };
                Ok(Layer {
                    qkv,
                    attn_out,
                    attn_ln,
                    inter: Linear::load(l.pp("intermediate.dense"), h, cfg.intermediate_size)?,
                    out: Linear::load(l.pp("output.dense"), cfg.intermediate_size, h)?,
                    out_ln: LayerNorm::load(l.pp("output.LayerNorm"), h, cfg.layer_norm_eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, first, act: cfg.hidden_act, heads: cfg.num_attention_heads, relative })
    }

    /// Index of the first layer (what a branch continues from).
    pub fn first(&self) -> usize {
        self.first
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Runs the layers over packed states `[T, H]` (`lens` sum to T).
    pub fn forward(&self, x: &Tensor, lens: &[usize]) -> Result<Tensor> {
        if x.device().is_cpu() {
            return concierge_kernels::on_cpu_pool(|| self.forward_inner(x.clone(), lens, &[], false).map(|(x, _)| x));
        }
        self.forward_inner(x.clone(), lens, &[], false).map(|(x, _)| x)
    }

    /// Runs the layers over packed states `[T, H]`; also returns the states after the first `n`
    /// of them for each `n` in `taps` (`0`: `x` itself), in that order, f32.
    pub fn forward_taps(&self, x: &Tensor, lens: &[usize], taps: &[usize]) -> Result<(Tensor, Vec<Tensor>)> {
        if let Some(&t) = taps.iter().find(|&&t| t > self.layers.len()) {
            return Err(ModelError::Unsupported(format!("tap after layer {t} of a stack of {}", self.layers.len())));
        }
        if x.device().is_cpu() {
            return concierge_kernels::on_cpu_pool(|| self.forward_inner(x.clone(), lens, taps, false));
        }
        self.forward_inner(x.clone(), lens, taps, false)
    }

    /// Runs the layers; also returns the states after the first `n` of them for each `n` in
    /// `taps` (in that order), and with `stop` runs no further than the deepest tap (the first
    /// result is then that tap's states).
    fn forward_inner(&self, mut x: Tensor, lens: &[usize], taps: &[usize], stop: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let mut tapped: Vec<Option<Tensor>> = vec![None; taps.len()];
        let keep = |tapped: &mut Vec<Option<Tensor>>, n: usize, x: &Tensor| {
            for (slot, _) in tapped.iter_mut().zip(taps).filter(|(_, &t)| t == n) {
                *slot = Some(x.clone());
            }
        };
        let last = if stop { taps.iter().copied().max().unwrap_or(self.layers.len()) } else { self.layers.len() };
        // Half-precision weights (f16/bf16): the dense products run in that dtype, but the
        // residual stream, its sums and the LayerNorms stay in f32, and bf16's attention runs in
        // f32 (all-bf16 gave cosine 0.9985 to f32 on a 256-token sentence, 0.99992 this way;
        // benches/RESULTS.md "GPU").
        let weights = self.layers.first().map(|l| l.qkv.wt.dtype()).unwrap_or(DType::F32);
        if weights != DType::F32 {
            x = x.to_dtype(DType::F32)?;
        }
        keep(&mut tapped, 0, &x);
        if last > 0 {
            // bf16's 8-bit mantissa rounds attention scores too coarsely (a score of 10 moves by
            // 0.06 before the softmax): bf16 attention runs in f32, f16 stays in f16.
            let attn_dtype = if weights == DType::BF16 { DType::F32 } else { weights };
            let bias = self.relative.as_ref().map(|r| r.expand(lens.iter().copied().max().unwrap_or(1)));
            let attention = Attention::new(lens, self.heads, x.device(), attn_dtype, bias)?;
            for (n, layer) in self.layers.iter().enumerate().take(last) {
                if weights == DType::F32 {
                    let qkv = layer.qkv.forward(&x, None, None)?;
                    let ctx = attention.forward(&qkv)?;
                    let a = layer.attn_out.forward(&ctx, None, Some(&x))?;
                    x = layer.attn_ln.forward(&a)?;
                    let i = layer.inter.forward(&x, Some(self.act), None)?;
                    let o = layer.out.forward(&i, None, Some(&x))?;
                    x = layer.out_ln.forward(&o)?;
                } else {
                    let qkv = layer.qkv.forward(&x.to_dtype(weights)?, None, None)?.to_dtype(attn_dtype)?;
                    let ctx = attention.forward(&qkv)?.to_dtype(weights)?;
                    let a = layer.attn_out.forward(&ctx, None, None)?.to_dtype(DType::F32)?;
                    x = layer.attn_ln.forward(&(a + &x)?)?;
                    let i = layer.inter.forward(&x.to_dtype(weights)?, Some(self.act), None)?;
                    let o = layer.out.forward(&i, None, None)?.to_dtype(DType::F32)?;
                    x = layer.out_ln.forward(&(o + &x)?)?;
                }
                keep(&mut tapped, n + 1, &x);
            }
        }
        let tapped = tapped
            .into_iter()
            .zip(taps)
            .map(|(t, n)| t.ok_or_else(|| ModelError::Unsupported(format!("tap after layer {n}: the stack has {}", self.layers.len()))))
            .collect::<Result<Vec<_>>>()?;
        Ok((x, tapped))
    }
}

pub struct BertEncoder {
    word: Tensor,
    position: Tensor,
    /// MPNet: `None` (no token types).
    token_type: Option<Tensor>,
    /// Position of a sequence's first token: 0 for BERT, `pad_token_id + 1` for MPNet and
    /// RoBERTa.
    position_offset: usize,
    emb_ln: LayerNorm,
    layers: BertLayers,
    hidden: usize,
    max_positions: usize,
    span: tracing::Span,
}

/// Token ids of a packed batch: `ids.len() == type_ids.len() == lens.iter().sum()`.
pub struct PackedBatch<'a> {
    pub ids: &'a [u32],
    pub type_ids: &'a [u32],
    pub lens: &'a [usize],
}

impl BertEncoder {
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        if cfg.position_embedding_type != PositionEmbeddingType::Absolute {
            return Err(ModelError::Unsupported("only absolute position embeddings are supported".into()));
        }
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(ModelError::Unsupported(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        // Task checkpoints (BertForSequenceClassification, ...) nest the encoder under `bert.`
        // (`mpnet.` for MPNet's).
        let mpnet = is_mpnet(cfg);
        let vb = match (vb.contains_tensor("embeddings.word_embeddings.weight"), mpnet) {
            (true, _) => vb,
            (false, true) => vb.pp("mpnet"),
            (false, false) => vb.pp("bert"),
        };
        let h = cfg.hidden_size;
        let e = vb.pp("embeddings");
        let layers = BertLayers::load(vb.clone(), cfg, 0..cfg.num_hidden_layers)?;
        // MPNet and RoBERTa count positions from padding_idx + 1 (transformers'
        // create_position_ids_from_input_ids); BERT from 0.
        let roberta = matches!(cfg.model_type.as_deref(), Some("roberta" | "xlm-roberta"));
        let position_offset = if mpnet || roberta { cfg.pad_token_id + 1 } else { 0 };
        Ok(Self {
            word: e.get((cfg.vocab_size, h), "word_embeddings.weight")?,
            position: e.get((cfg.max_position_embeddings, h), "position_embeddings.weight")?,
            token_type: match mpnet {
                true => None,
                false => Some(e.get((cfg.type_vocab_size, h), "token_type_embeddings.weight")?),
            },
            position_offset,
            emb_ln: LayerNorm::load(e.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            layers,
            hidden: h,
            max_positions: cfg.max_position_embeddings.saturating_sub(position_offset),
            span: tracing::span!(tracing::Level::TRACE, "bert"),
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    pub fn device(&self) -> &Device {
        self.word.device()
    }

    /// Number of transformer layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Hidden states of the last layer, packed: `[T, H]`.
    pub fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        self.forward_tapped(batch, None).map(|(x, _)| x)
    }

    /// The last layer's states and, with `tap = Some(n)`, also the states after layer `n`
    /// (`0`: the embeddings), for a head that continues from there with their own top layers.
    pub fn forward_tapped(&self, batch: &PackedBatch, tap: Option<usize>) -> Result<(Tensor, Option<Tensor>)> {
        let taps: Vec<usize> = tap.into_iter().collect();
        self.run(batch, &taps, false).map(|(x, mut t)| (x, t.pop()))
    }

    /// The last layer's states and the states after each layer in `taps` (`0`: the embeddings),
    /// in that order: one pass for heads that read several layers or branch at one.
    pub fn forward_taps(&self, batch: &PackedBatch, taps: &[usize]) -> Result<(Tensor, Vec<Tensor>)> {
        self.run(batch, taps, false)
    }

    /// The states after each layer in `taps`, running no further than the deepest of them (the
    /// first result is that layer's states): for a batch whose readers need nothing above.
    pub fn forward_taps_until(&self, batch: &PackedBatch, taps: &[usize]) -> Result<(Tensor, Vec<Tensor>)> {
        self.run(batch, taps, true)
    }

    /// The states after layer `n` only (`0`: the embeddings): the layers above are not run. For a
    /// batch whose only reader is a head that branches there.
    pub fn forward_until(&self, batch: &PackedBatch, n: usize) -> Result<Tensor> {
        self.run(batch, &[n], true).map(|(x, _)| x)
    }

    fn run(&self, batch: &PackedBatch, taps: &[usize], stop: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let _enter = self.span.enter();
        if self.device().is_cpu() {
            // The CPU kernels split every op over rayon's pool: run the pass on it.
            return concierge_kernels::on_cpu_pool(|| self.forward_inner(batch, taps, stop));
        }
        self.forward_inner(batch, taps, stop)
    }

    fn forward_inner(&self, batch: &PackedBatch, taps: &[usize], stop: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let dev = self.device();
        let total: usize = batch.lens.iter().sum();
        if total != batch.ids.len() || total != batch.type_ids.len() || batch.lens.contains(&0) {
            return Err(ModelError::Unsupported("packed batch lengths do not add up".into()));
        }
        if let Some(&l) = batch.lens.iter().max().filter(|&&l| l > self.max_positions) {
            return Err(ModelError::InputTooLong { index: 0, tokens: l, limit: self.max_positions });
        }
        if let Some(&t) = taps.iter().find(|&&t| t > self.layers.len()) {
            return Err(ModelError::Unsupported(format!("tap after layer {t}: the encoder has {}", self.layers.len())));
        }
        let off = self.position_offset as u32;
        let positions: Vec<u32> = batch.lens.iter().flat_map(|&l| off..off + l as u32).collect();
        let x = match &self.token_type {
            Some(token_type) if fast_cpu(&self.word) => {
                let (ids, types) = (batch.ids, batch.type_ids);
                concierge_kernels::embedding::embedding_sum(&self.word, &self.position, token_type, ids, &positions, types)?
            }
            Some(token_type) => {
                let ids = Tensor::new(batch.ids, dev)?;
                let types = Tensor::new(batch.type_ids, dev)?;
                let positions = Tensor::new(positions, dev)?;
                (self.word.index_select(&ids, 0)? + self.position.index_select(&positions, 0)?)?
                    .add(&token_type.index_select(&types, 0)?)?
            }
            None => {
                let ids = Tensor::new(batch.ids, dev)?;
                let positions = Tensor::new(positions, dev)?;
                (self.word.index_select(&ids, 0)? + self.position.index_select(&positions, 0)?)?
            }
        };
        let x = self.emb_ln.forward(&x.to_dtype(DType::F32)?)?;
        self.layers.forward_inner(x, batch.lens, taps, stop)
    }
}

/// Multi-head self-attention over a packed `[T, 3H]` q|k|v matrix.
struct Attention<'a> {
    lens: &'a [usize],
    heads: usize,
    /// MPNet's relative bias, for the fused kernel.
    bias: Option<RelativeBias>,
    /// For the padded path: which packed row fills each padded slot, and which padded slots
    /// hold real tokens; plus the additive mask, `[B, 1, 1, L]` (with a relative bias
    /// `[B, heads, L, L]`).
    padded: Option<(Tensor, Tensor, Tensor)>,
}

impl<'a> Attention<'a> {
    fn new(lens: &'a [usize], heads: usize, dev: &Device, dtype: DType, bias: Option<RelativeBias>) -> Result<Self> {
        if dev.is_cpu() && dtype == DType::F32 {
            return Ok(Self { lens, heads, bias, padded: None });
        }
        let b = lens.len();
        let l = *lens.iter().max().unwrap_or(&1);
        let (mut gather, mut keep, mut mask) = (Vec::with_capacity(b * l), Vec::new(), Vec::with_capacity(b * l));
        let mut start = 0u32;
        for (s, &len) in lens.iter().enumerate() {
            for i in 0..l {
                let real = i < len;
                gather.push(start + (i.min(len - 1)) as u32);
                mask.push(if real { 0f32 } else { -1e9 });
                if real {
                    keep.push((s * l + i) as u32);
                }
            }
            start += len as u32;
        }
        let mut mask = Tensor::from_vec(mask, (b, 1, 1, l), dev)?;
        if let Some(bias) = &bias {
            // Row i of head h: the table's offsets j - i for j in 0..l.
            let width = 2 * bias.span - 1;
            let mut rel = Vec::with_capacity(heads * l * l);
            for h in 0..heads {
                for i in 0..l {
                    let from = h * width + bias.span - 1 - i;
                    rel.extend_from_slice(&bias.table[from..from + l]);
                }
            }
            mask = Tensor::from_vec(rel, (1, heads, l, l), dev)?.broadcast_add(&mask)?;
        }
        Ok(Self { lens, heads, bias: None, padded: Some((Tensor::new(gather, dev)?, Tensor::new(keep, dev)?, mask)) })
    }

    fn forward(&self, qkv: &Tensor) -> Result<Tensor> {
        let (_, h3) = qkv.dims2()?;
        let h = h3 / 3;
        let Some((gather, keep, mask)) = &self.padded else {
            return Ok(concierge_kernels::attention::varlen_self_attention_biased(qkv, self.lens, self.heads, self.bias.clone())?);
        };
        let (b, d) = (self.lens.len(), h / self.heads);
        let l = gather.dim(0)? / b;
        let x = qkv.index_select(gather, 0)?.reshape((b, l, 3, self.heads, d))?;
        let part = |i: usize| -> Result<Tensor> {
            Ok(x.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask.to_dtype(q.dtype())?)?;
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = p.matmul(&v)?.transpose(1, 2)?.reshape((b * l, h))?;
        Ok(ctx.index_select(keep, 0)?)
    }
}

/// candle-transformers' reference BERT on a padded batch, for tests: `[B, L, H]`.
pub fn reference_forward(vb: VarBuilder, cfg: &Config, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") { vb } else { vb.pp("bert") };
    let model = candle_transformers::models::bert::BertModel::load(vb, cfg)?;
    Ok(model.forward(ids, types, Some(mask))?)
}
