//! `concierge.v1.Embeddings`.
use std::sync::Arc;
use std::time::Instant;

use concierge_proto::v1::embeddings_server::Embeddings;
use concierge_proto::v1::{
    EmbedImageRequest, EmbedImageResponse, EmbedTextRequest, EmbedTextResponse, Embedding, ImageModeration, ModelInfo,
};
use tonic::{Request, Response, Status};

use super::{check_texts, deadline_of, observe, observe_version, routing_bucket, Routed};
use crate::error::ServiceError;
use crate::registry::SlotName;
use crate::state::AppState;
use crate::text::Tasks;

pub struct EmbeddingsService {
    state: Arc<AppState>,
}

impl EmbeddingsService {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    fn validate(&self, msg: &EmbedTextRequest) -> Result<(), ServiceError> {
        check_texts(&msg.inputs, self.state.config.max_client_batch_size, "inputs", "input")
    }

    async fn embed(&self, req: Request<EmbedTextRequest>, routed: &mut Routed) -> Result<EmbedTextResponse, ServiceError> {
        let deadline = deadline_of(&req)?;
        let bucket = routing_bucket(&req);
        let msg = req.into_inner();
        self.validate(&msg)?;
        let normalize = msg.normalize.unwrap_or(true);
        let truncate = msg.truncate.unwrap_or(false);
        let texts = msg.inputs.into_iter().enumerate().collect();
        let model = self.state.registry.snapshot().text_model(bucket, Tasks::EMBED)?;
        *routed = Some((SlotName::TextEncoder, model.encoder.label.clone()));
        let (vectors, tokens, info) = self.state.text.embed(model, texts, normalize, truncate, deadline).await?;
        Ok(EmbedTextResponse {
            embeddings: vectors.into_iter().map(|values| Embedding { values }).collect(),
            model: Some(ModelInfo { id: info.id.clone(), version: info.version.clone() }),
            token_count: tokens as u32,
            dimension: info.dimension as u32,
        })
    }

    async fn embed_images(&self, req: Request<EmbedImageRequest>, routed: &mut Routed) -> Result<EmbedImageResponse, ServiceError> {
        let deadline = deadline_of(&req)?;
        let bucket = routing_bucket(&req);
        let Some(lane) = &self.state.image else {
            return Err(ServiceError::Unimplemented(
                "this server was started with --no-image-model; it embeds text only".into(),
            ));
        };
        let msg = req.into_inner();
        let cfg = &self.state.config;
        if msg.images.is_empty() {
            return Err(ServiceError::InvalidArgument("images is empty; send at least one encoded image".into()));
        }
        if msg.images.len() > cfg.max_client_images {
            return Err(ServiceError::InvalidArgument(format!(
                "{} images in one request; the limit is {}; split them over several calls",
                msg.images.len(),
                cfg.max_client_images
            )));
        }
        let normalize = msg.normalize.unwrap_or(true);
        let model = self.state.registry.snapshot().slots.image.pick(bucket).cloned().ok_or_else(|| {
            ServiceError::Unavailable("the image model is still loading; retry shortly".into())
        })?;
        *routed = Some((SlotName::ImageEncoder, model.label.clone()));
        let out = lane.embed(model, msg.images, normalize, deadline).await?;
        let threshold = cfg.image_moderation_threshold;
        let moderation = out
            .outputs
            .iter()
            .filter_map(|o| o.unsafe_score)
            .map(|unsafe_score| ImageModeration { unsafe_score, flagged: unsafe_score >= threshold })
            .collect();
        Ok(EmbedImageResponse {
            embeddings: out.outputs.into_iter().map(|o| Embedding { values: o.vector }).collect(),
            model: Some(ModelInfo { id: out.model.id.clone(), version: out.model.version.clone() }),
            dimension: out.model.dimension as u32,
            moderation,
            moderation_threshold: threshold,
        })
    }
}

#[tonic::async_trait]
impl Embeddings for EmbeddingsService {
    async fn embed_text(&self, req: Request<EmbedTextRequest>) -> Result<Response<EmbedTextResponse>, Status> {
        let (start, mut routed) = (Instant::now(), None);
        let result = self.embed(req, &mut routed).await.map(Response::new).map_err(Status::from);
        observe("EmbedText", start, &result);
        observe_version(routed, start, &result);
        result
    }

    async fn embed_image(&self, req: Request<EmbedImageRequest>) -> Result<Response<EmbedImageResponse>, Status> {
        let (start, mut routed) = (Instant::now(), None);
        let result = self.embed_images(req, &mut routed).await.map(Response::new).map_err(Status::from);
        observe("EmbedImage", start, &result);
        observe_version(routed, start, &result);
        result
    }
}
