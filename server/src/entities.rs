//! Entity extraction's two routes: a tagger over the text encoder's states rides the text lane
//! (one encoder pass shared with embeddings); a tagger over characters (Chinese) has its own
//! lane, `entities`, on the same device thread.
use std::time::Instant;

use candle_core::Device;
use concierge_engine::{Backend, Engine};
use concierge_models::entities::{extract_from_chars, Entity};
use concierge_models::{BiLstmCrf, ModelInfo};

use crate::error::ServiceError;
use crate::grpc::{answers, with_deadline};
use crate::registry::ModelSlot;
use crate::state::AppState;
use crate::text::Tasks;

/// A character-level tagger with the identity its answers carry.
pub struct CharTagger {
    pub tagger: BiLstmCrf,
    pub device: Device,
    pub info: ModelInfo,
}

impl Backend for CharTagger {
    type Input = String;
    type Output = Vec<Entity>;

    fn cost(&self, input: &String) -> usize {
        input.chars().count()
    }

    fn run(&self, batch: &[&String]) -> Result<Vec<Vec<Entity>>, String> {
        let texts: Vec<&str> = batch.iter().map(|s| s.as_str()).collect();
        extract_from_chars(&self.tagger, &texts, &self.device).map_err(|e| e.to_string())
    }
}

pub struct CharTaggerLane {
    pub slot: ModelSlot<CharTagger>,
    pub engine: Engine<CharTagger>,
}

/// Which tagger answers `Extract`, decided when the models load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Started with --no-entity-model.
    Off,
    /// On the text lane, reading the encoder's states.
    Encoder(ModelInfo),
    /// On the `entities` lane, reading characters.
    Chars,
}

/// Entities of `texts` (in order), with the identity of the tagger that found them.
pub async fn extract(
    state: &AppState,
    texts: Vec<String>,
    truncate: bool,
    deadline: Option<Instant>,
) -> Result<(Vec<Vec<Entity>>, ModelInfo), ServiceError> {
    let route = state.entity_route.get()?;
    match &*route {
        Route::Off => Err(ServiceError::Unimplemented(
            "this server was started with --no-entity-model; it extracts no entities".into(),
        )),
        Route::Encoder(info) => {
            let ran = state.text.run(texts.into_iter().enumerate().collect(), Tasks::ENTITIES, false, truncate, deadline).await?;
            let found = ran
                .outputs
                .into_iter()
                .map(|o| o.entities.ok_or_else(|| ServiceError::Internal("the model returned no entities".into())))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((found, info.clone()))
        }
        Route::Chars => {
            let lane = &state.char_tagger;
            let model = lane.slot.get()?;
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
            let pending = lane.engine.submit(&model, inputs, deadline)?;
            let found = with_deadline(deadline, answers(pending)).await?;
            Ok((found, model.info.clone()))
        }
    }
}
