//! Single-thread throughput of `dot::inner_products` on an L2-sized block (no memory traffic):
//! `cargo run --release -p concierge-kernels --example dot_bench`.
use std::time::Instant;

fn main() {
    let d = 384;
    for &(nq, n) in &[(1usize, 256usize), (8, 256), (32, 256), (32, 1024)] {
        let q: Vec<f32> = (0..nq * d).map(|i| (i % 7) as f32 * 0.1).collect();
        let r: Vec<f32> = (0..n * d).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut out = vec![0f32; nq * n];
        let reps = (2_000_000_000 / (nq * n * d * 2)).max(1);
        let t = Instant::now();
        for _ in 0..reps {
            concierge_kernels::dot::inner_products(&q, nq, &r, d, &mut out);
        }
        let s = t.elapsed().as_secs_f64();
        println!("nq={nq:3} n={n:5}: {:.1} GFLOP/s", (reps * nq * n * d * 2) as f64 / s / 1e9);
    }
}
