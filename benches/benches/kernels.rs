//! The kernels crate's CRF Viterbi, masked mean + L2 pooling and top-k against the candle
//! tensor-op paths they replace: `Crf::decode_tensor_ops`; `Pooling::mean().pool` then the
//! per-row normalisation `TextEncoder::embed` does; `arg_sort_last_dim` then a gather. Seeded
//! random inputs, shapes of this project's use (ATIS tagger: 159 tags; MiniLM: hidden 384;
//! knowledge-base scans of 10k and 100k rows). Prints calls/s and per-call latency
//! percentiles; every call ends with its result on the host, so a GPU row includes the GPU's
//! work. Built with `--features cuda` and run where a GPU is present, CUDA rows are added.
//!   cargo bench -p concierge-benches --bench kernels -- --seconds 1
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use concierge_benches::{fmt_ms, percentile};
use concierge_kernels::{pool, topk, viterbi};
use concierge_models::encoder::l2_normalize;
use concierge_models::pooling::Pooling;
use concierge_models::tagger::Crf;

#[derive(Parser)]
struct Args {
    /// Seconds per row.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    #[arg(long, hide = true)]
    bench: bool,
}

/// xorshift64*: the same inputs every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn floats(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale).collect()
    }
    fn lengths(&mut self, b: usize, lo: usize, hi: usize) -> Vec<usize> {
        (0..b).map(|i| if i == 0 { hi } else { lo + (self.next() % (hi - lo + 1) as u64) as usize }).collect()
    }
}

