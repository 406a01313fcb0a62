//! The image encoder as a batching-engine backend, and the path `EmbedImage` takes: decode and
//! preprocess on a bounded blocking pool (off the async runtime and off the device thread),
//! submit to the image lane, await within the deadline.
use std::sync::Arc;
use std::time::Instant;

use concierge_engine::{Backend, Engine};
use concierge_models::imageproc::ImageLimits;
use concierge_models::{ImageEmbedding, ImageEncoder, ModelInfo};
use tokio::sync::Semaphore;

use crate::error::ServiceError;
use crate::grpc::{answers, with_deadline};
use crate::registry::ModelSlot;

pub struct ImageInput {
    /// `3 x H x W`, preprocessed as the model's config says.
    pub pixels: Vec<f32>,
    pub normalize: bool,
}

pub struct ImageModel {
    pub encoder: ImageEncoder,
}

impl Backend for ImageModel {
    type Input = ImageInput;
    type Output = ImageEmbedding;

    fn cost(&self, _: &ImageInput) -> usize {
        1
    }

    fn run(&self, batch: &[&ImageInput]) -> Result<Vec<ImageEmbedding>, String> {
        let pixels: Vec<&[f32]> = batch.iter().map(|i| i.pixels.as_slice()).collect();
        let normalize: Vec<bool> = batch.iter().map(|i| i.normalize).collect();
        self.encoder.embed(&pixels, &normalize).map_err(|e| e.to_string())
    }
}

/// The image model's slot, its batching lane and its decoding pool.
pub struct ImageLane {
    pub slot: ModelSlot<ImageModel>,
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
    pub async fn embed(
        &self,
        images: Vec<Vec<u8>>,
        normalize: bool,
        deadline: Option<Instant>,
    ) -> Result<ImagesEmbedded, ServiceError> {
        let model = self.slot.get()?;
        let work = async {
            // Each image decodes on its own blocking thread, at most `decoders` at once; the
            // first bad image fails the request with its index (and the rest are abandoned).
            let n = images.len();
            let mut decoding = tokio::task::JoinSet::new();
            for (index, bytes) in images.into_iter().enumerate() {
                let (m, limits, decoders) = (model.clone(), self.limits, self.decoders.clone());
                decoding.spawn(async move {
                    let _permit = decoders
                        .acquire_owned()
                        .await
                        .map_err(|_| ServiceError::Unavailable("the server is shutting down".into()))?;
                    let pixels = tokio::task::spawn_blocking(move || {
                        let t0 = Instant::now();
                        let r = m.encoder.prepare(index, &bytes, &limits);
                        metrics::histogram!("concierge_image_decode_seconds").record(t0.elapsed().as_secs_f64());
                        r
                    })
                    .await
                    .map_err(|e| ServiceError::Internal(format!("image decoding task failed: {e}")))?
                    .map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
                    Ok::<_, ServiceError>((index, pixels))
                });
            }
            let mut pixels: Vec<Option<Vec<f32>>> = (0..n).map(|_| None).collect();
            while let Some(done) = decoding.join_next().await {
                let (index, p) = done.map_err(|e| ServiceError::Internal(format!("image decoding task failed: {e}")))??;
                pixels[index] = Some(p);
            }
            let pixels = pixels.into_iter().map(|p| p.expect("every image decoded"));
            let inputs = pixels.into_iter().map(|pixels| ImageInput { pixels, normalize }).collect();
            let pending = self.engine.submit(&model, inputs, deadline)?;
            answers(pending).await
        };
        let outputs = with_deadline(deadline, work).await?;
        Ok(ImagesEmbedded { outputs, model: model.encoder.info().clone() })
    }
}

/// The lane's image limits, from the server's flags.
pub fn limits_of(cfg: &crate::config::Config) -> ImageLimits {
    ImageLimits { max_bytes: cfg.max_image_bytes, max_pixels: cfg.max_image_pixels }
}

