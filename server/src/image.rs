//! The image encoder as a batching-engine backend, and the path images take (`EmbedImage`, and
//! `Classify` for a fusing intent model): decode and preprocess on a bounded blocking pool (off
//! the async runtime and off the device thread), submit to the image lane, await within the
//! deadline.
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use concierge_engine::{Backend, Engine};
use concierge_models::imageproc::ImageLimits;
use concierge_models::{CrossAttentionFusion, ImageEmbedding, ImageEncoder, ModelInfo};
use tokio::sync::Semaphore;

use crate::error::ServiceError;
use crate::grpc::{answers, with_deadline};
use crate::registry::Version;

pub struct ImageInput {
    /// `3 x H x W`, preprocessed as the model's config says.
    pub pixels: Vec<f32>,
    pub normalize: bool,
    /// Wants the last feature map, as fusion positions, instead of the embedding.
    pub features: bool,
}

/// One image's answer, as its input asked.
pub struct ImageOutput {
    pub embedding: Option<ImageEmbedding>,
    /// The last feature map `[C, h, w]` as fusion positions `[h*w, C]` (f32, on the device).
    pub positions: Option<Tensor>,
}

/// An image encoder version: what the image lane runs (batches never mix versions).
pub type ImageModel = Version<ImageEncoder>;

impl Backend for Version<ImageEncoder> {
    type Input = ImageInput;
    type Output = ImageOutput;

    fn cost(&self, _: &ImageInput) -> usize {
        1
    }

    fn run(&self, batch: &[&ImageInput]) -> Result<Vec<ImageOutput>, String> {
        let mut out: Vec<ImageOutput> = batch.iter().map(|_| ImageOutput { embedding: None, positions: None }).collect();
        // A batch mixing both kinds runs each kind as its own sub-batch: per image, the same work.
        let (want_features, want_embedding): (Vec<usize>, Vec<usize>) = (0..batch.len()).partition(|&i| batch[i].features);
        if !want_embedding.is_empty() {
            let pixels: Vec<&[f32]> = want_embedding.iter().map(|&i| batch[i].pixels.as_slice()).collect();
            let normalize: Vec<bool> = want_embedding.iter().map(|&i| batch[i].normalize).collect();
            let embedded = self.loaded.embed(&pixels, &normalize).map_err(|e| e.to_string())?;
            for (&i, e) in want_embedding.iter().zip(embedded) {
                out[i].embedding = Some(e);
            }
        }
        if !want_features.is_empty() {
            let pixels: Vec<&[f32]> = want_features.iter().map(|&i| batch[i].pixels.as_slice()).collect();
            let positions = self
                .loaded
                .features(&pixels)
                .and_then(|f| CrossAttentionFusion::positions(&f))
                .map_err(|e| e.to_string())?;
            for (k, &i) in want_features.iter().enumerate() {
                out[i].positions = Some(positions.get(k).map_err(|e| e.to_string())?);
            }
        }
        Ok(out)
    }
}

/// One encoded image, with where it sits in its request for its error messages.
pub struct EncodedImage {
    pub bytes: Vec<u8>,
    /// Its index as errors name it: "image 3".
    pub index: usize,
    /// The query it is attached to, in requests that group images by query: "query 2 image 0".
    pub query: Option<usize>,
}

/// The image models' batching lane and decoding pool.
pub struct ImageLane {
    pub engine: Engine<ImageModel>,
    /// Images being decoded at once; each holds up to `limits.max_pixels * 3` bytes.
    pub decoders: Arc<Semaphore>,
    pub limits: ImageLimits,
}

/// One request's results, in input order.
pub struct ImagesEmbedded {
    pub outputs: Vec<ImageEmbedding>,
    pub model: ModelInfo,
}

