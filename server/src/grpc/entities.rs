//! `concierge.v1.Entities`.
use std::sync::Arc;
use std::time::Instant;

use concierge_proto::v1::entities_server::Entities;
use concierge_proto::v1::{Entity, ExtractRequest, ExtractResponse, ModelInfo, TextEntities};
use tonic::{Request, Response, Status};

use super::{check_texts, deadline_of, observe, observe_version, routing_bucket, Routed};
use crate::error::ServiceError;
use crate::registry::SlotName;
use crate::state::AppState;

pub struct EntitiesService {
    state: Arc<AppState>,
}

impl EntitiesService {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    async fn extract(&self, req: Request<ExtractRequest>, routed: &mut Routed) -> Result<ExtractResponse, ServiceError> {
        let deadline = deadline_of(&req)?;
        let bucket = routing_bucket(&req);
        let msg = req.into_inner();
        check_texts(&msg.texts, self.state.config.max_client_batch_size, "texts", "text")?;
        let texts = msg.texts.clone();
        let result = crate::entities::extract(&self.state, bucket, msg.texts, msg.truncate.unwrap_or(false), deadline).await;
        if let Err(ServiceError::Internal(_) | ServiceError::DeadlineExceeded(_)) = &result {
            // Failed on the model: count it against the version this bucket routes to.
            if let Some(t) = self.state.registry.snapshot().slots.tagger.pick(bucket) {
                *routed = Some((SlotName::Tagger, t.label.clone()));
            }
        }
        let (found, info) = result?;
        *routed = Some((SlotName::Tagger, info.version.clone()));
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
        let (start, mut routed) = (Instant::now(), None);
        let result = EntitiesService::extract(self, req, &mut routed).await.map(Response::new).map_err(Status::from);
        observe("Extract", start, &result);
        observe_version(routed, start, &result);
        result
    }
}
