//! Image hot paths on CPU: decode + preprocess (per image, on real photos and on a 12-megapixel
//! phone-sized JPEG), and the image encoder at batch 1, 8, 32. Prints images/s and latency
//! percentiles.
//!   cargo bench -p concierge-benches --bench image
//!   cargo bench -p concierge-benches --bench image -- --model-dir model-store/open-nsfw --images DIR --seconds 5
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use clap::Parser;
use concierge_benches::{fmt_ms, percentile};
use concierge_models::imageproc::ImageLimits;
use concierge_models::{ImageEncoder, ModelSource};

#[derive(Parser)]
struct Args {
    /// Image model folder (default: the repository's Open-NSFW, from scripts/fetch-default-model.sh).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Folder of photos to decode (default: the sample photos the set-up step fetched).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Batch sizes for the encoder.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    // cargo bench passes --bench
    #[arg(long, hide = true)]
    bench: bool,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = args.model_dir.clone().unwrap_or_else(|| repo().join("model-store/open-nsfw"));
    let photos_dir = args.images.clone().unwrap_or_else(|| repo().join("model-store/open-nsfw-reference/images"));
    anyhow::ensure!(dir.join("model.safetensors").is_file(), "no image model in {}: run scripts/fetch-default-model.sh", dir.display());
    let enc = ImageEncoder::load(&ModelSource::Dir(dir), &Device::Cpu, DType::F32)?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "image bench: model {} ({}), dim {}, input {:?}, CPU threads {threads}",
        enc.info().id, enc.info().version, enc.info().dimension, enc.preprocessing().crop
    );

    let mut photos: Vec<(String, Vec<u8>)> = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&photos_dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}; run scripts/fetch-default-model.sh or pass --images", photos_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    for f in files {
        photos.push((f.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&f)?));
    }
    anyhow::ensure!(!photos.is_empty(), "no photos in {}", photos_dir.display());
    photos.push(("phone-4032x3024.jpg".into(), phone_photo(&photos[0].1)?));

    decode_bench(&enc, &photos, args.seconds)?;
    encoder_bench(&enc, &photos, &args.batches, args.seconds)?;
    Ok(())
}

/// A 12-megapixel JPEG (quality 90) made from a sample photo: what a phone uploads.
fn phone_photo(src: &[u8]) -> anyhow::Result<Vec<u8>> {
    let img = image::load_from_memory(src)?.to_rgb8();
    let big = image::imageops::resize(&img, 4032, 3024, image::imageops::FilterType::Triangle);
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&big)?;
    Ok(out)
}

fn decode_bench(enc: &ImageEncoder, photos: &[(String, Vec<u8>)], seconds: f64) -> anyhow::Result<()> {
    let limits = ImageLimits::default();
    println!("\n== decode + preprocess, one thread, per image ==");
    println!("{:<24} {:>9} {:>10} {:>9} {:>9} {:>9}", "image", "KiB", "images/s", "p50 ms", "p90 ms", "p99 ms");
    for (name, bytes) in photos {
        let dims = image::load_from_memory(bytes).map(|i| (i.width(), i.height())).unwrap_or((0, 0));
        let mut lat = Vec::new();
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < seconds || lat.len() < 5 {
            let t0 = Instant::now();
            let p = enc.prepare(0, bytes, &limits)?;
            std::hint::black_box(&p);
            lat.push(t0.elapsed());
        }
        let secs = start.elapsed().as_secs_f64();
        lat.sort();
        println!(
            "{:<24} {:>9.0} {:>10.1} {:>9} {:>9} {:>9}   ({}x{})",
            name, bytes.len() as f64 / 1024.0, lat.len() as f64 / secs,
            fmt_ms(percentile(&lat, 50.0)), fmt_ms(percentile(&lat, 90.0)), fmt_ms(percentile(&lat, 99.0)), dims.0, dims.1
        );
    }
    // All cores, as the server's decoding pool runs (one image per thread).
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let sample: Vec<&Vec<u8>> = photos.iter().filter(|(n, _)| !n.starts_with("phone")).map(|(_, b)| b).collect();
    let start = Instant::now();
    let done = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (sample, done, limits) = (&sample, &done, &limits);
            s.spawn(move || {
                let mut k = t;
                while start.elapsed().as_secs_f64() < seconds {
                    let p = enc.prepare(0, sample[k % sample.len()], limits).expect("decodes");
                    std::hint::black_box(&p);
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    k += threads;
                }
            });
        }
    });
    let n = done.load(std::sync::atomic::Ordering::Relaxed);
    println!("all sample photos, {threads} threads: {:.1} images/s", n as f64 / start.elapsed().as_secs_f64());
    println!("RESULT decode_images_per_s_{threads}_threads {:.1}", n as f64 / start.elapsed().as_secs_f64());
    Ok(())
}

fn encoder_bench(enc: &ImageEncoder, photos: &[(String, Vec<u8>)], batches: &[usize], seconds: f64) -> anyhow::Result<()> {
    let limits = ImageLimits::default();
    let prepared: Vec<Vec<f32>> = photos.iter().map(|(_, b)| enc.prepare(0, b, &limits)).collect::<Result<_, _>>()?;
    println!("\n== encoder (ResNet forward + head), prepared inputs ==");
    println!("{:>6} {:>10} {:>12} {:>12} {:>12}", "batch", "images/s", "p50 ms", "p90 ms", "p99 ms");
    for &b in batches {
        let batch: Vec<&[f32]> = (0..b).map(|i| prepared[i % prepared.len()].as_slice()).collect();
        let normalize = vec![true; b];
        enc.embed(&batch, &normalize)?; // warm-up
        let mut lat: Vec<Duration> = Vec::new();
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < seconds || lat.len() < 3 {
            let t0 = Instant::now();
            let out = enc.embed(&batch, &normalize)?;
            assert_eq!(out.len(), b);
            lat.push(t0.elapsed());
        }
        let secs = start.elapsed().as_secs_f64();
        lat.sort();
        let ips = (lat.len() * b) as f64 / secs;
        println!(
            "{:>6} {:>10.1} {:>12} {:>12} {:>12}",
            b, ips, fmt_ms(percentile(&lat, 50.0)), fmt_ms(percentile(&lat, 90.0)), fmt_ms(percentile(&lat, 99.0))
        );
        println!("RESULT encoder_images_per_s_batch_{b} {ips:.1}");
    }
    Ok(())
}
