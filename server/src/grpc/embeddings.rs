//! `concierge.v1.Embeddings`.
use std::sync::Arc;
use std::time::Instant;

use concierge_proto::v1::embeddings_server::Embeddings;
use concierge_proto::v1::{EmbedTextRequest, EmbedTextResponse, Embedding, ModelInfo};
use tonic::{Request, Response, Status};

use super::{deadline_of, observe, with_deadline};
use crate::error::ServiceError;
use crate::state::AppState;
use crate::text::TextInput;

pub struct EmbeddingsService {
    state: Arc<AppState>,
}

impl EmbeddingsService {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    fn validate(&self, msg: &EmbedTextRequest) -> Result<(), ServiceError> {
        let limit = self.state.config.max_client_batch_size;
        if msg.inputs.is_empty() {
            return Err(ServiceError::InvalidArgument("inputs is empty; send at least one text to embed".into()));
        }
        if msg.inputs.len() > limit {
            return Err(ServiceError::InvalidArgument(format!(
                "{} inputs in one request; the limit is {limit}; split them over several calls",
                msg.inputs.len()
            )));
        }
        if let Some(i) = msg.inputs.iter().position(|t| t.trim().is_empty()) {
            return Err(ServiceError::InvalidArgument(format!(
                "input {i} is empty or only whitespace; every input needs some text"
            )));
        }
        Ok(())
    }

    async fn embed(&self, req: Request<EmbedTextRequest>) -> Result<EmbedTextResponse, ServiceError> {
        let deadline = deadline_of(&req)?;
        let msg = req.into_inner();
        self.validate(&msg)?;
        let model = self.state.text.get()?;
        let normalize = msg.normalize.unwrap_or(true);
        let truncate = msg.truncate.unwrap_or(false);

        // Tokenising is CPU work: keep it off the async runtime and off the device thread.
        let t0 = Instant::now();
        let m = model.clone();
        let inputs = tokio::task::spawn_blocking(move || {
            msg.inputs
                .iter()
                .enumerate()
                .map(|(i, text)| Ok(TextInput { tokens: m.encoder.tokenize(i, text, truncate)?, normalize }))
                .collect::<Result<Vec<_>, ServiceError>>()
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("tokenisation task failed: {e}")))??;
        metrics::histogram!("concierge_tokenization_seconds").record(t0.elapsed().as_secs_f64());
        let token_count: usize = inputs.iter().map(|i| i.tokens.len()).sum();

        let pending = self.state.text_engine.submit(&model, inputs, deadline)?;
        let vectors = with_deadline(deadline, async move {
            let mut out = Vec::with_capacity(pending.len());
            for p in pending {
                let v = p.await.map_err(|_| ServiceError::Internal("the engine dropped an input unanswered".into()))??;
                out.push(Embedding { values: v });
            }
            Ok(out)
        })
        .await?;
        let info = model.encoder.info();
        Ok(EmbedTextResponse {
            embeddings: vectors,
            model: Some(ModelInfo { id: info.id.clone(), version: info.version.clone() }),
            token_count: token_count as u32,
            dimension: info.dimension as u32,
        })
    }
}

#[tonic::async_trait]
impl Embeddings for EmbeddingsService {
    async fn embed_text(&self, req: Request<EmbedTextRequest>) -> Result<Response<EmbedTextResponse>, Status> {
        let start = Instant::now();
        let result = self.embed(req).await.map(Response::new).map_err(Status::from);
        observe("EmbedText", start, &result);
        result
    }
}
