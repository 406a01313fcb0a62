//! Every custom op against a reference built from plain candle ops, on random inputs.
use anyhow::Result;
use candle_core::{Device, Tensor, D};
use concierge_kernels::{activation, attention, linear, norm};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn rand(shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1f32, shape, &Device::Cpu)?)
}

/// Tolerance: 2e-5 times the size of the reference values (f32 sums of up to 1536 terms,
/// in a different order).
fn check(name: &str, got: &Tensor, want: &Tensor, rel: f32) -> Result<()> {
    let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
    let err = max_abs_diff(got, want)?;
    assert!(err <= rel * scale, "{name}: max abs err {err} > {rel} * {scale}");
    Ok(())
}

#[test]
fn packed_linear_matches_candle() -> Result<()> {
    let acts = [
        (linear::Act::None, "none"),
        (linear::Act::GeluErf, "gelu_erf"),
        (linear::Act::GeluTanh, "gelu"),
        (linear::Act::Relu, "relu"),
    ];
    for &(m, k, n) in &[(1, 384, 1152), (5, 7, 40), (12, 33, 32), (13, 384, 384), (100, 1536, 384), (509, 384, 1536), (37, 64, 70)] {
        let x = rand(&[m, k])?;
        let wt = (rand(&[k, n])? * 0.1)?;
        let b = rand(&[n])?;
        let res = rand(&[m, n])?;
        let lin = linear::PackedLinear::new(&wt, Some(&b))?;
        let base = x.matmul(&wt)?.broadcast_add(&b)?;
        for &(act, name) in &acts {
            let want = match act {
                linear::Act::None => base.clone(),
                linear::Act::GeluErf => base.gelu_erf()?,
                linear::Act::GeluTanh => base.gelu()?,
                linear::Act::Relu => base.relu()?,
            };
            check(&format!("linear {name} {m}x{k}x{n}"), &lin.forward(&x, act, None)?, &want, 2e-5)?;
            check(&format!("linear+res {name} {m}x{k}x{n}"), &lin.forward(&x, act, Some(&res))?, &(&want + &res)?, 2e-5)?;
        }
    }
    Ok(())
}

#[test]
fn linear_without_bias() -> Result<()> {
    let (x, wt) = (rand(&[20, 48])?, rand(&[48, 64])?);
    let lin = linear::PackedLinear::new(&wt, None)?;
    check("linear no bias", &lin.forward(&x, linear::Act::None, None)?, &x.matmul(&wt)?, 2e-5)
}

#[test]
fn erf_and_gelu_match_candle() -> Result<()> {
    // erf: absolute error below 1e-6 against candle's (libm-accurate) erf on a fine grid.
    let xs: Vec<f32> = (-60_000..=60_000).map(|i| i as f32 * 1e-4).collect();
    let want = Tensor::new(xs.as_slice(), &Device::Cpu)?.erf()?.to_vec1::<f32>()?;
    for (&x, &w) in xs.iter().zip(&want) {
        let e = activation::erf(x);
        assert!((e - w).abs() <= 1e-6, "erf({x}) = {e}, want {w}");
    }
    // gelu(erf): absolute error below 1e-6 * max(1, |x|).
    let t = Tensor::new(xs.as_slice(), &Device::Cpu)?;
    let want = t.gelu_erf()?.to_vec1::<f32>()?;
    let mut got = xs.clone();
    activation::gelu_erf_slice(&mut got);
    for ((&x, &g), &w) in xs.iter().zip(&got).zip(&want) {
        assert!((g - w).abs() <= 1e-6 * x.abs().max(1.0), "gelu({x}) = {g}, want {w}");
    }
    Ok(())
}

#[test]
fn exp_matches_std() {
    // relative error below 4e-7 (about 3 ulp) on the softmax range and beyond.
    let mut x = -87.0f32;
    while x < 88.0 {
        let (e, w) = (activation::exp(x), x.exp());
        assert!(((e - w) / w).abs() <= 4e-7, "exp({x}) = {e}, want {w}");
        x += 0.000_7;
    }
    assert_eq!(activation::exp(0.0), 1.0);
    assert!(activation::exp(-1000.0) < 1e-37);
}

