//! The bidirectional, multi-layer LSTM of the tagger over padded batches, in candle tensor ops
//! (PyTorch's gate order i, f, g, o and its weight names, so `nn.LSTM` checkpoints load).
//!
//! Padding never reaches a real position: the forward direction reads left to right, so the
//! padding after a sequence comes too late to matter; the backward direction runs on each
//! sequence reversed within its own length (its padding stays at the end) and is reversed back,
//! which is what PyTorch's packed sequences compute. Outputs at padded positions are zero, as
//! `pad_packed_sequence` leaves them.
use candle_core::{IndexOp, Tensor};
use candle_nn::{Init, VarBuilder};

use super::crf::{check_lengths, length_mask};
use super::Params;
use crate::error::Result;

/// Reverses each sequence of a padded batch `[B, L, D]` within its own length (its padding
/// stays at the end): how a backward recurrence runs as a forward one. Its own inverse.
pub(super) struct Reversal {
    rows: Tensor,
    b: usize,
    l: usize,
}

impl Reversal {
    pub(super) fn new(lengths: &[usize], l: usize, device: &candle_core::Device) -> Result<Self> {
        // Row index of each (sequence, step) in the sequence-wise reversal.
        let rows: Vec<u32> = lengths
            .iter()
            .enumerate()
            .flat_map(|(s, &n)| (0..l).map(move |t| (s * l + if t < n { n - 1 - t } else { t }) as u32))
            .collect();
        Ok(Self { rows: Tensor::from_vec(rows, (lengths.len() * l,), device)?, b: lengths.len(), l })
    }

    pub(super) fn apply(&self, t: &Tensor) -> Result<Tensor> {
        let d = t.dim(2)?;
        Ok(t.reshape((self.b * self.l, d))?.index_select(&self.rows, 0)?.reshape((self.b, self.l, d))?)
    }
}

#[derive(Debug, Clone)]
pub struct BiLstm {
    /// (forward, backward) per layer.
    layers: Vec<(Cell, Cell)>,
    /// Per layer, both directions' input projections packed for the CPU GEMM (inference, f32 on
    /// the CPU; see [`Self::pack_for_cpu`]).
    packed: Option<Vec<Packed>>,
    hidden: usize,
    dropout: f32,
}

/// `[W_ih fwd; W_ih bwd]^T` with the summed biases, packed once.
#[derive(Clone)]
struct Packed(concierge_kernels::linear::PackedLinear);

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Packed({} -> {})", self.0.in_dim(), self.0.out_dim())
    }
}

/// One direction of one layer: PyTorch's `weight_ih` `[4H, D]`, `weight_hh` `[4H, H]` and the
/// two biases, gates in the order i, f, g, o.
#[derive(Debug, Clone)]
struct Cell {
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor,
    b_hh: Tensor,
}

impl Cell {
    /// Hidden states `[B, L, H]` over `x` `[B, L, D]` from zero state, left to right. The input
    /// projection of every step is one matrix product up front (the bulk of the work when D is
    /// wide, as a tagger over several encoder layers is); each step then adds `h @ W_hh^T` and
    /// runs the gates. The same arithmetic as candle-nn's LSTM cell, which steps both products.
    fn seq(&self, x: &Tensor) -> Result<Tensor> {
        self.steps(&self.project(x)?)
    }

    /// `x @ W_ih^T + b_ih + b_hh`, `[B, L, 4H]`.
    fn project(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let h4 = self.w_hh.dim(0)?;
        Ok(x.reshape((b * l, d))?
            .matmul(&self.w_ih.t()?)?
            .broadcast_add(&self.b_ih)?
            .broadcast_add(&self.b_hh)?
            .reshape((b, l, h4))?)
    }

    /// The recurrence over projected inputs `xw` `[B, L, 4H]`: hidden states `[B, L, H]`.
    fn steps(&self, xw: &Tensor) -> Result<Tensor> {
        let (b, l, h4) = xw.dims3()?;
        let hidden = h4 / 4;
        let w_hh_t = self.w_hh.t()?;
        let mut h = Tensor::zeros((b, hidden), xw.dtype(), xw.device())?;
        let mut c = h.clone();
        let mut out = Vec::with_capacity(l);
        for t in 0..l {
            let gates = (xw.i((.., t, ..))? + h.matmul(&w_hh_t)?)?;
            let chunks = gates.chunk(4, 1)?;
            let i = candle_nn::ops::sigmoid(&chunks[0])?;
            let f = candle_nn::ops::sigmoid(&chunks[1])?;
            let g = chunks[2].tanh()?;
            let o = candle_nn::ops::sigmoid(&chunks[3])?;
            c = ((f * &c)? + (i * g)?)?;
            h = (o * c.tanh()?)?;
            out.push(h.clone());
        }
        Ok(Tensor::stack(&out, 1)?)
    }
}

