//! Frozen contextual character features from Baidu's LAC lexical analyser (the small model that
//! jieba bundles; github.com/baidu/lac, Apache-2.0): a character embedding and two bidirectional
//! GRU layers, trained by Baidu for word segmentation, part-of-speech and entity tagging. For a
//! Chinese tagger it is what a pretrained encoder is for an English one: each character's
//! features say what word it belongs to and what kind of word, learned from far more text than a
//! tagging set has. The tagger reads the outputs of the GRU layers it names (`layers`), side by
//! side, after its own character features; LAC's weights are never trained with it.
//!
//! Weights keep LAC's PaddlePaddle names under `lac.`: `word_emb` `[vocab, dim]`; per GRU `k`
//! (layer `i` has the forward GRU `2i` and the reverse GRU `2i + 1`) its input projection
//! `fc_k.w_0` `[in, 3H]` and `fc_k.b_0` `[3H]`, then `gru_k.w_0` and `gru_k.b_0` `[1, 3H]`.
//! `gru_k.w_0` is declared `[H, 3H]` but holds Paddle's memory layout, which is not that matrix:
//! its first `2H * H` values are the update and reset gates' `[H, 2H]` (row-major), the last
//! `H * H` the candidate's `[H, H]`. Paddle's `dynamic_gru` (`origin_mode=False`), per step:
//! `u, r = sigmoid(x_ur + h W_ur)`, `c = tanh(x_c + (r * h) W_c)`, `h = (1 - u) * h + u * c`,
//! where `x` is the projected input plus the GRU bias.
//!
//! LAC looks characters up in its `word.dic` after folding full-width ASCII to half-width;
//! anything else is its `OOV` row.
use candle_core::{DType, IndexOp, Tensor};
use candle_nn::{Embedding, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use super::crf::{check_lengths, length_mask};
use super::lstm::{add_vec_mat, sigmoid, Reversal};
use super::Vocab;
use crate::error::{ModelError, Result};

/// The LAC token standing for characters outside its vocabulary.
pub const LAC_UNK: &str = "OOV";

/// A tagger's `lac` config entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LacConfig {
    /// Rows of `lac.word_emb` (LAC small: 20,941).
    pub vocab_size: usize,
    /// Character embedding width (128).
    pub dim: usize,
    /// GRU hidden size per direction (128).
    pub hidden: usize,
    /// Bidirectional GRU layers (2).
    pub num_layers: usize,
    /// The layers (1-based) whose outputs are the features, in this order.
    pub layers: Vec<usize>,
}

impl LacConfig {
    /// LAC small's shape, reading `layers`.
    pub fn small(layers: Vec<usize>) -> Self {
        Self { vocab_size: 20941, dim: 128, hidden: 128, num_layers: 2, layers }
    }

    /// Width of a character's LAC features.
    pub fn feature_dim(&self) -> usize {
        2 * self.hidden * self.layers.len()
    }

    pub(super) fn validate(&self) -> std::result::Result<(), String> {
        if self.vocab_size == 0 || self.dim == 0 || self.hidden == 0 || self.num_layers == 0 {
            return Err("lac: vocab_size, dim, hidden and num_layers must be positive".into());
        }
        if self.layers.is_empty() || self.layers.iter().any(|&l| l == 0 || l > self.num_layers) {
            return Err(format!("lac: layers must name at least one of layers 1..={}", self.num_layers));
        }
        Ok(())
    }
}

/// Full-width ASCII (U+FF01–U+FF5E) to ASCII and the ideographic space to a space, as LAC
/// normalises its input.
pub fn half_width(s: &str) -> String {
    s.chars().map(half_width_char).collect()
}

fn half_width_char(c: char) -> char {
    match c as u32 {
        0x3000 => ' ',
        u @ 0xFF01..=0xFF5E => char::from_u32(u - 0xFEE0).unwrap_or(c),
        _ => c,
    }
}

/// LAC's character id of `token` in its vocabulary (`OOV` for the unknown). Runs per character
/// of every request: folds (and allocates) only tokens that need it.
pub fn lac_id(vocab: &Vocab, token: &str) -> u32 {
    if token.chars().all(|c| half_width_char(c) == c) {
        vocab.id(token)
    } else {
        vocab.id(&half_width(token))
    }
}

/// One GRU direction (see the module header).
#[derive(Debug, Clone)]
struct Gru {
    /// `[in, 3H]`.
    proj_w: Tensor,
    /// The input projection's bias and the GRU's, `[3H]` each; added at every call, so a
    /// network being fine-tuned (its tensors variables) always reads their current values.
    proj_b: Tensor,
    bias: Tensor,
    /// `[H, 2H]`: update then reset gate.
    w_ur: Tensor,
    /// `[H, H]`.
    w_c: Tensor,
    /// `w_ur` and `w_c` as plain rows for [`Self::forward_cpu`], read once at load; None unless
    /// the weights are f32 on the CPU and not being trained (variables).
    cpu: Option<(Vec<f32>, Vec<f32>)>,
}