/// Runs `f` (after one warm-up call) for `seconds` and prints a row.
fn row(op: &str, shape: &str, path: &str, seconds: f64, mut f: impl FnMut() -> anyhow::Result<()>) {
    if let Err(e) = f() {
        println!("{op:<8} {shape:<24} {path:<22} {:>10}  ({e})", "n/a");
        return;
    }
    let mut lat: Vec<Duration> = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds || lat.len() < 5 {
        let t0 = Instant::now();
        f().expect("a call that succeeded once failed");
        lat.push(t0.elapsed());
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    println!(
        "{op:<8} {shape:<24} {path:<22} {:>10.1} {:>9} {:>9} {:>9}",
        lat.len() as f64 / secs,
        fmt_ms(percentile(&lat, 50.0)),
        fmt_ms(percentile(&lat, 90.0)),
        fmt_ms(percentile(&lat, 99.0))
    );
}

/// The inputs of one Viterbi shape, on any device.
struct CrfCase {
    crf: Crf,
    em: Tensor,
    lengths: Vec<usize>,
}

impl CrfCase {
    fn new(rng: &mut Rng, b: usize, l: usize, t: usize) -> anyhow::Result<Self> {
        let dev = Device::Cpu;
        let crf = Crf::new(
            Tensor::from_vec(rng.floats(t * t, 2.0), (t, t), &dev)?,
            Tensor::from_vec(rng.floats(t, 2.0), t, &dev)?,
            Tensor::from_vec(rng.floats(t, 2.0), t, &dev)?,
        )?;
        let em = Tensor::from_vec(rng.floats(b * l * t, 3.0), (b, l, t), &dev)?;
        Ok(Self { crf, em, lengths: rng.lengths(b, l / 3, l) })
    }

    fn to(&self, dev: &Device) -> anyhow::Result<Self> {
        let crf = Crf::new(
            self.crf.transitions().to_device(dev)?,
            self.crf.start_transitions().to_device(dev)?,
            self.crf.end_transitions().to_device(dev)?,
        )?;
        Ok(Self { crf, em: self.em.to_device(dev)?, lengths: self.lengths.clone() })
    }

    fn kernel(&self) -> anyhow::Result<()> {
        let c = &self.crf;
        viterbi::viterbi_decode(&self.em, &self.lengths, c.transitions(), c.start_transitions(), c.end_transitions())?;
        Ok(())
    }

    fn tensor_ops(&self) -> anyhow::Result<()> {
        self.crf.decode_tensor_ops(&self.em, &self.lengths)?;
        Ok(())
    }
}

/// Mean pooling and normalisation as the encoder does it: the pooling matmul, then each row
/// normalised on the host.
fn pool_tensor_ops(hidden: &Tensor, lens: &[usize]) -> anyhow::Result<()> {
    let mut rows = Pooling::mean().pool(hidden, lens)?.to_vec2::<f32>()?;
    rows.iter_mut().for_each(|r| l2_normalize(r));
    Ok(())
}

fn pool_kernel(hidden: &Tensor, lens: &[usize]) -> anyhow::Result<()> {
    pool::masked_mean_l2(hidden, lens, true)?.to_vec2::<f32>()?;
    Ok(())
}

/// Top-k by a full sort of each row, as candle offers it.
fn topk_sort(scores: &Tensor, k: usize) -> anyhow::Result<()> {
    let idx = scores.arg_sort_last_dim(false)?.narrow(1, 0, k)?.contiguous()?;
    scores.gather(&idx, 1)?.to_vec2::<f32>()?;
    idx.to_vec2::<u32>()?;
    Ok(())
}

fn topk_kernel(scores: &Tensor, k: usize) -> anyhow::Result<()> {
    let (v, i) = topk::topk(scores, k)?;
    v.to_vec2::<f32>()?;
    i.to_vec2::<u32>()?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let s = args.seconds;
    let gpu = gpu();
    println!(
        "kernels bench: {} rayon threads, {}",
        rayon::current_num_threads(),
        match &gpu {
            Some(_) => "CUDA device 0".to_string(),
            None => "no GPU rows (CPU build, or no usable GPU)".to_string(),
        }
    );
    println!(
        "{:<8} {:<24} {:<22} {:>10} {:>9} {:>9} {:>9}",
        "op", "shape", "path", "calls/s", "p50 ms", "p90 ms", "p99 ms"
    );
    let mut rng = Rng(0x006b_6572_6e65_6c73);

    for (b, l, t) in [(1usize, 24usize, 159usize), (32, 24, 9), (32, 24, 159)] {
        let shape = format!("B={b} L<={l} T={t}");
        let case = CrfCase::new(&mut rng, b, l, t)?;
        row("viterbi", &shape, "cpu tensor ops", s, || case.tensor_ops());
        row("viterbi", &shape, "cpu kernel", s, || case.kernel());
        if let Some(dev) = &gpu {
            let case = case.to(dev)?;
            row("viterbi", &shape, "cuda tensor ops", s, || case.tensor_ops());
            row("viterbi", &shape, "cuda kernel", s, || case.kernel());
        }
    }

    for (b, h) in [(1usize, 384usize), (32, 384)] {
        let lens = rng.lengths(b, 8, 24);
        let n: usize = lens.iter().sum();
        let shape = format!("B={b} N={n} H={h}");
        let hidden = Tensor::from_vec(rng.floats(n * h, 2.0), (n, h), &Device::Cpu)?;
        row("pool+l2", &shape, "cpu tensor ops", s, || pool_tensor_ops(&hidden, &lens));
        row("pool+l2", &shape, "cpu kernel", s, || pool_kernel(&hidden, &lens));
        if let Some(dev) = &gpu {
            let hidden = hidden.to_device(dev)?;
            row("pool+l2", &shape, "cuda tensor ops", s, || pool_tensor_ops(&hidden, &lens));
            row("pool+l2", &shape, "cuda kernel", s, || pool_kernel(&hidden, &lens));
            let half = hidden.to_dtype(DType::F16)?;
            row("pool+l2", &shape, "cuda kernel f16", s, || pool_kernel(&half, &lens));
        }
    }

    for (q, n, k) in [(1usize, 10_000usize, 10usize), (32, 10_000, 10), (1, 100_000, 10), (32, 100_000, 10)] {
        let shape = format!("Q={q} N={n} k={k}");
        let scores = Tensor::from_vec(rng.floats(q * n, 1.0), (q, n), &Device::Cpu)?;
        row("topk", &shape, "cpu arg_sort+gather", s, || topk_sort(&scores, k));
        row("topk", &shape, "cpu kernel", s, || topk_kernel(&scores, k));
        if let Some(dev) = &gpu {
            let scores = scores.to_device(dev)?;
            row("topk", &shape, "cuda arg_sort+gather", s, || topk_sort(&scores, k));
            row("topk", &shape, "cuda kernel", s, || topk_kernel(&scores, k));
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn gpu() -> Option<Device> {
    Device::new_cuda(0).map_err(|e| println!("no CUDA device 0: {e}")).ok()
}

#[cfg(not(feature = "cuda"))]
fn gpu() -> Option<Device> {
    None
}