impl ImageLane {
    /// Embeds `images` on `model`, the version the request was routed to.
    pub async fn embed(
        &self,
        model: Arc<ImageModel>,
        images: Vec<Vec<u8>>,
        normalize: bool,
        deadline: Option<Instant>,
    ) -> Result<ImagesEmbedded, ServiceError> {
        let images = images.into_iter().enumerate().map(|(index, bytes)| EncodedImage { bytes, index, query: None }).collect();
        let work = async {
            let pixels = self.prepare(&model, images).await?;
            let inputs = pixels.into_iter().map(|pixels| ImageInput { pixels, normalize, features: false }).collect();
            let pending = self.engine.submit(&model, inputs, deadline)?;
            answers(pending).await
        };
        let outputs = with_deadline(deadline, work)
            .await?
            .into_iter()
            .map(|o| o.embedding.ok_or_else(|| ServiceError::Internal("the image model returned no vector".into())))
            .collect::<Result<_, _>>()?;
        Ok(ImagesEmbedded { outputs, model: model.info() })
    }

    /// Each image's last feature map as fusion positions `[h*w, C]`, in order, from `model`
    /// (the version the intent head's fusion block was trained on).
    pub async fn positions(
        &self,
        model: Arc<ImageModel>,
        images: Vec<EncodedImage>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Tensor>, ServiceError> {
        let work = async {
            let pixels = self.prepare(&model, images).await?;
            let inputs = pixels.into_iter().map(|pixels| ImageInput { pixels, normalize: false, features: true }).collect();
            let pending = self.engine.submit(&model, inputs, deadline)?;
            answers(pending).await
        };
        let positions = with_deadline(deadline, work)
            .await?
            .into_iter()
            .map(|o| o.positions.ok_or_else(|| ServiceError::Internal("the image model returned no feature map".into())))
            .collect::<Result<_, _>>()?;
        Ok(positions)
    }

    /// Decodes and preprocesses `images` into the model's input, in order. Each image decodes on
    /// its own blocking thread, at most `decoders` at once; the first bad image fails the request
    /// naming it (and the rest are abandoned).
    async fn prepare(&self, model: &Arc<ImageModel>, images: Vec<EncodedImage>) -> Result<Vec<Vec<f32>>, ServiceError> {
        let n = images.len();
        let mut decoding = tokio::task::JoinSet::new();
        for (slot, image) in images.into_iter().enumerate() {
            let (m, limits, decoders) = (model.clone(), self.limits, self.decoders.clone());
            decoding.spawn(async move {
                let _permit = decoders
                    .acquire_owned()
                    .await
                    .map_err(|_| ServiceError::Unavailable("the server is shutting down".into()))?;
                let EncodedImage { bytes, index, query } = image;
                let pixels = tokio::task::spawn_blocking(move || {
                    let t0 = Instant::now();
                    let r = m.loaded.prepare(index, &bytes, &limits);
                    metrics::histogram!("concierge_image_decode_seconds").record(t0.elapsed().as_secs_f64());
                    r
                })
                .await
                .map_err(|e| ServiceError::Internal(format!("image decoding task failed: {e}")))?
                .map_err(|e| {
                    ServiceError::InvalidArgument(match query {
                        Some(q) => format!("query {q} {e}"),
                        None => e.to_string(),
                    })
                })?;
                Ok::<_, ServiceError>((slot, pixels))
            });
        }
        let mut pixels: Vec<Option<Vec<f32>>> = (0..n).map(|_| None).collect();
        while let Some(done) = decoding.join_next().await {
            let (slot, p) = done.map_err(|e| ServiceError::Internal(format!("image decoding task failed: {e}")))??;
            pixels[slot] = Some(p);
        }
        Ok(pixels.into_iter().map(|p| p.expect("every image decoded")).collect())
    }
}

/// The lane's image limits, from the server's flags.
pub fn limits_of(cfg: &crate::config::Config) -> ImageLimits {
    ImageLimits { max_bytes: cfg.max_image_bytes, max_pixels: cfg.max_image_pixels }
}

