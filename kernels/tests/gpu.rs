//! The CUDA kernels against their CPU implementations on fresh seeded random inputs, many
//! shapes, with every CUDA output buffer poisoned (NaN / u32::MAX) before its kernel runs so an
//! element left unwritten fails the comparison. Without a usable GPU (or in a build without the
//! `cuda` feature) each test writes a line starting `SKIPPED:` to stderr, past the test
//! harness's capture so it shows in a plain `cargo test`, and passes.
//! `scripts/device-check.sh` runs this binary on a GPU machine.
mod common;

use std::io::Write;

/// Says why a test did not run, where `cargo test` shows it even when it captures output.
fn skipped(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_tests_need_the_cuda_feature() {
    skipped("gpu tests", "built without the `cuda` feature (cargo test --features cuda)");
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::common::{nasty_scores, Rng};
    use super::skipped;
    use anyhow::Result;
    use candle_core::{DType, Device, Tensor};
    use concierge_kernels::{pool, topk, viterbi};

    /// CUDA device 0, or None after saying why the test is skipped.
    fn gpu(test: &str) -> Option<Device> {
        match Device::new_cuda(0) {
            Ok(dev) => {
                concierge_kernels::set_poison_outputs(true);
                Some(dev)
            }
            Err(e) => {
                // The error's first line: candle appends a backtrace when RUST_BACKTRACE is set.
                let e = e.to_string();
                skipped(test, &format!("no usable CUDA GPU/driver ({})", e.lines().next().unwrap_or_default()));
                None
            }
        }
    }

    #[test]
    fn viterbi_gpu_matches_cpu() -> Result<()> {
        let Some(gpu) = gpu("viterbi_gpu_matches_cpu") else {
            return Ok(());
        };
        let mut rng = Rng(0xc0da_0001);
        let mut cases = 0;
        for &(b, l, t) in &[
            (1usize, 1usize, 1usize),
            (3, 1, 5),
            (3, 17, 5),
            (3, 17, 130),
            (1, 17, 1),
            (5, 64, 31),
            (64, 40, 9),
            (2, 200, 257),
            (7, 33, 1000),
        ] {
            let lengths: Vec<usize> = (0..b).map(|s| if s == 0 { l } else { 1 + rng.below(l) }).collect();
            let em = rng.floats(b * l * t, 3.0);
            let (trans, start, end) = (rng.floats(t * t, 2.0), rng.floats(t, 2.0), rng.floats(t, 2.0));
            let on = |dev: &Device| -> Result<(Vec<Vec<u32>>, Vec<f32>)> {
                Ok(viterbi::viterbi_decode(
                    &Tensor::from_slice(&em, (b, l, t), dev)?,
                    &lengths,
                    &Tensor::from_slice(&trans, (t, t), dev)?,
                    &Tensor::from_slice(&start, t, dev)?,
                    &Tensor::from_slice(&end, t, dev)?,
                )?)
            };
            let (cpu_paths, cpu_scores) = on(&Device::Cpu)?;
            let (gpu_paths, gpu_scores) = on(&gpu)?;
            assert_eq!(gpu_paths, cpu_paths, "paths, B={b} L={l} T={t}");
            for (g, c) in gpu_scores.iter().zip(&cpu_scores) {
                // Same operation order on both: expected bit-equal; allowed a rounding step.
                assert!((g - c).abs() <= 1e-5 * c.abs().max(1.0), "score {g} vs {c}, B={b} L={l} T={t}");
            }
            cases += 1;
        }
        println!("viterbi: {cases} shapes, GPU == CPU");
        Ok(())
    }

    #[test]
    fn pool_gpu_matches_cpu() -> Result<()> {
        let Some(gpu) = gpu("pool_gpu_matches_cpu") else {
            return Ok(());
        };
        let mut rng = Rng(0xc0da_0002);
        let mut cases = 0;
        for &(b, max_len, h) in &[
            (1usize, 1usize, 1usize),
            (3, 1, 7),
            (3, 17, 7),
            (1, 600, 384),
            (70, 40, 384),
            (5, 9, 33),
            (4, 100, 1000),
            (2, 3, 32),
        ] {
            let lens: Vec<usize> = (0..b).map(|s| if s == 0 { max_len } else { 1 + rng.below(max_len) }).collect();
            let n: usize = lens.iter().sum();
            let x = Tensor::from_vec(rng.floats(n * h, 4.0), (n, h), &Device::Cpu)?;
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let xd = x.to_dtype(dtype)?;
                for normalize in [false, true] {
                    let want = pool::masked_mean_l2(&xd, &lens, normalize)?.flatten_all()?.to_vec1::<f32>()?;
                    let got = pool::masked_mean_l2(&xd.to_device(&gpu)?, &lens, normalize)?;
                    assert_eq!(got.dims(), &[b, h]);
                    let got = got.flatten_all()?.to_vec1::<f32>()?;
                    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-5 * scale,
                            "B={b} H={h} {dtype:?} norm={normalize} [{i}]: {g} vs {w}"
                        );
                    }
                    cases += 1;
                }
            }
        }
        println!("pool: {cases} cases, GPU == CPU within 1e-5");
        Ok(())
    }

    #[test]
    fn topk_gpu_matches_cpu() -> Result<()> {
        let Some(gpu) = gpu("topk_gpu_matches_cpu") else {
            return Ok(());
        };
        let mut rng = Rng(0xc0da_0003);
        let mut cases = 0;
        for &(q, n) in &[(1usize, 1usize), (3, 1), (3, 2), (17, 31), (3, 1000), (2, 4097), (4, 100_000), (300, 384)] {
            for nasty in [false, true] {
                let scores = if nasty { nasty_scores(&mut rng, q * n) } else { rng.floats(q * n, 1.0) };
                let t = Tensor::from_vec(scores, (q, n), &Device::Cpu)?;
                let tg = t.to_device(&gpu)?;
                for k in [1, 10, 128, 129, 1000, topk::MAX_CUDA_K, n, n + 3] {
                    if k.min(n) > topk::MAX_CUDA_K {
                        let err = topk::topk(&tg, k).unwrap_err().to_string();
                        assert!(err.contains("at most 1024"), "{err}");
                        continue;
                    }
                    let (cv, ci) = topk::topk(&t, k)?;
                    let (gv, gi) = topk::topk(&tg, k)?;
                    let what = format!("Q={q} N={n} k={k} nasty={nasty}");
                    assert_eq!(gi.to_vec2::<u32>()?, ci.to_vec2::<u32>()?, "indices, {what}");
                    let bits = |v: &Tensor| -> Result<Vec<u32>> {
                        Ok(v.flatten_all()?.to_vec1::<f32>()?.iter().map(|x| x.to_bits()).collect())
                    };
                    assert_eq!(bits(&gv)?, bits(&cv)?, "values, {what}");
                    cases += 1;
                }
            }
        }
        println!("topk: {cases} cases, GPU == CPU exactly");
        Ok(())
    }

    #[test]
    fn ops_refuse_mixed_devices() -> Result<()> {
        let Some(gpu) = gpu("ops_refuse_mixed_devices") else {
            return Ok(());
        };
        let em = Tensor::zeros((1, 2, 3), DType::F32, &gpu)?;
        let tr = Tensor::zeros((3, 3), DType::F32, &Device::Cpu)?;
        let v = Tensor::zeros(3, DType::F32, &gpu)?;
        let err = viterbi::viterbi_decode(&em, &[2], &tr, &v, &v).unwrap_err().to_string();
        assert!(err.contains("transitions is on"), "{err}");
        Ok(())
    }
}
