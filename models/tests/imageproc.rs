//! Image decoding and preprocessing: every supported format, EXIF orientation, greyscale /
//! alpha / CMYK to RGB, limits checked from the header, corrupt and unsupported files, and the
//! resize / crop / normalise arithmetic.
use concierge_models::imageproc::{decode, preprocess, ImageError, ImageLimits, Preprocess, Resize};
use image::{ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};

fn encode(img: image::DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// A 6x4 image: left half red, right half blue.
fn two_tone() -> RgbImage {
    RgbImage::from_fn(6, 4, |x, _| if x < 3 { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) })
}

#[test]
fn every_format_decodes_to_rgb() {
    let limits = ImageLimits::default();
    let img = image::DynamicImage::ImageRgb8(two_tone());
    for format in [ImageFormat::Png, ImageFormat::Bmp, ImageFormat::Gif, ImageFormat::WebP, ImageFormat::Jpeg] {
        let bytes = encode(img.clone(), format);
        let rgb = decode(0, &bytes, &limits).unwrap_or_else(|e| panic!("{format:?}: {e}"));
        assert_eq!(rgb.dimensions(), (6, 4), "{format:?}");
        let tol = if format == ImageFormat::Jpeg || format == ImageFormat::Gif { 40 } else { 0 };
        let (l, r) = (rgb.get_pixel(0, 1).0, rgb.get_pixel(5, 1).0);
        assert!(l[0] as i32 >= 255 - tol && (l[2] as i32) <= tol, "{format:?} left {l:?}");
        assert!(r[2] as i32 >= 255 - tol && (r[0] as i32) <= tol, "{format:?} right {r:?}");
    }
}

#[test]
fn greyscale_alpha_and_cmyk_become_rgb() {
    let limits = ImageLimits::default();
    let grey = image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(5, 5, image::Luma([90])));
    let rgb = decode(0, &encode(grey, ImageFormat::Png), &limits).unwrap();
    assert_eq!(rgb.get_pixel(2, 2).0, [90, 90, 90]);
    let rgba = image::DynamicImage::ImageRgba8(RgbaImage::from_pixel(3, 3, Rgba([10, 20, 30, 0])));
    let rgb = decode(0, &encode(rgba, ImageFormat::Png), &limits).unwrap();
    assert_eq!(rgb.get_pixel(1, 1).0, [10, 20, 30], "alpha is dropped, colour kept");
    // Made by scripts/make_image_fixtures.py: pure red in CMYK.
    let cmyk = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/images/cmyk.jpg")).unwrap();
    let rgb = decode(0, &cmyk, &limits).unwrap();
    let p = rgb.get_pixel(8, 4).0;
    assert!(p[0] > 230 && p[1] < 25 && p[2] < 25, "CMYK red decoded as {p:?}");
}

/// A JPEG whose EXIF says "rotate 90° clockwise to display" (orientation 6) comes out turned.
#[test]
fn exif_orientation_is_applied() {
    let jpeg = encode(image::DynamicImage::ImageRgb8(two_tone()), ImageFormat::Jpeg);
    // APP1 "Exif": little-endian TIFF header, one IFD entry: Orientation (0x0112), SHORT, 1, 6.
    let mut tiff = b"II*\0\x08\0\0\0".to_vec();
    tiff.extend_from_slice(&[1, 0, 0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]);
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let len = (app1.len() + 2) as u16;
    let mut bytes = jpeg[..2].to_vec();
    bytes.extend_from_slice(&[0xFF, 0xE1]);
    bytes.extend_from_slice(&len.to_be_bytes());
    bytes.extend_from_slice(&app1);
    bytes.extend_from_slice(&jpeg[2..]);
    let rgb = decode(0, &bytes, &ImageLimits::default()).unwrap();
    assert_eq!(rgb.dimensions(), (4, 6), "rotated: width and height swap");
    // Red was on the left; turned clockwise it is on top.
    let (top, bottom) = (rgb.get_pixel(2, 0).0, rgb.get_pixel(2, 5).0);
    assert!(top[0] > 200 && top[2] < 60, "top {top:?}");
    assert!(bottom[2] > 200 && bottom[0] < 60, "bottom {bottom:?}");
}

/// A PNG that declares 20000 x 20000 pixels in 77 bytes is refused from its header.
#[test]
fn decompression_bomb_is_refused_before_decoding() {
    fn chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        let mut h = crc32fast_like(kind, data);
        h ^= 0;
        c.extend_from_slice(&h.to_be_bytes());
        c
    }
    let mut ihdr = 20_000u32.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&20_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit greyscale
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01])); // an empty zlib stream
    png.extend(chunk(b"IEND", &[]));
    let e = decode(3, &png, &ImageLimits::default()).unwrap_err();
    assert_eq!(e, ImageError::TooManyPixels { index: 3, width: 20_000, height: 20_000, pixels: 400_000_000, limit: 40_000_000 });
    assert!(e.to_string().contains("image 3 is 20000x20000"), "{e}");
}

