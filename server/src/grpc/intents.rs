//! `concierge.v1.Intents`.
use std::sync::Arc;
use std::time::Instant;

use concierge_proto::v1::intents_server::Intents;
use concierge_proto::v1::{ClassifyRequest, ClassifyResponse, IntentScore, ModelInfo, QueryIntents};
use tonic::{Request, Response, Status};

use super::{deadline_of, observe, observe_version, routing_bucket, Routed};
use crate::error::ServiceError;
use crate::intents::Query;
use crate::state::AppState;
use crate::registry::SlotName;
use crate::text::{IntentHead, Tasks};

/// Intents per query when the request's `top_k` is 0.
pub const DEFAULT_TOP_K: usize = 5;

pub struct IntentsService {
    state: Arc<AppState>,
}

impl IntentsService {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    /// Checks the request against the limits and the head; returns `top_k` and the threshold.
    fn validate(&self, msg: &ClassifyRequest, head: &IntentHead) -> Result<(usize, f32), ServiceError> {
        let cfg = &self.state.config;
        let bad = |m: String| Err(ServiceError::InvalidArgument(m));
        if msg.queries.is_empty() {
            return bad("queries is empty; send at least one query".into());
        }
        if msg.queries.len() > cfg.max_client_batch_size {
            return bad(format!(
                "{} queries in one request; the limit is {}; split them over several calls",
                msg.queries.len(),
                cfg.max_client_batch_size
            ));
        }
        let images: usize = msg.queries.iter().map(|q| q.images.len()).sum();
        if images > cfg.max_client_images {
            return bad(format!(
                "{images} images in one request (over all queries); the limit is {}; split them over several calls",
                cfg.max_client_images
            ));
        }
        for (i, q) in msg.queries.iter().enumerate() {
            if q.images.is_empty() && q.text.trim().is_empty() {
                return bad(format!("query {i} has neither text nor images; send the customer's message"));
            }
            if let (Some(why), false) = (&head.no_images, q.images.is_empty()) {
                return bad(format!("query {i} has {} image(s), but {why}; send text only", q.images.len()));
            }
        }
        let labels = head.model.labels().len();
        let top_k = match msg.top_k as usize {
            0 => DEFAULT_TOP_K.min(labels),
            k if k > labels => {
                return bad(format!(
                    "top_k {k} is more than the model's {labels} labels; ask for at most {labels} (0: the default, {DEFAULT_TOP_K})"
                ))
            }
            k => k,
        };
        let threshold = match msg.handoff_threshold {
            None => head.model.config().handoff_threshold,
            Some(t) if (0.0..=1.0).contains(&t) => t,
            Some(t) => {
                return bad(format!(
                    "handoff_threshold {t} is not a probability; send a value in [0, 1], or none for the model's calibrated {}",
                    head.model.config().handoff_threshold
                ))
            }
        };
        Ok((top_k, threshold))
    }

    async fn classify(&self, req: Request<ClassifyRequest>, routed: &mut Routed) -> Result<ClassifyResponse, ServiceError> {
        let deadline = deadline_of(&req)?;
        let bucket = routing_bucket(&req);
        // The request is checked against, and runs on, this one composition of versions.
        let snapshot = self.state.registry.snapshot();
        let model = snapshot.text_model(bucket, Tasks::INTENT)?;
        let Some(head) = &model.intent else {
            return Err(ServiceError::Internal("the routed text model has no intent head".into()));
        };
        *routed = Some((SlotName::Intent, head.label.clone()));
        let msg = req.into_inner();
        let (top_k, threshold) = self.validate(&msg, head)?;
        // Images are fused with the features of the image model version the head was trained on.
        let image_model = match (&head.fuses_with, msg.queries.iter().any(|q| !q.images.is_empty())) {
            (Some(weights), true) => Some(
                snapshot.slots.image.held().find(|v| v.weights == *weights).cloned().ok_or_else(|| {
                    ServiceError::InvalidArgument(format!(
                        "the intent model's fusion block reads features of image model weights {weights}, which is no longer \
                         loaded; send text only"
                    ))
                })?,
            ),
            _ => None,
        };
        drop(snapshot);
        let queries = msg.queries.into_iter().map(|q| Query { text: q.text, images: q.images }).collect();
        let probs = crate::intents::classify(&self.state, model.clone(), image_model, queries, msg.truncate.unwrap_or(false), deadline)
            .await?;
        let results = probs
            .iter()
            .map(|p| {
                let r = head.model.rank(p, top_k, Some(threshold));
                // What operators watch for drift: the share handed off and the top confidence.
                metrics::counter!("concierge_intent_answers_total", "handoff" => if r.handoff { "true" } else { "false" }).increment(1);
                if let Some(best) = r.intents.first() {
                    metrics::histogram!("concierge_intent_top_score").record(best.score as f64);
                }
                QueryIntents {
                    intents: r.intents.into_iter().map(|s| IntentScore { label: s.label, score: s.score }).collect(),
                    handoff: r.handoff,
                }
            })
            .collect();
        Ok(ClassifyResponse {
            results,
            model: Some(ModelInfo { id: head.id.clone(), version: head.label.clone() }),
            handoff_threshold: threshold,
        })
    }
}

#[tonic::async_trait]
impl Intents for IntentsService {
    async fn classify(&self, req: Request<ClassifyRequest>) -> Result<Response<ClassifyResponse>, Status> {
        let (start, mut routed) = (Instant::now(), None);
        let result = IntentsService::classify(self, req, &mut routed).await.map(Response::new).map_err(Status::from);
        observe("Classify", start, &result);
        observe_version(routed, start, &result);
        result
    }
}
