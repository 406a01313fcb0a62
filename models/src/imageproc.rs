//! Image inputs: decoding (JPEG, PNG, WebP, GIF's first frame, BMP) with the `image` crate,
//! EXIF orientation, conversion of greyscale / alpha / CMYK to RGB, then resize, centre crop and
//! normalisation into the `[3, H, W]` f32 layout a vision encoder takes. Limits on encoded bytes
//! and on the pixels an image declares are checked from its header, before anything is
//! decoded, so a decompression bomb costs nothing. CPU work: callers run it on a blocking pool.
use std::io::Cursor;

use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use crate::resnet::{ChannelOrder, ResNetConfig};

/// Why an image was refused. The messages name the image by its index in the request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ImageError {
    #[error("image {index} is empty; send the file's bytes")]
    Empty { index: usize },
    #[error("image {index} is {bytes} bytes; the limit is {limit}; send a smaller file")]
    TooManyBytes { index: usize, bytes: usize, limit: usize },
    #[error("image {index} is {width}x{height} = {pixels} pixels; the limit is {limit} pixels; downscale it before sending")]
    TooManyPixels { index: usize, width: u32, height: u32, pixels: u64, limit: u64 },
    #[error("image {index} is not in a supported format ({what}); send JPEG, PNG, WebP, GIF or BMP")]
    Unsupported { index: usize, what: String },
    #[error("image {index} could not be decoded ({format}): {reason}")]
    Corrupt { index: usize, format: String, reason: String },
}

/// Limits checked before decoding.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    pub max_bytes: usize,
    /// Width x height as the header declares it.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self { max_bytes: 10 << 20, max_pixels: 40_000_000 }
    }
}

/// How a decoded image becomes model input.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    pub resize: Resize,
    /// Centre crop `[height, width]` after resizing.
    pub crop: [u32; 2],
    /// Channel order of the output: RGB (torchvision) or BGR (Caffe-born weights).
    pub bgr: bool,
    /// Pixels (0..=255) are multiplied by this first: 1/255 for torchvision, 1 for Caffe.
    pub scale: f32,
    /// Per output channel, after scaling: `(x - mean) / std`.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// In a checkpoint's `config.json` (ResNetConfig's `resize`): `{"shorter_side": 256}` or
/// `{"exact": [256, 256]}`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resize {
    /// Shorter side to this many pixels, aspect ratio kept (torchvision `Resize(256)`).
    ShorterSide(u32),
    /// Exactly `[height, width]`, aspect ratio not kept.
    Exact([u32; 2]),
}

impl Preprocess {
    /// torchvision's ImageNet evaluation transform: Resize(256), CenterCrop(224), ToTensor,
    /// Normalize(ImageNet mean, std).
    pub fn imagenet() -> Self {
        Self {
            resize: Resize::ShorterSide(256),
            crop: [224, 224],
            bgr: false,
            scale: 1.0 / 255.0,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }

    /// The preprocessing a ResNet checkpoint declares in its `config.json`: its `resize` (by
    /// default torchvision's shorter side to `input_size * 256 / 224`), a centre crop of
    /// `input_size`, its channel order, and `(pixel / 255 * scale - mean) / std`.
    pub fn from_config(cfg: &ResNetConfig) -> Self {
        let side = cfg.input_size as u32;
        let resize = cfg.resize.unwrap_or(Resize::ShorterSide(((side as u64 * 256 + 112) / 224) as u32));
        Self {
            resize,
            crop: [side, side],
            bgr: cfg.channel_order == ChannelOrder::Bgr,
            scale: cfg.scale / 255.0,
            mean: cfg.mean,
            std: cfg.std,
        }
    }
}

const SUPPORTED: [ImageFormat; 5] = [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP, ImageFormat::Gif, ImageFormat::Bmp];

/// Decodes an image to RGB with its EXIF orientation applied, refusing it (before decoding)
/// when it is over the limits.
pub fn decode(index: usize, bytes: &[u8], limits: &ImageLimits) -> Result<image::RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty { index });
    }
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooManyBytes { index, bytes: bytes.len(), limit: limits.max_bytes });
    }
    let format = image::guess_format(bytes).map_err(|_| ImageError::Unsupported {
        index,
        what: "the first bytes match no known image format".into(),
    })?;
    if !SUPPORTED.contains(&format) {
        return Err(ImageError::Unsupported { index, what: format!("{format:?}") });
    }
    let name = format!("{format:?}");
    // The JPEG decoder fills a cut-off scan with grey rather than failing, so a partial upload
    // would be embedded as if it were whole: refuse a JPEG without its end-of-image marker.
    if format == ImageFormat::Jpeg {
        let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        if !bytes[..end].ends_with(&[0xFF, 0xD9]) {
            return Err(ImageError::Corrupt {
                index,
                format: name,
                reason: "it is truncated (no end-of-image marker); send the whole file".into(),
            });
        }
    }
    // The declared size, from the header alone (no pixel is decoded yet).
    let mut header = ImageReader::with_format(Cursor::new(bytes), format);
    header.no_limits();
    let (width, height) = header.into_dimensions().map_err(|e| ImageError::Corrupt {
        index,
        format: name.clone(),
        reason: format!("its header cannot be read: {e}"),
    })?;
    let pixels = width as u64 * height as u64;
    if pixels > limits.max_pixels {
        return Err(ImageError::TooManyPixels { index, width, height, pixels, limit: limits.max_pixels });
    }
    if pixels == 0 {
        return Err(ImageError::Corrupt { index, format: name, reason: "it has no pixels".into() });
    }
    let corrupt = |e: image::ImageError| match e {
        image::ImageError::Limits(l) => ImageError::Corrupt { index, format: name.clone(), reason: format!("over the decoder's limits: {l}") },
        image::ImageError::Unsupported(u) => ImageError::Unsupported { index, what: u.to_string() },
        other => ImageError::Corrupt { index, format: name.clone(), reason: other.to_string() },
    };
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut decoder_limits = Limits::default();
    // Room for the declared pixels as RGBA 16-bit plus the decoder's own buffers.
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(decoder_limits);
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let orientation = decoder.orientation().map_err(corrupt)?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    img.apply_orientation(orientation);
    // No copy when the decoder already gave 8-bit RGB (JPEG, most PNGs).
    Ok(img.into_rgb8())
}

