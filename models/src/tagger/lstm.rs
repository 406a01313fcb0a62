//! The bidirectional, multi-layer LSTM of the tagger over padded batches, on candle-nn's LSTM
//! cell (PyTorch's gate order i, f, g, o and its weight names, so `nn.LSTM` checkpoints load).
//!
//! Padding never reaches a real position: the forward direction reads left to right, so the
//! padding after a sequence comes too late to matter; the backward direction runs on each
//! sequence reversed within its own length (its padding stays at the end) and is reversed back,
//! which is what PyTorch's packed sequences compute. Outputs at padded positions are zero, as
//! `pad_packed_sequence` leaves them.
use std::collections::HashMap;

use candle_core::Tensor;
use candle_nn::rnn::{Direction, LSTMConfig, LSTM, RNN};
use candle_nn::{Init, VarBuilder};

use super::crf::{check_lengths, length_mask};
use super::Params;
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct BiLstm {
    /// (forward, backward) per layer.
    layers: Vec<(LSTM, LSTM)>,
    hidden: usize,
    dropout: f32,
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
            for (direction, suffix) in [(Direction::Forward, ""), (Direction::Backward, "_reverse")] {
                // Fetched here, under their full names, so `save` has them; the cell gets the
                // same tensors (shared storage, and the same variables when training).
                let mut ts = HashMap::new();
                for (name, shape) in [
                    (format!("weight_ih_l{k}{suffix}"), vec![4 * hidden, in_dim]),
                    (format!("weight_hh_l{k}{suffix}"), vec![4 * hidden, hidden]),
                    (format!("bias_ih_l{k}{suffix}"), vec![4 * hidden]),
                    (format!("bias_hh_l{k}{suffix}"), vec![4 * hidden]),
                ] {
                    ts.insert(name.clone(), params.get(vb, &shape, &name, init)?);
                }
                let cfg = LSTMConfig { layer_idx: k, direction, ..LSTMConfig::default() };
                let cell_vb = VarBuilder::from_tensors(ts, vb.dtype(), vb.device());
                pair.push(candle_nn::rnn::lstm(in_dim, hidden, cfg, cell_vb)?);
            }
            let bwd = pair.pop().unwrap();
            layers.push((pair.pop().unwrap(), bwd));
        }
        Ok(Self { layers, hidden, dropout })
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
        // Row index of each (sequence, step) in the sequence-wise reversal; its own inverse.
        let rev: Vec<u32> = lengths
            .iter()
            .enumerate()
            .flat_map(|(s, &n)| (0..longest).map(move |t| (s * longest + if t < n { n - 1 - t } else { t }) as u32))
            .collect();
        let rev = Tensor::from_vec(rev, (b * longest,), x.device())?;
        let reverse = |t: &Tensor| -> Result<Tensor> {
            let d = t.dim(2)?;
            Ok(t.reshape((b * longest, d))?.index_select(&rev, 0)?.reshape((b, longest, d))?)
        };
        let mut h = x;
        for (k, (fwd, bwd)) in self.layers.iter().enumerate() {
            if train && k > 0 && self.dropout > 0.0 {
                h = candle_nn::ops::dropout(&h, self.dropout)?;
            }
            let f = fwd.states_to_tensor(&fwd.seq(&h)?)?;
            let r = reverse(&bwd.states_to_tensor(&bwd.seq(&reverse(&h)?)?)?)?;
            h = Tensor::cat(&[f, r], 2)?;
        }
        let mask = length_mask(lengths, longest, h.device())?.to_dtype(h.dtype())?;
        let h = h.broadcast_mul(&mask.unsqueeze(2)?)?;
        Ok(if longest < l { h.pad_with_zeros(1, 0, l - longest)? } else { h })
    }
}
