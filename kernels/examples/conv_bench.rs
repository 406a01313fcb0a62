//! Times the channels-last conv on every conv shape of Open-NSFW (ResNet-50-1by2, 224x224) and
//! adds them up as the network runs them, with GMAC/s per shape: where a forward pass goes.
//!   cargo run --release -p concierge-kernels --example conv_bench -- [BATCH]
use std::time::Instant;

use concierge_kernels::conv::{Buffers, ConvSpec, Nhwc, PackedConv};
use concierge_kernels::gemm::Act;

fn main() {
    let batch: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(8);
    let spec = |c_in, c_out, k, stride, pad| ConvSpec { c_in, c_out, kh: k, kw: k, stride, pad };
    // (input side, spec, times in the network)
    let mut shapes = vec![(224, spec(3, 64, 7, 2, [3; 4]), 1)];
    let (mut side, mut c_in) = (56, 64);
    for (stage, (&width, &blocks)) in [32, 64, 128, 256].iter().zip(&[3, 4, 6, 3]).enumerate() {
        let stride = if stage > 0 { 2 } else { 1 };
        let out = side / stride;
        shapes.push((side, spec(c_in, width, 1, stride, [0; 4]), 1));
        shapes.push((side, spec(c_in, 4 * width, 1, stride, [0; 4]), 1));
        shapes.push((out, spec(4 * width, width, 1, 1, [0; 4]), blocks - 1));
        shapes.push((out, spec(width, width, 3, 1, [1; 4]), blocks));
        shapes.push((out, spec(width, 4 * width, 1, 1, [0; 4]), blocks));
        (side, c_in) = (out, 4 * width);
    }
    let mut bufs = Buffers::default();
    let (mut total_ms, mut total_macs) = (0.0, 0.0);
    println!("batch {batch}, {} threads", rayon::current_num_threads());
    println!("{:>5} {:>34} {:>3} {:>9} {:>9}", "side", "conv", "x", "ms", "GMAC/s");
    for (side, s, times) in shapes {
        let w: Vec<f32> = (0..s.c_out * s.c_in * s.kh * s.kw).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
        let conv = PackedConv::new(s, &w, &vec![0.1; s.c_out]);
        let x = Nhwc::new(batch, side, side, s.c_in, (0..batch * side * side * s.c_in).map(|i| (i % 17) as f32 * 0.1).collect());
        let (oh, ow) = s.out_hw(side, side);
        let macs = (batch * oh * ow * s.c_out * s.c_in * s.kh * s.kw) as f64;
        let mut best = f64::MAX;
        for _ in 0..7 {
            let t = Instant::now();
            let y = concierge_kernels::on_cpu_pool(|| conv.forward(&x, Act::Relu, None, false, &mut bufs));
            best = best.min(t.elapsed().as_secs_f64());
            bufs.give(y.data);
        }
        let name = format!("{}x{} s{} {}->{}", s.kh, s.kw, s.stride, s.c_in, s.c_out);
        println!("{side:>5} {name:>34} {times:>3} {:>9.2} {:>9.1}", best * 1e3, macs / best / 1e9);
        total_ms += best * 1e3 * times as f64;
        total_macs += macs * times as f64;
    }
    println!(
        "convs: {total_ms:.1} ms a batch, {:.2} ms an image, {:.1} GMAC/s",
        total_ms / batch as f64,
        total_macs / total_ms / 1e6
    );
}