/// Resize, centre crop and normalise: `[3, crop_h, crop_w]` f32, channel-major.
pub fn preprocess(img: &image::RgbImage, p: &Preprocess) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let (rw, rh) = match p.resize {
        Resize::ShorterSide(s) => {
            if w <= h {
                (s, ((h as u64 * s as u64 + w as u64 / 2) / w as u64).max(1) as u32)
            } else {
                (((w as u64 * s as u64 + h as u64 / 2) / h as u64).max(1) as u32, s)
            }
        }
        Resize::Exact([eh, ew]) => (ew, eh),
    };
    let resized = if (rw, rh) == (w, h) {
        img.clone()
    } else {
        // A phone photo is 10-20x the model's input: average whole blocks first (cheap, and an
        // anti-aliasing filter itself) down to at least twice the target, so the bilinear
        // filter's wide support runs over a few hundred thousand pixels, not twelve million.
        let f = (w / rw).min(h / rh) / 2;
        match f {
            0 | 1 => image::imageops::resize(img, rw, rh, FilterType::Triangle),
            f => image::imageops::resize(&box_reduce(img, f), rw, rh, FilterType::Triangle),
        }
    };
    let [ch, cw] = p.crop;
    // An image smaller than the crop is padded with zeros (torchvision's CenterCrop does the same).
    let left = (rw as i64 - cw as i64) / 2;
    let top = (rh as i64 - ch as i64) / 2;
    let plane = (ch * cw) as usize;
    let mut out = vec![0f32; 3 * plane];
    for y in 0..ch as i64 {
        let sy = y + top;
        for x in 0..cw as i64 {
            let sx = x + left;
            let px = if sy >= 0 && sx >= 0 && sy < rh as i64 && sx < rw as i64 {
                resized.get_pixel(sx as u32, sy as u32).0
            } else {
                [0, 0, 0]
            };
            let at = y as usize * cw as usize + x as usize;
            for c in 0..3 {
                let v = px[if p.bgr { 2 - c } else { c }] as f32 * p.scale;
                out[c * plane + at] = (v - p.mean[c]) / p.std[c];
            }
        }
    }
    out
}