#[test]
fn layer_norm_matches_candle_nn() -> Result<()> {
    for &(m, h) in &[(1, 384), (7, 384), (600, 384), (3, 17)] {
        let x = (rand(&[m, h])? * 3.0)?.broadcast_add(&rand(&[h])?)?;
        let (g, b) = (rand(&[h])?, rand(&[h])?);
        let got = norm::layer_norm(&x, &g, &b, 1e-12)?;
        let want = candle_nn::ops::layer_norm(&x, &g, &b, 1e-12)?;
        check(&format!("layer_norm {m}x{h}"), &got, &want, 1e-5)?;
    }
    Ok(())
}

/// Attention per sequence with plain candle ops, with an optional relative bias
/// (`[heads, 2 * span - 1]`, see `attention::RelativeBias`).
fn attention_reference(qkv: &Tensor, lens: &[usize], heads: usize, bias: Option<(&Tensor, usize)>) -> Result<Tensor> {
    let (_, h3) = qkv.dims2()?;
    let (h, d) = (h3 / 3, h3 / 3 / heads);
    let mut outs = Vec::new();
    let mut start = 0;
    for &len in lens {
        let x = qkv.narrow(0, start, len)?.reshape((len, 3, heads, d))?;
        let part = |i: usize| -> Result<Tensor> { Ok(x.narrow(1, i, 1)?.squeeze(1)?.transpose(0, 1)?.contiguous()?) };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let mut scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
        if let Some((table, span)) = bias {
            // Row i of the bias is table[:, span - 1 - i .. span - 1 - i + len].
            let rows = (0..len).map(|i| table.narrow(1, span - 1 - i, len)).collect::<candle_core::Result<Vec<_>>>()?;
            scores = (scores + Tensor::stack(&rows, 1)?)?;
        }
        let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
        outs.push(p.matmul(&v)?.transpose(0, 1)?.reshape((len, h))?);
        start += len;
    }
    Ok(Tensor::cat(&outs, 0)?)
}

#[test]
fn varlen_attention_matches_candle() -> Result<()> {
    for (lens, heads, d) in [(vec![1usize], 12usize, 32usize), (vec![16, 3, 40, 1, 128], 12, 32), (vec![5, 9], 2, 20), (vec![64; 8], 4, 64)] {
        let t: usize = lens.iter().sum();
        let qkv = (rand(&[t, 3 * heads * d])? * 2.0)?;
        let got = attention::varlen_self_attention(&qkv, &lens, heads)?;
        let want = attention_reference(&qkv, &lens, heads, None)?;
        check(&format!("attention {lens:?} {heads}x{d}"), &got, &want, 1e-5)?;
        // With a relative bias, the span longer than needed (its unused ends must not matter).
        let span = lens.iter().max().unwrap() + 3;
        let table = (rand(&[heads, 2 * span - 1])? * 4.0)?;
        let bias = attention::RelativeBias { table: table.flatten_all()?.to_vec1::<f32>()?, span };
        let got = attention::varlen_self_attention_biased(&qkv, &lens, heads, Some(bias))?;
        let want = attention_reference(&qkv, &lens, heads, Some((&table, span)))?;
        check(&format!("biased attention {lens:?} {heads}x{d}"), &got, &want, 1e-5)?;
    }
    let qkv = rand(&[10, 3 * 4 * 8])?;
    let short = attention::RelativeBias { table: vec![0.0; 4 * 9], span: 5 };
    assert!(attention::varlen_self_attention_biased(&qkv, &[4, 6], 4, Some(short)).is_err(), "a span under the longest sequence is refused");
    Ok(())
}

