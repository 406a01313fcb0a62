//! `concierge.v1.Entities`.
use std::sync::Arc;
use std::time::Instant;

use concierge_proto::v1::entities_server::Entities;
use concierge_proto::v1::{Entity, ExtractRequest, ExtractResponse, ModelInfo, TextEntities};
use tonic::{Request, Response, Status};

use super::{check_texts, deadline_of, observe};
use crate::error::ServiceError;
use crate::state::AppState;

pub struct EntitiesService {
    state: Arc<AppState>,
}

impl EntitiesService {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    async fn extract(&self, req: Request<ExtractRequest>) -> Result<ExtractResponse, ServiceError> {
        let deadline = deadline_of(&req)?;
        let msg = req.into_inner();
        check_texts(&msg.texts, self.state.config.max_client_batch_size, "texts", "text")?;
        let texts = msg.texts.clone();
        let (found, info) = crate::entities::extract(&self.state, msg.texts, msg.truncate.unwrap_or(false), deadline).await?;
        let results = texts
            .iter()
            .zip(found)
            .map(|(text, ents)| TextEntities { entities: ents.into_iter().map(|e| to_proto(text, e)).collect() })
            .collect();
        Ok(ExtractResponse { results, model: Some(ModelInfo { id: info.id, version: info.version }) })
    }
}

/// Byte offsets to code point offsets (and the covered text).
fn to_proto(text: &str, e: concierge_models::entities::Entity) -> Entity {
    let chars_before = |b: usize| text[..b].chars().count() as u32;
    Entity {
        text: text[e.start..e.end].to_string(),
        start: chars_before(e.start),
        end: chars_before(e.end),
        byte_start: e.start as u32,
        byte_end: e.end as u32,
        label: e.label,
        confidence: e.confidence,
    }
}

#[tonic::async_trait]
impl Entities for EntitiesService {
    async fn extract(&self, req: Request<ExtractRequest>) -> Result<Response<ExtractResponse>, Status> {
        let start = Instant::now();
        let result = EntitiesService::extract(self, req).await.map(Response::new).map_err(Status::from);
        observe("Extract", start, &result);
        result
    }
}
