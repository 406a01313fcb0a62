//! The bidirectional, multi-layer LSTM of the tagger over padded batches, in candle tensor ops
//! (PyTorch's gate order i, f, g, o and its weight names, so `nn.LSTM` checkpoints load). A
//! loaded f32 CPU model infers through `BiLstm::forward_cpu` instead: one packed product for
//! both directions' inputs, then the recurrence in plain loops, checked against the ops.
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

/// `acc += v W` for `W` row-major `[v.len(), acc.len()]`, a contiguous row of `W` per element
/// of `v` (vectorises): the per-step product of the CPU recurrences (LSTM and LAC's GRU).
pub(super) fn add_vec_mat(acc: &mut [f32], v: &[f32], w: &[f32]) {
    let n = acc.len();
    for (&vi, row) in v.iter().zip(w.chunks_exact(n)) {
        for (a, &wij) in acc.iter_mut().zip(row) {
            *a += vi * wij;
        }
    }
}

pub(super) fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

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
    /// `W_hh^T` `[H, 4H]` as plain rows for [`Cell::steps_cpu`]; set by `pack_for_cpu`.
    w_hh_t: Option<std::sync::Arc<Vec<f32>>>,
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

    /// Inference on the CPU in f32: the recurrence of [`Self::steps`] in plain loops, over each
    /// sequence's own steps (`reverse`: from its last), reading this direction's gates at
    /// `offset` in each row of `xw` (`stride` wide, row `s * l + t`). Returns `[B * L * H]`, zero
    /// at padding. Stepping a 128-wide cell through candle's ops costs more in dispatch than in
    /// arithmetic at these sizes.
    fn steps_cpu(&self, xw: &[f32], stride: usize, offset: usize, lengths: &[usize], l: usize, reverse: bool) -> Vec<f32> {
        let w_t = self.w_hh_t.as_ref().expect("steps_cpu after pack_for_cpu");
        let hidden = self.w_hh.dims()[1];
        let h4 = 4 * hidden;
        let mut out = vec![0f32; lengths.len() * l * hidden];
        let (mut h, mut c, mut g) = (vec![0f32; hidden], vec![0f32; hidden], vec![0f32; h4]);
        for (s, &n) in lengths.iter().enumerate() {
            h.fill(0.0);
            c.fill(0.0);
            for step in 0..n {
                let t = if reverse { n - 1 - step } else { step };
                let row = (s * l + t) * stride + offset;
                g.copy_from_slice(&xw[row..row + h4]);
                add_vec_mat(&mut g, &h, w_t);
                for j in 0..hidden {
                    let (ig, fg, gg, og) = (sigmoid(g[j]), sigmoid(g[hidden + j]), g[2 * hidden + j].tanh(), sigmoid(g[3 * hidden + j]));
                    c[j] = fg * c[j] + ig * gg;
                    h[j] = og * c[j].tanh();
                }
                out[(s * l + t) * hidden..(s * l + t + 1) * hidden].copy_from_slice(&h);
            }
        }
        out
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
                    w_hh_t: None,
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
        for (f, b) in &mut self.layers {
            let wt = Tensor::cat(&[&f.w_ih, &b.w_ih], 0)?.t()?.contiguous()?;
            let bias = Tensor::cat(&[(&f.b_ih + &f.b_hh)?, (&b.b_ih + &b.b_hh)?], 0)?;
            packed.push(Packed(concierge_kernels::linear::PackedLinear::new(&wt, Some(&bias))?));
            for cell in [f, b] {
                cell.w_hh_t = Some(std::sync::Arc::new(cell.w_hh.t()?.contiguous()?.flatten_all()?.to_vec1()?));
            }
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
        if let Some(packed) = self.packed.as_ref().filter(|_| !train) {
            return self.forward_cpu(packed, x, lengths, l);
        }
        let reversal = Reversal::new(lengths, longest, x.device())?;
        let reverse = |t: &Tensor| reversal.apply(t);
        let mut h = x;
        for (k, (fwd, bwd)) in self.layers.iter().enumerate() {
            if train && k > 0 && self.dropout > 0.0 {
                h = candle_nn::ops::dropout(&h, self.dropout)?;
            }
            let (f, r) = (fwd.seq(&h)?, reverse(&bwd.seq(&reverse(&h)?)?)?);
            h = Tensor::cat(&[f, r], 2)?;
        }
        let mask = length_mask(lengths, longest, h.device())?.to_dtype(h.dtype())?;
        let h = h.broadcast_mul(&mask.unsqueeze(2)?)?;
        Ok(if longest < l { h.pad_with_zeros(1, 0, l - longest)? } else { h })
    }

    /// Inference on f32 CPU weights: per layer, both directions' input projections in one packed
    /// product, then each direction's recurrence in plain loops ([`Cell::steps_cpu`]), the two
    /// directions on two threads. `x` is already cut to the longest sequence; `l` is the
    /// padded length to give back. The same arithmetic as the tensor-op path (checked against it).
    fn forward_cpu(&self, packed: &[Packed], x: Tensor, lengths: &[usize], l: usize) -> Result<Tensor> {
        let (b, ll, _) = x.dims3()?;
        let hidden = self.hidden;
        let (h4, h8) = (4 * hidden, 8 * hidden);
        let mut h = x;
        for (k, (fwd, bwd)) in self.layers.iter().enumerate() {
            let d = h.dim(2)?;
            let xw = packed[k].0.forward(&h.reshape((b * ll, d))?.contiguous()?, concierge_kernels::linear::Act::None, None)?;
            let xw: Vec<f32> = xw.flatten_all()?.to_vec1()?;
            let (f, r) = rayon::join(
                || fwd.steps_cpu(&xw, h8, 0, lengths, ll, false),
                || bwd.steps_cpu(&xw, h8, h4, lengths, ll, true),
            );
            let mut both = Vec::with_capacity(b * ll * 2 * hidden);
            for (fr, rr) in f.chunks_exact(hidden).zip(r.chunks_exact(hidden)) {
                both.extend_from_slice(fr);
                both.extend_from_slice(rr);
            }
            h = Tensor::from_vec(both, (b, ll, 2 * hidden), h.device())?;
        }
        // Zero at padding already (the loops never write there).
        Ok(if ll < l { h.pad_with_zeros(1, 0, l - ll)? } else { h })
    }
}