impl BiLstm {
    /// `weight_ih_l{k}`, `weight_hh_l{k}`, `bias_ih_l{k}`, `bias_hh_l{k}` and their `_reverse`
    /// twins for k in 0..num_layers, under `vb` (the `lstm.` prefix of an `nn.LSTM`). Fresh
    /// weights start uniform in ±1/sqrt(hidden), as PyTorch's.
    pub(super) fn new(
        params: &mut Params,
        vb: &VarBuilder,
        input_dim: usize,
        hidden: usize,
        num_layers: usize,
        dropout: f32,
    ) -> Result<Self> {
        let bound = 1.0 / (hidden as f64).sqrt();
        let init = Init::Uniform { lo: -bound, up: bound };
        let mut layers = Vec::with_capacity(num_layers);
        for k in 0..num_layers {
            let in_dim = if k == 0 { input_dim } else { 2 * hidden };
            let mut pair = Vec::with_capacity(2);
            for suffix in ["", "_reverse"] {
                // Under their full names, so `save` has them (and, training, the variables).
                let mut get = |name: String, shape: Vec<usize>| params.get(vb, &shape, &name, init);
                pair.push(Cell {
                    w_ih: get(format!("weight_ih_l{k}{suffix}"), vec![4 * hidden, in_dim])?,
                    w_hh: get(format!("weight_hh_l{k}{suffix}"), vec![4 * hidden, hidden])?,
                    b_ih: get(format!("bias_ih_l{k}{suffix}"), vec![4 * hidden])?,
                    b_hh: get(format!("bias_hh_l{k}{suffix}"), vec![4 * hidden])?,
                });
            }
            let bwd = pair.pop().unwrap();
            layers.push((pair.pop().unwrap(), bwd));
        }
        Ok(Self { layers, packed: None, hidden, dropout })
    }

    /// Packs every layer's input projections (both directions in one matrix) for the CPU GEMM
    /// the encoder uses, for inference on f32 CPU weights; no-op otherwise. A tagger reading
    /// several encoder layers has wide inputs (1,536 for four MiniLM layers): this product is
    /// most of the LSTM's work.
    pub(super) fn pack_for_cpu(&mut self) -> Result<()> {
        let Some((first, _)) = self.layers.first() else { return Ok(()) };
        if !first.w_ih.device().is_cpu() || first.w_ih.dtype() != candle_core::DType::F32 {
            return Ok(());
        }
        let mut packed = Vec::with_capacity(self.layers.len());
        for (f, b) in &self.layers {
            let wt = Tensor::cat(&[&f.w_ih, &b.w_ih], 0)?.t()?.contiguous()?;
            let bias = Tensor::cat(&[(&f.b_ih + &f.b_hh)?, (&b.b_ih + &b.b_hh)?], 0)?;
            packed.push(Packed(concierge_kernels::linear::PackedLinear::new(&wt, Some(&bias))?));
        }
        self.packed = Some(packed);
        Ok(())
    }

    /// Width of the output: both directions' hidden states, forward first (as PyTorch).
    pub fn output_dim(&self) -> usize {
        2 * self.hidden
    }

    /// `x` `[B, L, D]` -> `[B, L, 2 * hidden]`. With `train`, dropout between layers (as
    /// `nn.LSTM(dropout=p)`, not after the last one).
    pub fn forward(&self, x: &Tensor, lengths: &[usize], train: bool) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        check_lengths(lengths, b, l)?;
        // Steps past the longest sequence are pure padding: skip them, pad the output back.
        let longest = lengths.iter().copied().max().unwrap_or(0);
        let x = if longest < l { x.narrow(1, 0, longest)? } else { x.clone() };
        let reversal = Reversal::new(lengths, longest, x.device())?;
        let reverse = |t: &Tensor| reversal.apply(t);
        let mut h = x;
        for (k, (fwd, bwd)) in self.layers.iter().enumerate() {
            if train && k > 0 && self.dropout > 0.0 {
                h = candle_nn::ops::dropout(&h, self.dropout)?;
            }
            let (f, r) = match self.packed.as_ref().filter(|_| !train) {
                Some(packed) => {
                    // Both directions' projections in one product; the backward one's rows are
                    // then reversed like its input would have been.
                    let (bb, ll, d) = h.dims3()?;
                    let h4 = 4 * self.hidden;
                    let xw = packed[k].0.forward(&h.reshape((bb * ll, d))?.contiguous()?, concierge_kernels::linear::Act::None, None)?;
                    let xf = xw.narrow(1, 0, h4)?.reshape((bb, ll, h4))?;
                    let xb = xw.narrow(1, h4, h4)?.reshape((bb, ll, h4))?;
                    (fwd.steps(&xf)?, reverse(&bwd.steps(&reverse(&xb)?)?)?)
                }
                None => (fwd.seq(&h)?, reverse(&bwd.seq(&reverse(&h)?)?)?),
            };
            h = Tensor::cat(&[f, r], 2)?;
        }
        let mask = length_mask(lengths, longest, h.device())?.to_dtype(h.dtype())?;
        let h = h.broadcast_mul(&mask.unsqueeze(2)?)?;
        Ok(if longest < l { h.pad_with_zeros(1, 0, l - longest)? } else { h })
    }
}
