//! The CPU masked-mean + L2 kernel against an f64 reference and against the tensor ops it
//! replaces, on seeded random inputs in f32, f16 and bf16; zero rows and bad input.
mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::{pool_ref, Rng};
use concierge_kernels::pool::{masked_mean_l2, L2_EPS};

fn close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= rel * scale, "{what}: element {i}: {g} vs {w}");
    }
}

#[test]
fn matches_f64_reference_on_odd_sizes() -> Result<()> {
    let mut rng = Rng(0x900d_0001);
    for &(ref lens, h) in &[
        (vec![1usize], 1usize),
        (vec![1, 1, 1], 7),
        (vec![3, 1, 17], 7),
        (vec![1], 384),
        (vec![5, 128, 1, 40], 384),
        (vec![300; 3], 33),
        (vec![2; 70], 64),
    ] {
        let n: usize = lens.iter().sum();
        let x = rng.floats(n * h, 4.0);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let t = Tensor::from_slice(&x, (n, h), &Device::Cpu)?.to_dtype(dtype)?;
            // The reference sees the same rounded inputs.
            let xr: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            for normalize in [false, true] {
                let got = masked_mean_l2(&t, lens, normalize)?;
                assert_eq!(got.dims(), &[lens.len(), h]);
                assert_eq!(got.dtype(), DType::F32);
                let what = format!("lens {lens:?} h {h} {dtype:?} normalize {normalize}");
                close(&what, &got.flatten_all()?.to_vec1()?, &pool_ref(&xr, h, lens, normalize), 2e-6);
            }
        }
    }
    Ok(())
}

#[test]
fn matches_the_tensor_ops_it_replaces() -> Result<()> {
    // The models crate's path: a [B, N] averaging matrix times hidden, then x / max(||x||, eps).
    let mut rng = Rng(0x900d_0002);
    let lens = [9usize, 1, 30];
    let (n, h) = (40, 384);
    let x = Tensor::from_vec(rng.floats(n * h, 1.0), (n, h), &Device::Cpu)?;
    let mut w = vec![0f32; lens.len() * n];
    let mut start = 0;
    for (b, &len) in lens.iter().enumerate() {
        w[b * n + start..b * n + start + len].fill(1.0 / len as f32);
        start += len;
    }
    let mean = Tensor::from_vec(w, (lens.len(), n), &Device::Cpu)?.matmul(&x)?;
    let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(L2_EPS as f64)?;
    let want = mean.broadcast_div(&norm)?;
    close("mean", &masked_mean_l2(&x, &lens, false)?.flatten_all()?.to_vec1()?, &mean.flatten_all()?.to_vec1()?, 1e-5);
    close(
        "mean+l2",
        &masked_mean_l2(&x, &lens, true)?.flatten_all()?.to_vec1()?,
        &want.flatten_all()?.to_vec1()?,
        1e-5,
    );
    Ok(())
}

#[test]
fn normalised_rows_have_unit_norm_and_zero_rows_stay_zero() -> Result<()> {
    let mut rng = Rng(0x900d_0003);
    let (lens, h) = ([2usize, 3, 1], 7);
    let mut x = rng.floats(6 * h, 2.0);
    x[2 * h..5 * h].fill(0.0); // sequence 1 is all zeros
    let got = masked_mean_l2(&Tensor::from_vec(x, (6, h), &Device::Cpu)?, &lens, true)?.to_vec2::<f32>()?;
    for (b, row) in got.iter().enumerate() {
        let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        if b == 1 {
            assert!(row.iter().all(|&v| v == 0.0), "zero row: {row:?}");
        } else {
            assert!((norm - 1.0).abs() < 1e-6, "row {b} norm {norm}");
        }
    }
    Ok(())
}

#[test]
fn non_contiguous_input_is_read_correctly() -> Result<()> {
    let mut rng = Rng(0x900d_0004);
    let x = Tensor::from_vec(rng.floats(7 * 12, 1.0), (7, 12), &Device::Cpu)?;
    let t = x.t()?; // [12, 7], strided
    let want = masked_mean_l2(&t.contiguous()?, &[5, 7], true)?;
    let got = masked_mean_l2(&t, &[5, 7], true)?;
    assert_eq!(got.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
    Ok(())
}

#[test]
fn bad_input_is_an_error_that_says_what() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((5, 4), DType::F32, &dev)?;
    let err = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
    assert!(err(masked_mean_l2(&x, &[2, 2], true)).contains("sum to 4, hidden has 5 rows"));
    assert!(err(masked_mean_l2(&x, &[5, 0], true)).contains("sequence 1 is empty"));
    assert!(err(masked_mean_l2(&x.flatten_all()?, &[5], true)).contains("packed [tokens, hidden]"));
    assert!(err(masked_mean_l2(&x.to_dtype(DType::U32)?, &[5], true)).contains("f32, f16 and bf16"));
    assert_eq!(masked_mean_l2(&Tensor::zeros((0, 4), DType::F32, &dev)?, &[], true)?.dims(), &[0, 4]);
    Ok(())
}
