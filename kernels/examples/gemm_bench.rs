//! GFLOP/s of the packed GEMM on the encoder's shapes: `cargo run --release --example gemm_bench`.
use std::time::Instant;

use concierge_kernels::gemm::{gemm, Act, Epilogue, PackedB};

fn main() {
    attention_bench();
    if std::env::var("ONLY_ATTENTION").is_ok() {
        return;
    }
    let m: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(512);
    for &(k, n, act) in &[(384, 1152, Act::None), (384, 384, Act::None), (384, 1536, Act::GeluErf), (1536, 384, Act::None)] {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 1000) as f32 * 1e-3 - 0.5).collect();
        let bias = vec![0.1f32; n];
        let res = vec![0.2f32; m * n];
        let pb = PackedB::pack(&b, k, n);
        let mut out = vec![0f32; m * n];
        let epi = Epilogue { bias: Some(&bias), act, residual: if n == 384 { Some(&res) } else { None }, act_after_residual: false };
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            let reps = 20;
            for _ in 0..reps {
                gemm(&a, m, &pb, &epi, &mut out);
            }
            best = best.min(t.elapsed().as_secs_f64() / reps as f64);
        }
        println!("m {m} k {k} n {n} {act:?}: {:.3} ms, {:.1} GFLOP/s", best * 1e3, 2.0 * (m * k * n) as f64 / best / 1e9);
    }
}

/// Attention on a Banking77-like batch: 32 sequences of 6..40 tokens, 12 heads of 32.
#[allow(dead_code)]
pub fn attention_bench() {
    use candle_core::{Device, Tensor};
    // ATT_LEN=n: 32 sequences of n tokens instead.
    let fixed: Option<usize> = std::env::var("ATT_LEN").ok().and_then(|s| s.parse().ok());
    let lens: Vec<usize> = (0..32).map(|i| fixed.unwrap_or(6 + (i * 13) % 35)).collect();
    let t: usize = lens.iter().sum();
    let qkv = Tensor::randn(0f32, 1f32, (t, 3 * 384), &Device::Cpu).unwrap();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..100 {
            concierge_kernels::attention::varlen_self_attention(&qkv, &lens, 12).unwrap();
        }
        best = best.min(start.elapsed().as_secs_f64() / 100.0);
    }
    let flops: usize = lens.iter().map(|&l| 4 * l * l * 384).sum();
    println!("attention {t} tokens in {} sequences: {:.3} ms, {:.1} GFLOP/s", lens.len(), best * 1e3, flops as f64 / best / 1e9);
}
