//! The CPU top-k kernel against a full sort with an explicit comparator and against candle's
//! arg-sort, on seeded random rows with ties, NaNs, infinities and signed zeros.
mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::{nasty_scores, topk_ref, Rng};
use concierge_kernels::topk::topk;

fn check(scores: &[f32], q: usize, n: usize, k: usize) -> Result<()> {
    let t = Tensor::from_slice(scores, (q, n), &Device::Cpu)?;
    let (values, indices) = topk(&t, k)?;
    let kk = k.min(n);
    assert_eq!(values.dims(), &[q, kk]);
    assert_eq!(indices.dims(), &[q, kk]);
    let (values, indices) = (values.to_vec2::<f32>()?, indices.to_vec2::<u32>()?);
    for r in 0..q {
        let row = &scores[r * n..(r + 1) * n];
        let want = topk_ref(row, kk);
        assert_eq!(indices[r], want, "Q={q} N={n} k={k} row {r}");
        let want_values: Vec<u32> = want.iter().map(|&i| row[i as usize].to_bits()).collect();
        assert_eq!(values[r].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want_values, "values, row {r}");
    }
    Ok(())
}

#[test]
fn matches_a_full_sort_on_odd_sizes() -> Result<()> {
    let mut rng = Rng(0x70bc_0001);
    for &(q, n) in &[(1usize, 1usize), (3, 1), (1, 1000), (3, 1000), (17, 33), (2, 4097)] {
        for nasty in [false, true] {
            let scores = if nasty { nasty_scores(&mut rng, q * n) } else { rng.floats(q * n, 1.0) };
            // k = 1, 10, a heap-sized k, one past the heap's cut-over, N, and more than N.
            for k in [1, 10, n / 8, n / 8 + 1, n, n + 7] {
                check(&scores, q, n, k)?;
            }
        }
    }
    Ok(())
}

#[test]
fn ties_nan_and_signed_zeros() -> Result<()> {
    let nan = f32::NAN;
    let row = [nan, 1.0, -0.0, 2.0, 1.0, f32::NEG_INFINITY, 0.0, nan, 2.0, f32::INFINITY];
    let (values, indices) = topk(&Tensor::new(&[row], &Device::Cpu)?, 10)?;
    // inf; the two 2.0s and the two 1.0s by index; -0.0 (index 2) ties +0.0 (index 6); -inf;
    // then the NaNs by index.
    assert_eq!(indices.to_vec2::<u32>()?[0], vec![9, 3, 8, 1, 4, 2, 6, 5, 0, 7]);
    let v = values.to_vec2::<f32>()?.remove(0);
    assert_eq!(
        v[..8].iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        [f32::INFINITY, 2.0, 2.0, 1.0, 1.0, -0.0, 0.0, f32::NEG_INFINITY].map(f32::to_bits)
    );
    assert!(v[8].is_nan() && v[9].is_nan());
    // All equal: the first k indices.
    let (_, indices) = topk(&Tensor::zeros((2, 50), DType::F32, &Device::Cpu)?, 4)?;
    assert_eq!(indices.to_vec2::<u32>()?, vec![vec![0, 1, 2, 3]; 2]);
    Ok(())
}

#[test]
fn agrees_with_candle_arg_sort_without_ties() -> Result<()> {
    let mut rng = Rng(0x70bc_0002);
    let (q, n) = (5, 777);
    let t = Tensor::from_vec(rng.floats(q * n, 1.0), (q, n), &Device::Cpu)?;
    let sorted = t.arg_sort_last_dim(false)?.narrow(1, 0, 25)?.contiguous()?;
    let (values, indices) = topk(&t, 25)?;
    assert_eq!(indices.to_vec2::<u32>()?, sorted.to_vec2::<u32>()?);
    assert_eq!(values.to_vec2::<f32>()?, t.gather(&sorted, 1)?.to_vec2::<f32>()?);
    Ok(())
}

#[test]
fn empty_and_bad_input() -> Result<()> {
    let dev = Device::Cpu;
    let t = Tensor::zeros((3, 5), DType::F32, &dev)?;
    let (v, i) = topk(&t, 0)?;
    assert_eq!((v.dims(), i.dims(), i.dtype()), (&[3, 0][..], &[3, 0][..], DType::U32));
    let (v, _) = topk(&Tensor::zeros((3, 0), DType::F32, &dev)?, 4)?;
    assert_eq!(v.dims(), &[3, 0]);
    let err = |r: candle_core::Result<(Tensor, Tensor)>| r.unwrap_err().to_string();
    assert!(err(topk(&t.flatten_all()?, 2)).contains("[queries, candidates]"));
    assert!(err(topk(&t.to_dtype(DType::F16)?, 2)).contains("only f32"));
    // A strided view is ranked as its values.
    let x = Tensor::from_vec((0..12).map(|v| v as f32).collect(), (3, 4), &dev)?;
    let (_, i) = topk(&x.t()?, 2)?;
    assert_eq!(i.to_vec2::<u32>()?, vec![vec![2, 1]; 4]);
    Ok(())
}