impl Gru {
    /// GRU `k` over inputs `in_dim` wide, its tensors fetched (once each) through `get`.
    fn load(get: &mut impl FnMut(Vec<usize>, String) -> Result<Tensor>, k: usize, in_dim: usize, hidden: usize) -> Result<Self> {
        let h3 = 3 * hidden;
        let proj_w = get(vec![in_dim, h3], format!("fc_{k}.w_0"))?;
        let proj_b = get(vec![h3], format!("fc_{k}.b_0"))?;
        let w = get(vec![hidden, h3], format!("gru_{k}.w_0"))?.flatten_all()?;
        let b = get(vec![1, h3], format!("gru_{k}.b_0"))?.flatten_all()?;
        let w_ur = w.narrow(0, 0, 2 * hidden * hidden)?.reshape((hidden, 2 * hidden))?;
        let w_c = w.narrow(0, 2 * hidden * hidden, hidden * hidden)?.reshape((hidden, hidden))?;
        let cpu = if proj_w.device().is_cpu() && proj_w.dtype() == DType::F32 && !proj_w.is_variable() {
            Some((w_ur.flatten_all()?.to_vec1()?, w_c.flatten_all()?.to_vec1()?))
        } else {
            None
        };
        // Views of the stored tensor (no copy), so they follow it when it is trained.
        Ok(Self { proj_w, proj_b, bias: b, w_ur, w_c, cpu })
    }

    /// `x @ W + b`, every step's input projection in one product, `[B, L, 3H]`.
    fn project(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let h3 = self.proj_w.dim(1)?;
        Ok(x.reshape((b * l, d))?.matmul(&self.proj_w)?.broadcast_add(&(&self.proj_b + &self.bias)?)?.reshape((b, l, h3))?)
    }

    /// Inference on the CPU in f32: the recurrence in plain loops over each sequence's own
    /// characters (`reverse`: from its last one), `[B, L, H]`, zero at padding. Stepping a
    /// 128-wide GRU through candle's ops costs more in dispatch than in arithmetic; these loops
    /// do the same arithmetic as [`Self::forward`] (checked against it).
    fn forward_cpu(&self, x: &Tensor, lengths: &[usize], reverse: bool) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let hidden = self.w_c.dim(0)?;
        let (h2, h3) = (2 * hidden, 3 * hidden);
        let (w_ur, w_c) = self.cpu.as_ref().expect("forward_cpu only where cpu_inference says so");
        let xp: Vec<f32> = self.project(x)?.flatten_all()?.to_vec1()?;
        let mut out = vec![0f32; b * l * hidden];
        let (mut h, mut ur, mut rh, mut c) = (vec![0f32; hidden], vec![0f32; h2], vec![0f32; hidden], vec![0f32; hidden]);
        for (s, &n) in lengths.iter().enumerate() {
            h.fill(0.0);
            for step in 0..n {
                let t = if reverse { n - 1 - step } else { step };
                let g = &xp[(s * l + t) * h3..(s * l + t + 1) * h3];
                ur.copy_from_slice(&g[..h2]);
                add_vec_mat(&mut ur, &h, w_ur);
                for u in ur.iter_mut() {
                    *u = sigmoid(*u);
                }
                for ((r, &gate), &hi) in rh.iter_mut().zip(&ur[hidden..]).zip(&h) {
                    *r = gate * hi;
                }
                c.copy_from_slice(&g[h2..]);
                add_vec_mat(&mut c, &rh, w_c);
                for ((hj, &u), &cj) in h.iter_mut().zip(&ur[..hidden]).zip(&c) {
                    *hj += u * (cj.tanh() - *hj);
                }
                out[(s * l + t) * hidden..(s * l + t + 1) * hidden].copy_from_slice(&h);
            }
        }
        Ok(Tensor::from_vec(out, (b, l, hidden), x.device())?)
    }

    /// Whether [`Self::forward_cpu`] applies: CPU, f32, and nothing to differentiate (a network
    /// being fine-tuned holds variables).
    fn cpu_inference(&self, x: &Tensor) -> bool {
        self.cpu.is_some() && x.device().is_cpu() && x.dtype() == DType::F32
    }

    /// Hidden states `[B, L, H]` over `x` `[B, L, in]` from zero state, left to right.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let hidden = self.w_c.dim(0)?;
        // Step-major, so each step's rows are contiguous.
        let xp = self.project(x)?.transpose(0, 1)?.contiguous()?;
        let mut h = Tensor::zeros((b, hidden), x.dtype(), x.device())?;
        let mut out = Vec::with_capacity(l);
        for t in 0..l {
            let g = xp.i(t)?;
            let ur = candle_nn::ops::sigmoid(&(g.narrow(1, 0, 2 * hidden)? + h.matmul(&self.w_ur)?)?)?;
            let u = ur.narrow(1, 0, hidden)?;
            let r = ur.narrow(1, hidden, hidden)?;
            let c = (g.narrow(1, 2 * hidden, hidden)? + (r * &h)?.matmul(&self.w_c)?)?.tanh()?;
            h = (&h + (u * (c - &h)?)?)?;
            out.push(h.clone());
        }
        Ok(Tensor::stack(&out, 1)?)
    }
}