/// Averages `f x f` blocks (the right and bottom remainders fold into the last block).
pub fn box_reduce(img: &image::RgbImage, f: u32) -> image::RgbImage {
    let (w, h) = img.dimensions();
    let (ow, oh) = ((w / f).max(1), (h / f).max(1));
    let src = img.as_raw();
    let mut out = vec![0u8; (ow * oh * 3) as usize];
    let mut acc = vec![0u32; (ow * 3) as usize];
    let mut counts = vec![0u32; ow as usize];
    for oy in 0..oh {
        let y0 = oy * f;
        let y1 = if oy + 1 == oh { h } else { y0 + f };
        acc.iter_mut().for_each(|a| *a = 0);
        counts.iter_mut().for_each(|c| *c = 0);
        for y in y0..y1 {
            let row = &src[(y * w * 3) as usize..((y + 1) * w * 3) as usize];
            for ox in 0..ow {
                let x0 = (ox * f) as usize;
                let x1 = if ox + 1 == ow { w as usize } else { x0 + f as usize };
                let (mut r, mut g, mut b) = (0u32, 0u32, 0u32);
                for p in row[x0 * 3..x1 * 3].chunks_exact(3) {
                    r += p[0] as u32;
                    g += p[1] as u32;
                    b += p[2] as u32;
                }
                let o = ox as usize;
                acc[o * 3] += r;
                acc[o * 3 + 1] += g;
                acc[o * 3 + 2] += b;
                counts[o] += (x1 - x0) as u32;
            }
        }
        let rows = y1 - y0;
        let dst = &mut out[(oy * ow * 3) as usize..((oy + 1) * ow * 3) as usize];
        for ox in 0..ow as usize {
            let n = counts[ox];
            debug_assert_eq!(n % rows, 0);
            for c in 0..3 {
                dst[ox * 3 + c] = ((acc[ox * 3 + c] + n / 2) / n) as u8;
            }
        }
    }
    image::RgbImage::from_raw(ow, oh, out).expect("sized above")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_reduce_averages_blocks_and_large_downscales_stay_close_to_plain_bilinear() {
        let img = image::RgbImage::from_fn(7, 5, |x, y| image::Rgb([(x * 10) as u8, (y * 20) as u8, 200]));
        let r = box_reduce(&img, 2);
        assert_eq!(r.dimensions(), (3, 2));
        // block (0,0): x 0..2, y 0..2 -> red mean 5, green mean 10; last column folds x 4..7.
        assert_eq!(r.get_pixel(0, 0).0, [5, 10, 200]);
        assert_eq!(r.get_pixel(2, 0).0, [50, 10, 200]);
        // last row folds y 2..5: green mean of 40, 60, 80.
        assert_eq!(r.get_pixel(0, 1).0, [5, 60, 200]);

        // A smooth 2000x1500 picture to 256x256: the two-step path vs one bilinear resize.
        let big = image::RgbImage::from_fn(2000, 1500, |x, y| {
            let v = ((x as f32 / 97.0).sin() * 60.0 + (y as f32 / 53.0).cos() * 60.0 + 128.0) as u8;
            image::Rgb([v, (x / 8 % 256) as u8, (y / 6 % 256) as u8])
        });
        let p = Preprocess { resize: Resize::Exact([256, 256]), crop: [256, 256], bgr: false, scale: 1.0, mean: [0.0; 3], std: [1.0; 3] };
        let fast = preprocess(&big, &p);
        let plain = image::imageops::resize(&big, 256, 256, FilterType::Triangle);
        let mut total = 0f64;
        let mut worst = 0f32;
        for (i, px) in plain.pixels().enumerate() {
            for c in 0..3 {
                let d = (fast[c * 256 * 256 + i] - px.0[c] as f32).abs();
                total += d as f64;
                worst = worst.max(d);
            }
        }
        let mean = total / (256.0 * 256.0 * 3.0);
        assert!(mean < 1.0 && worst <= 8.0, "two-step resize off plain bilinear: mean {mean:.3}, worst {worst}");
    }

    #[test]
    fn torchvision_config_gives_the_imagenet_transform() {
        assert_eq!(Preprocess::from_config(&ResNetConfig::resnet50()), Preprocess::imagenet());
        let small = ResNetConfig { input_size: 112, ..ResNetConfig::resnet18() };
        let p = Preprocess::from_config(&small);
        assert_eq!((p.resize, p.crop), (Resize::ShorterSide(128), [112, 112]));
    }

    #[test]
    fn caffe_config_gives_exact_resize_bgr_and_0_to_255_pixels() {
        let cfg: ResNetConfig = serde_json::from_str(
            r#"{"block": "bottleneck", "layers": [3, 4, 6, 3], "resize": {"exact": [256, 256]},
                "mean": [104, 117, 123], "std": [1, 1, 1], "channel_order": "bgr", "scale": 255,
                "labels": ["safe", "unsafe"]}"#,
        )
        .unwrap();
        let p = Preprocess::from_config(&cfg);
        let want = Preprocess {
            resize: Resize::Exact([256, 256]),
            crop: [224, 224],
            bgr: true,
            scale: 1.0,
            mean: [104.0, 117.0, 123.0],
            std: [1.0; 3],
        };
        assert_eq!(p, want);
        let shorter: ResNetConfig =
            serde_json::from_str(r#"{"block": "basic", "layers": [2, 2, 2, 2], "resize": {"shorter_side": 300}}"#).unwrap();
        assert_eq!(Preprocess::from_config(&shorter).resize, Resize::ShorterSide(300));
    }
}
