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
    Ok(img.to_rgb8())
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
    let resized = if (rw, rh) == (w, h) { img.clone() } else { image::imageops::resize(img, rw, rh, FilterType::Triangle) };
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

#[cfg(test)]
mod tests {
    use super::*;

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