/// LAC's embedding and BiGRU layers, frozen, with the vocabulary it reads.
#[derive(Debug, Clone)]
pub struct Lac {
    cfg: LacConfig,
    vocab: Vocab,
    word_emb: Embedding,
    /// (forward, reverse) per layer.
    layers: Vec<(Gru, Gru)>,
    /// Every tensor under its checkpoint name (without `lac.`), for saving.
    named: Vec<(String, Tensor)>,
    /// Whether CPU f32 inference takes the plain-loop recurrence (see `Gru::forward_cpu`).
    fast: bool,
}

impl Lac {
    /// From `vb` (the `lac.` prefix of a tagger checkpoint, or a converted LAC folder) and its
    /// vocabulary (`OOV` must be in it). A missing or mis-shaped tensor is an error naming it.
    pub fn load(vb: &VarBuilder, cfg: &LacConfig, vocab: Vocab) -> Result<Self> {
        cfg.validate().map_err(ModelError::Unsupported)?;
        if vocab.id_bound() > cfg.vocab_size {
            return Err(ModelError::Unsupported(format!(
                "a LAC vocabulary with ids up to {} for {} embedding rows",
                vocab.id_bound() - 1,
                cfg.vocab_size
            )));
        }
        let mut named = Vec::new();
        let mut get = |shape: Vec<usize>, name: String| -> Result<Tensor> {
            let t = vb.get(shape, &name)?;
            named.push((name, t.clone()));
            Ok(t)
        };
        let emb = get(vec![cfg.vocab_size, cfg.dim], "word_emb".into())?;
        let h = cfg.hidden;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let in_dim = if i == 0 { cfg.dim } else { 2 * h };
            layers.push((Gru::load(&mut get, 2 * i, in_dim, h)?, Gru::load(&mut get, 2 * i + 1, in_dim, h)?));
        }
        Ok(Self { cfg: cfg.clone(), vocab, word_emb: Embedding::new(emb, cfg.dim), layers, named, fast: true })
    }

    /// With `false`, every pass steps through candle's tensor ops (the reference the CPU loops
    /// are checked against).
    pub fn with_cpu_loops(mut self, on: bool) -> Self {
        self.fast = on;
        self
    }

    pub fn config(&self) -> &LacConfig {
        &self.cfg
    }

    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// LAC's id of a token (see [`lac_id`]).
    pub fn id(&self, token: &str) -> u32 {
        lac_id(&self.vocab, token)
    }

    /// Every tensor under its name without the `lac.` prefix.
    pub fn tensors(&self) -> &[(String, Tensor)] {
        &self.named
    }

    /// The outputs of every layer, `[B, L, 2H]` each (forward then reverse, zero at padding),
    /// for LAC ids `[B, L]` (u32).
    pub fn layer_outputs(&self, ids: &Tensor, lengths: &[usize]) -> Result<Vec<Tensor>> {
        let (b, l) = ids.dims2()?;
        check_lengths(lengths, b, l)?;
        let mask = length_mask(lengths, l, ids.device())?.to_dtype(self.word_emb.embeddings().dtype())?.unsqueeze(2)?;
        let mut x = self.word_emb.forward(ids)?;
        // The tensor-op path runs the reverse GRUs on each sequence reversed within its length.
        let reversal = if self.fast && self.layers[0].0.cpu_inference(&x) { None } else { Some(Reversal::new(lengths, l, ids.device())?) };
        let mut outs = Vec::with_capacity(self.layers.len());
        for (fwd, rev) in &self.layers {
            let (f, r) = match &reversal {
                None => {
                    // The two directions are independent: one on each core.
                    let (f, r) = rayon::join(|| fwd.forward_cpu(&x, lengths, false), || rev.forward_cpu(&x, lengths, true));
                    (f?, r?)
                }
                Some(reversal) => (fwd.forward(&x)?, reversal.apply(&rev.forward(&reversal.apply(&x)?)?)?),
            };
            x = Tensor::cat(&[f, r], 2)?.broadcast_mul(&mask)?;
            outs.push(x.clone());
        }
        Ok(outs)
    }

    /// The features the tagger reads: the outputs of the config's `layers`, side by side,
    /// `[B, L, feature_dim]`, in `dtype`.
    pub fn features(&self, ids: &Tensor, lengths: &[usize], dtype: DType) -> Result<Tensor> {
        let outs = self.layer_outputs(ids, lengths)?;
        let parts: Vec<&Tensor> = self.cfg.layers.iter().map(|&n| &outs[n - 1]).collect();
        Ok(Tensor::cat(&parts, 2)?.to_dtype(dtype)?)
    }
}
