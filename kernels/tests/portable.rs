//! The portable (non-AVX-512) code paths of attention and LayerNorm, against plain candle ops,
//! and of the Viterbi step, against a textbook Viterbi. Its own test binary: the switch is
//! process-wide.
mod common;

use anyhow::Result;
use candle_core::{Device, Tensor, D};
use concierge_kernels::{attention, norm, viterbi};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn portable_attention_and_layer_norm_match_candle() -> Result<()> {
    concierge_kernels::set_portable_only(true);
    let dev = Device::Cpu;
    for (lens, heads, d) in [(vec![16usize, 3, 40, 1], 12usize, 32usize), (vec![5, 9], 2, 20)] {
        let t: usize = lens.iter().sum();
        let h = heads * d;
        let qkv = Tensor::randn(0f32, 2f32, (t, 3 * h), &dev)?;
        let got = attention::varlen_self_attention(&qkv, &lens, heads)?;
        let mut outs = Vec::new();
        let mut start = 0;
        for &len in &lens {
            let x = qkv.narrow(0, start, len)?.reshape((len, 3, heads, d))?;
            let part = |i: usize| -> Result<Tensor> { Ok(x.narrow(1, i, 1)?.squeeze(1)?.transpose(0, 1)?.contiguous()?) };
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            let p = candle_nn::ops::softmax(&(q.matmul(&k.t()?)? / (d as f64).sqrt())?, D::Minus1)?;
            outs.push(p.matmul(&v)?.transpose(0, 1)?.reshape((len, h))?);
            start += len;
        }
        let err = max_abs_diff(&got, &Tensor::cat(&outs, 0)?)?;
        assert!(err < 2e-5, "portable attention {lens:?}: max abs err {err}");
    }
    let x = Tensor::randn(0f32, 3f32, (50, 384), &dev)?;
    let (g, b) = (Tensor::randn(0f32, 1f32, 384, &dev)?, Tensor::randn(0f32, 1f32, 384, &dev)?);
    let err = max_abs_diff(&norm::layer_norm(&x, &g, &b, 1e-12)?, &candle_nn::ops::layer_norm(&x, &g, &b, 1e-12)?)?;
    assert!(err < 1e-5, "portable layer_norm: max abs err {err}");
    Ok(())
}

#[test]
fn portable_viterbi_matches_textbook() -> Result<()> {
    concierge_kernels::set_portable_only(true);
    let mut rng = common::Rng(0x9047_ab1e);
    let (b, l, t) = (3, 17, 37);
    let lengths = [17usize, 1, 9];
    let (em, trans, start, end) =
        (rng.floats(b * l * t, 3.0), rng.floats(t * t, 2.0), rng.floats(t, 2.0), rng.floats(t, 2.0));
    let dev = Device::Cpu;
    let (paths, scores) = viterbi::viterbi_decode(
        &Tensor::from_slice(&em, (b, l, t), &dev)?,
        &lengths,
        &Tensor::from_slice(&trans, (t, t), &dev)?,
        &Tensor::from_slice(&start, t, &dev)?,
        &Tensor::from_slice(&end, t, &dev)?,
    )?;
    let trans2: Vec<Vec<f32>> = trans.chunks(t).map(<[f32]>::to_vec).collect();
    for (s, &n) in lengths.iter().enumerate() {
        let seq: Vec<Vec<f32>> = (0..n).map(|i| em[(s * l + i) * t..(s * l + i + 1) * t].to_vec()).collect();
        let (want, want_score) = common::viterbi_ref(&seq, &trans2, &start, &end);
        assert_eq!((&paths[s], scores[s].to_bits()), (&want, want_score.to_bits()), "sequence {s}");
    }
    Ok(())
}