#[test]
fn every_gemm_microkernel_matches_candle() -> Result<()> {
    use concierge_kernels::gemm::{gemm_with_isa, Act, Epilogue, Isa, PackedB};
    let mut isas = vec![Isa::Plain];
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            isas.push(Isa::Avx2);
        }
        if std::is_x86_feature_detected!("avx512f") {
            isas.push(Isa::Avx512);
        }
    }
    for &(m, k, n) in &[(1, 16, 32), (50, 70, 20), (13, 384, 70), (100, 96, 384), (29, 1536, 64)] {
        let (x, wt, b, r) = (rand(&[m, k])?, (rand(&[k, n])? * 0.1)?, rand(&[n])?, rand(&[m, n])?);
        let want = (x.matmul(&wt)?.broadcast_add(&b)?.gelu_erf()? + &r)?;
        // ResNet's block end: the activation after the residual.
        let want_after = (x.matmul(&wt)?.broadcast_add(&b)? + &r)?.relu()?;
        let packed = PackedB::pack(&wt.flatten_all()?.to_vec1::<f32>()?, k, n);
        let (xs, bs, rs) = (x.flatten_all()?.to_vec1::<f32>()?, b.to_vec1::<f32>()?, r.flatten_all()?.to_vec1::<f32>()?);
        for &isa in &isas {
            let mut out = vec![f32::NAN; m * n];
            let epi = Epilogue { bias: Some(&bs), act: Act::GeluErf, residual: Some(&rs), act_after_residual: false };
            gemm_with_isa(&xs, m, &packed, &epi, &mut out, isa);
            check(&format!("gemm {isa:?} {m}x{k}x{n}"), &Tensor::from_vec(out, (m, n), &Device::Cpu)?, &want, 2e-5)?;
            let mut out = vec![f32::NAN; m * n];
            let epi = Epilogue { bias: Some(&bs), act: Act::Relu, residual: Some(&rs), act_after_residual: true };
            gemm_with_isa(&xs, m, &packed, &epi, &mut out, isa);
            let got = Tensor::from_vec(out, (m, n), &Device::Cpu)?;
            check(&format!("gemm {isa:?} {m}x{k}x{n} relu after residual"), &got, &want_after, 2e-5)?;
        }
    }
    Ok(())
}

#[test]
fn embedding_sum_matches_index_select() -> Result<()> {
    let (word, pos, types) = (rand(&[100, 24])?, rand(&[16, 24])?, rand(&[2, 24])?);
    let ids: Vec<u32> = (0..37).map(|i| (i * 31 % 100) as u32).collect();
    let positions: Vec<u32> = (0..37).map(|i| (i % 16) as u32).collect();
    let tys: Vec<u32> = (0..37).map(|i| (i % 3 == 0) as u32).collect();
    let got = concierge_kernels::embedding::embedding_sum(&word, &pos, &types, &ids, &positions, &tys)?;
    let dev = Device::Cpu;
    let want = ((word.index_select(&Tensor::new(ids.as_slice(), &dev)?, 0)?
        + pos.index_select(&Tensor::new(positions.as_slice(), &dev)?, 0)?)?
        + types.index_select(&Tensor::new(tys.as_slice(), &dev)?, 0)?)?;
    check("embedding_sum", &got, &want, 1e-6)?;
    assert!(concierge_kernels::embedding::embedding_sum(&word, &pos, &types, &[100], &[0], &[0]).is_err());
    Ok(())
}

/// Search scores: every tile shape (queries and rows not multiples of 4, dims not multiples of
/// 16) against an f64 reference, on each instruction set this CPU has.
#[test]
fn inner_products_match_f64_reference() {
    use concierge_kernels::dot::inner_products_with_isa;
    use concierge_kernels::gemm::Isa;
    let mut isas = vec![Isa::Plain];
    if std::is_x86_feature_detected!("avx512f") {
        isas.push(Isa::Avx512);
    }
    let mut seed = 7u64;
    let mut next = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    };
    for &(nq, n, d) in &[(1, 1, 1), (1, 9, 384), (3, 7, 17), (4, 4, 16), (5, 13, 33), (9, 6, 100), (32, 37, 384)] {
        let q: Vec<f32> = (0..nq * d).map(|_| next()).collect();
        let r: Vec<f32> = (0..n * d).map(|_| next()).collect();
        for &isa in &isas {
            let mut out = vec![f32::NAN; nq * n];
            inner_products_with_isa(&q, nq, &r, d, &mut out, isa);
            for i in 0..nq {
                for j in 0..n {
                    let want: f64 = (0..d).map(|k| q[i * d + k] as f64 * r[j * d + k] as f64).sum();
                    let got = out[i * n + j] as f64;
                    assert!((got - want).abs() <= 1e-5 * (d as f64).sqrt(), "{isa:?} nq={nq} n={n} d={d} [{i},{j}]: {got} vs {want}");
                }
            }
        }
    }
}
