//! `Embeddings/EmbedImage` end to end on a real server: answers equal the encoder's own, every
//! bad input gets INVALID_ARGUMENT naming the image, text and image callers mixed under load
//! each get their own answers, and the real default model (Open-NSFW) runs on real photos when
//! the set-up step has fetched it.
mod common;

use std::time::Duration;

use candle_core::{DType, Device};
use concierge_models::imageproc::ImageLimits;
use concierge_models::{ImageEncoder, ModelSource};
use concierge_proto::v1::embeddings_client::EmbeddingsClient;
use concierge_proto::v1::{EmbedImageRequest, EmbedImageResponse};
use image::ImageFormat;
use tonic::Code;

fn request(images: Vec<Vec<u8>>) -> EmbedImageRequest {
    EmbedImageRequest { images, normalize: None }
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// What the encoder itself says for one encoded image (normalised).
fn direct(enc: &ImageEncoder, bytes: &[u8]) -> (Vec<f32>, f32) {
    let p = enc.prepare(0, bytes, &ImageLimits::default()).unwrap();
    let out = enc.embed(&[&p], &[true]).unwrap().remove(0);
    (out.vector, out.unsafe_score.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeds_images_in_every_format_like_the_encoder_and_scores_them() {
    let running = common::serve(&["--image-moderation-threshold=0.5"]).await;
    let mut client = common::client(&running).await;
    let enc = ImageEncoder::load(&ModelSource::Dir(common::tiny_image_model()), &Device::Cpu, DType::F32).unwrap();
    let images: Vec<Vec<u8>> = [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP, ImageFormat::Gif, ImageFormat::Bmp]
        .into_iter()
        .enumerate()
        .map(|(i, f)| common::encoded_image(90 + 10 * i as u32, 70, i as u32, f))
        .collect();
    let resp: EmbedImageResponse = client.embed_image(request(images.clone())).await.unwrap().into_inner();
    assert_eq!(resp.embeddings.len(), 5);
    assert_eq!(resp.moderation.len(), 5);
    assert_eq!(resp.dimension as usize, enc.info().dimension);
    assert_eq!(resp.moderation_threshold, 0.5);
    let model = resp.model.unwrap();
    assert_eq!(model.version, enc.info().version);
    for (i, bytes) in images.iter().enumerate() {
        let (vector, score) = direct(&enc, bytes);
        let err = max_abs(&resp.embeddings[i].values, &vector);
        assert!(err < 1e-5, "image {i}: off the encoder's own answer by {err}");
        let m = &resp.moderation[i];
        assert!((m.unsafe_score - score).abs() < 1e-5, "image {i}: {} vs {score}", m.unsafe_score);
        assert_eq!(m.flagged, m.unsafe_score >= 0.5);
    }
    // normalize=false gives the raw pooled features.
    let raw = client
        .embed_image(EmbedImageRequest { images: vec![images[0].clone()], normalize: Some(false) })
        .await
        .unwrap()
        .into_inner();
    let norm = raw.embeddings[0].values.iter().map(|v| v * v).sum::<f32>().sqrt();
    let unit: Vec<f32> = raw.embeddings[0].values.iter().map(|v| v / norm).collect();
    assert!(max_abs(&unit, &resp.embeddings[0].values) < 1e-5);

    let (_, metrics) = common::http_get(running.metrics_addr, "/metrics").await;
    assert!(common::sample(&metrics, "concierge_image_decode_seconds_count") >= 6.0, "{metrics}");
    assert!(common::sample(&metrics, "concierge_batch_size_count{lane=\"image\"}") >= 1.0, "{metrics}");
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_are_refused_with_invalid_argument_naming_the_image() {
    let running =
        common::serve(&["--max-client-images=3", "--max-image-bytes=20000", "--max-image-pixels=40000"]).await;
    let mut client = common::client(&running).await;
    let ok = common::encoded_image(64, 64, 1, ImageFormat::Png);
    // A flat colour: a few hundred bytes of PNG, but 60000 pixels.
    let mut big_pixels = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(300, 200, image::Rgb([9, 99, 199])).write_to(&mut big_pixels, ImageFormat::Png).unwrap();
    let big_pixels = big_pixels.into_inner();
    let noise: Vec<u8> = (0..30_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut truncated = common::encoded_image(64, 64, 3, ImageFormat::Jpeg);
    truncated.truncate(truncated.len() / 3);
    let cases: Vec<(&str, Vec<Vec<u8>>, &[&str])> = vec![
        ("no images", vec![], &["images is empty"]),
        ("too many", vec![ok.clone(); 4], &["4 images", "limit is 3"]),
        ("empty file", vec![ok.clone(), vec![]], &["image 1 is empty"]),
        ("too many bytes", vec![ok.clone(), noise.clone()], &["image 1 is 30000 bytes", "limit is 20000"]),
        ("too many pixels", vec![big_pixels], &["image 0 is 300x200", "limit is 40000 pixels"]),
        ("not an image", vec![ok.clone(), ok.clone(), b"GIF89a but not really".to_vec()], &["image 2"]),
        ("unknown format", vec![b"hello, this is text".to_vec()], &["image 0 is not in a supported format"]),
        ("truncated", vec![truncated], &["image 0 could not be decoded"]),
    ];
    for (what, images, expect) in cases {
        let err = client.embed_image(request(images)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        for e in expect {
            assert!(err.message().contains(e), "{what}: {:?} lacks {e:?}", err.message());
        }
    }
    // The server is unharmed: a good request still works.
    assert_eq!(client.embed_image(request(vec![ok])).await.unwrap().into_inner().embeddings.len(), 1);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_only_servers_answer_unimplemented_and_a_message_over_the_limit_is_refused() {
    let running = common::serve(&["--no-image-model"]).await;
    let mut client = common::client(&running).await;
    let err = client.embed_image(request(vec![common::encoded_image(8, 8, 0, ImageFormat::Png)])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert!(err.message().contains("--no-image-model"), "{}", err.message());
    assert_eq!(client.embed_text(common::request(&["still serving text"])).await.unwrap().into_inner().embeddings.len(), 1);
    running.shutdown().await.unwrap();

    let running = common::serve(&["--max-message-bytes=10000"]).await;
    let mut client = common::client(&running).await;
    let err = client.embed_image(request(vec![vec![7u8; 20_000]])).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_concurrent_text_and_image_callers_each_get_their_own_answers() {
    let running = common::serve(&["--max-image-batch-size=4", "--max-batch-size=8"]).await;
    let client = common::client(&running).await;
    // Each caller's answer alone, first.
    let texts: Vec<String> = (0..24).map(|i| format!("where is my order number {i}? it was size {}", 30 + i)).collect();
    let images: Vec<Vec<u8>> = (0..24).map(|i| common::encoded_image(40 + i, 50, i, ImageFormat::Png)).collect();
    let mut alone_text = Vec::new();
    let mut alone_image = Vec::new();
    {
        let mut c = client.clone();
        for t in &texts {
            alone_text.push(c.embed_text(common::request(&[t])).await.unwrap().into_inner().embeddings.remove(0).values);
        }
        for i in &images {
            alone_image.push(c.embed_image(request(vec![i.clone()])).await.unwrap().into_inner());
        }
    }
    // Then all at once, interleaved.
    let mut tasks = Vec::new();
    for k in 0..24 {
        let (mut c, t) = (client.clone(), texts[k].clone());
        tasks.push(tokio::spawn(async move {
            let v = c.embed_text(common::request(&[&t])).await.unwrap().into_inner().embeddings.remove(0).values;
            (k, true, v, None)
        }));
        let (mut c, i) = (client.clone(), images[k].clone());
        tasks.push(tokio::spawn(async move {
            let r = c.embed_image(request(vec![i])).await.unwrap().into_inner();
            (k, false, r.embeddings[0].values.clone(), Some(r.moderation[0].unsafe_score))
        }));
    }
    for t in tasks {
        let (k, is_text, got, score) = t.await.unwrap();
        if is_text {
            let err = max_abs(&got, &alone_text[k]);
            assert!(err < 1e-4, "text caller {k} got someone else's answer (off by {err})");
        } else {
            let err = max_abs(&got, &alone_image[k].embeddings[0].values);
            assert!(err < 1e-4, "image caller {k} got someone else's answer (off by {err})");
            assert!((score.unwrap() - alone_image[k].moderation[0].unsafe_score).abs() < 1e-4);
        }
    }
    // The image lane batched (at most 4), and the text lane was served too.
    let (_, metrics) = common::http_get(running.metrics_addr, "/metrics").await;
    assert!(common::sample(&metrics, "concierge_batch_size_count{lane=\"image\"}") >= 1.0);
    assert!(common::sample(&metrics, "concierge_batch_size_count{lane=\"text\"}") >= 1.0);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_request_past_its_deadline_gets_deadline_exceeded() {
    let running = common::serve(&[]).await;
    // The server's own answer, not a client-side timer's (see common::unenforced).
    let mut client = EmbeddingsClient::with_origin(common::unenforced(), common::origin(&running));
    let mut req = tonic::Request::new(request(vec![common::encoded_image(64, 64, 0, ImageFormat::Png); 8]));
    req.set_timeout(Duration::from_millis(1));
    let err = client.embed_image(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    running.shutdown().await.unwrap();
}

/// The real default model on real photos: only when the set-up step has fetched it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_open_nsfw_model_embeds_and_scores_real_photos() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = root.join("model-store/open-nsfw");
    let photos = root.join("model-store/open-nsfw-reference/images");
    if !model.join("model.safetensors").is_file() || !photos.is_dir() {
        eprintln!("SKIPPED: {} or {} is missing; run scripts/fetch-default-model.sh", model.display(), photos.display());
        return;
    }
    let dir_flag = format!("--image-model-dir={}", model.display());
    let running = common::serve(&[&dir_flag]).await;
    let mut client = common::client(&running).await;
    let mut files: Vec<_> = std::fs::read_dir(&photos).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(!files.is_empty());
    let images: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let resp = client.embed_image(request(images)).await.unwrap().into_inner();
    assert_eq!(resp.dimension, 1024, "Open-NSFW's pooled features are 1024-d");
    assert_eq!(resp.model.unwrap().id, "open-nsfw");
    for (f, m) in files.iter().zip(&resp.moderation) {
        println!("{}: unsafe_score {:.4}", f.display(), m.unsafe_score);
        // Sample photos of coffee, a cat, an astronaut, a temple, a flower: all safe for work.
        assert!(m.unsafe_score < 0.5 && !m.flagged, "{}: {}", f.display(), m.unsafe_score);
    }
    running.shutdown().await.unwrap();
}