/// PNG's CRC-32 (the same polynomial as zlib), bitwise: enough for two chunks.
fn crc32fast_like(kind: &[u8], data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in kind.iter().chain(data) {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn bad_files_are_named() {
    let limits = ImageLimits { max_bytes: 1000, max_pixels: 1000 };
    assert_eq!(decode(0, &[], &limits).unwrap_err(), ImageError::Empty { index: 0 });
    assert!(matches!(decode(1, &vec![0u8; 1001], &limits).unwrap_err(), ImageError::TooManyBytes { index: 1, bytes: 1001, limit: 1000 }));
    let e = decode(2, b"this is not an image at all", &limits).unwrap_err();
    assert!(matches!(e, ImageError::Unsupported { index: 2, .. }), "{e}");
    let tiff = b"II*\0\x08\0\0\0\0\0\0\0";
    let e = decode(4, tiff, &limits).unwrap_err();
    assert!(matches!(e, ImageError::Unsupported { index: 4, .. }) && e.to_string().contains("Tiff"), "{e}");
    let jpeg = encode(image::DynamicImage::ImageRgb8(RgbImage::from_pixel(20, 20, Rgb([1, 2, 3]))), ImageFormat::Jpeg);
    let e = decode(5, &jpeg[..jpeg.len() / 2], &ImageLimits::default()).unwrap_err();
    assert!(matches!(e, ImageError::Corrupt { index: 5, .. }), "{e}");
    assert!(e.to_string().starts_with("image 5 could not be decoded (Jpeg)"), "{e}");
    // Cut inside the scan data: the decoder alone would fill the rest with grey.
    let photo = encode(
        image::DynamicImage::ImageRgb8(RgbImage::from_fn(200, 150, |x, y| Rgb([((x * 7) ^ (y * 3)) as u8, y as u8, x as u8]))),
        ImageFormat::Jpeg,
    );
    let e = decode(6, &photo[..photo.len() * 2 / 3], &ImageLimits::default()).unwrap_err();
    assert!(e.to_string().contains("image 6") && e.to_string().contains("truncated"), "{e}");
    // Trailing zero padding after the end-of-image marker is fine.
    let mut padded = photo.clone();
    padded.extend([0u8; 16]);
    assert_eq!(decode(7, &padded, &ImageLimits::default()).unwrap().dimensions(), (200, 150));
}

#[test]
fn resize_crop_and_normalise() {
    // 12x4 (w x h), shorter side already 4: no resize; the 2x2 centre crop takes columns 5..7,
    // rows 1..3, all inside the red-200 middle band.
    let img = RgbImage::from_fn(12, 4, |x, _| Rgb([if (4..8).contains(&x) { 200 } else { 100 }, 50, 0]));
    let p = Preprocess {
        resize: Resize::ShorterSide(4),
        crop: [2, 2],
        bgr: false,
        scale: 1.0,
        mean: [10.0, 20.0, 30.0],
        std: [2.0, 1.0, 1.0],
    };
    let out = preprocess(&img, &p);
    assert_eq!(out.len(), 3 * 2 * 2);
    // Channel-major: R plane, G plane, B plane.
    assert_eq!(&out[0..4], &[(200.0 - 10.0) / 2.0; 4]);
    assert_eq!(&out[4..8], &[30.0; 4]);
    assert_eq!(&out[8..12], &[-30.0; 4]);
    // Shorter side 2 halves it (6x2); a 2x6 crop of it then pads nothing and keeps the width.
    let half = preprocess(&img, &Preprocess { resize: Resize::ShorterSide(2), crop: [2, 6], ..p.clone() });
    assert_eq!(half.len(), 3 * 2 * 6);
    assert_eq!(&half[12..24], &[30.0; 12], "green is uniform, so resizing keeps it exactly");
    let img = RgbImage::from_fn(8, 4, |x, _| Rgb([if x < 4 { 200 } else { 100 }, 50, 0]));
    // BGR puts blue first; Exact ignores the aspect ratio; a too-small image pads with zeros.
    let bgr = Preprocess { bgr: true, resize: Resize::Exact([4, 8]), crop: [6, 8], ..p.clone() };
    let out = preprocess(&img, &bgr);
    assert_eq!(out.len(), 3 * 6 * 8);
    assert_eq!(out[0], (0.0 - 10.0) / 2.0, "padding row");
    assert_eq!(out[8], (0.0 - 10.0) / 2.0, "first channel is blue (0)");
    assert_eq!(out[2 * 48 + 8], 200.0 - 30.0, "last channel is red");
    // ImageNet defaults: a 300x200 image becomes 3 x 224 x 224.
    let big = RgbImage::from_pixel(300, 200, Rgb([255, 255, 255]));
    let out = preprocess(&big, &Preprocess::imagenet());
    assert_eq!(out.len(), 3 * 224 * 224);
    assert!((out[0] - (1.0 - 0.485) / 0.229).abs() < 1e-5);
}
