//! The text encoder as a batching-engine backend, and the one path every service takes to embed
//! texts: tokenise off the async runtime, submit to the lane, await within the deadline.
use std::time::Instant;

use concierge_engine::{Backend, Engine};
use concierge_models::{ModelInfo, TextEncoder, TokenizedText};

use crate::error::ServiceError;
use crate::grpc::with_deadline;
use crate::registry::ModelSlot;

pub struct TextInput {
    pub tokens: TokenizedText,
    pub normalize: bool,
}

pub struct TextModel {
    pub encoder: TextEncoder,
}

impl Backend for TextModel {
    type Input = TextInput;
    type Output = Vec<f32>;

    fn cost(&self, input: &TextInput) -> usize {
        input.tokens.len()
    }

    fn run(&self, batch: &[&TextInput]) -> Result<Vec<Vec<f32>>, String> {
        let tokens: Vec<&TokenizedText> = batch.iter().map(|i| &i.tokens).collect();
        let normalize: Vec<bool> = batch.iter().map(|i| i.normalize).collect();
        self.encoder.embed(&tokens, &normalize).map_err(|e| e.to_string())
    }
}

/// A text model's slot and its batching lane.
pub struct TextLane {
    pub slot: ModelSlot<TextModel>,
    pub engine: Engine<TextModel>,
}

/// Vectors from one lane, in input order.
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub tokens: usize,
    pub model: ModelInfo,
}

impl TextLane {
    /// Embeds `texts`; each comes with the index its errors name ("input 3 has 302 tokens").
    pub async fn embed(
        &self,
        texts: Vec<(usize, String)>,
        normalize: bool,
        truncate: bool,
        deadline: Option<Instant>,
    ) -> Result<Embedded, ServiceError> {
        let model = self.slot.get()?;
        // Tokenising is CPU work: keep it off the async runtime and off the device thread.
        let t0 = Instant::now();
        let m = model.clone();
        let inputs = tokio::task::spawn_blocking(move || {
            texts
                .iter()
                .map(|(i, text)| Ok(TextInput { tokens: m.encoder.tokenize(*i, text, truncate)?, normalize }))
                .collect::<Result<Vec<_>, ServiceError>>()
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("tokenisation task failed: {e}")))??;
        metrics::histogram!("concierge_tokenization_seconds").record(t0.elapsed().as_secs_f64());
        let tokens = inputs.iter().map(|i| i.tokens.len()).sum();

        let pending = self.engine.submit(&model, inputs, deadline)?;
        let vectors = with_deadline(deadline, async move {
            let mut out = Vec::with_capacity(pending.len());
            for p in pending {
                out.push(p.await.map_err(|_| ServiceError::Internal("the engine dropped an input unanswered".into()))??);
            }
            Ok(out)
        })
        .await?;
        Ok(Embedded { vectors, tokens, model: model.encoder.info().clone() })
    }
}
