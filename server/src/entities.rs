//! Entity extraction's two routes: a tagger over the text encoder's states rides the text lane
//! (one encoder pass shared with embeddings); a tagger over characters (Chinese) has its own
//! lane, `entities`, on the same device thread.
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use concierge_engine::{Backend, Engine};
use concierge_models::entities::{extract_from_chars, Entity};
use concierge_models::ModelInfo;

use crate::error::ServiceError;
use crate::grpc::{answers, with_deadline};
use crate::registry::{SlotName, Tagger, Version};
use crate::state::AppState;
use crate::text::Tasks;

/// A character-level tagger version as the `entities` lane runs it.
pub struct CharTagger {
    pub tagger: Arc<Version<Tagger>>,
    pub device: Device,
}

impl Backend for CharTagger {
    type Input = String;
    type Output = Vec<Entity>;

    fn cost(&self, input: &String) -> usize {
        input.chars().count()
    }

    fn run(&self, batch: &[&String]) -> Result<Vec<Vec<Entity>>, String> {
        let texts: Vec<&str> = batch.iter().map(|s| s.as_str()).collect();
        extract_from_chars(&self.tagger.model, &texts, &self.device).map_err(|e| e.to_string())
    }
}

/// The lane of character-level taggers.
pub struct CharTaggerLane {
    pub engine: Engine<CharTagger>,
}

/// Entities of `texts` (in order), with the identity of the tagger version that found them.
/// The tagger slot's version for `bucket` decides the route: one over encoder states rides the
/// text lane (sharing the encoder pass), one over characters the `entities` lane.
pub async fn extract(
    state: &AppState,
    bucket: u32,
    texts: Vec<String>,
    truncate: bool,
    deadline: Option<Instant>,
) -> Result<(Vec<Vec<Entity>>, ModelInfo), ServiceError> {
    let snapshot = state.registry.snapshot();
    let Some(tagger) = snapshot.slots.tagger.pick(bucket) else {
        return Err(snapshot.missing(SlotName::Tagger));
    };
    if tagger.over_encoder() {
        let model = snapshot.text_model(bucket, Tasks::ENTITIES)?;
        let texts = texts.into_iter().enumerate().map(|(i, t)| (i, t, Vec::new())).collect();
        let ran = state.text.run(model, texts, Tasks::ENTITIES, false, truncate, deadline).await?;
        let info = ran.model.tagger.as_ref().map(|t| t.info()).ok_or_else(|| ServiceError::Internal("no tagger ran".into()))?;
        let found = ran
            .outputs
            .into_iter()
            .map(|o| o.entities.ok_or_else(|| ServiceError::Internal("the model returned no entities".into())))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((found, info));
    }
    let model = snapshot.char_tagger(tagger);
    drop(snapshot);
    let limit = state.config.max_entity_chars;
    let mut inputs = Vec::with_capacity(texts.len());
    for (i, t) in texts.into_iter().enumerate() {
        let n = t.chars().count();
        if n <= limit {
            inputs.push(t);
        } else if truncate {
            inputs.push(t.chars().take(limit).collect());
        } else {
            return Err(ServiceError::InvalidArgument(format!(
                "input {i} has {n} characters; the limit is {limit}; shorten it or set truncate"
            )));
        }
    }
    let pending = state.char_tagger.engine.submit(&model, inputs, deadline)?;
    let found = with_deadline(deadline, answers(pending)).await?;
    Ok((found, model.tagger.info()))
}
