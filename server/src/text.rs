//! The text encoder as a batching-engine backend, and the one path every service takes to run
//! texts: tokenise off the async runtime, submit to the lane, await within the deadline.
//!
//! One encoder pass serves every head an input asks for: each input says which outputs it wants
//! ([`Tasks`]: its embedding, its entities, its intents), the batch runs BERT once, and the heads
//! read the same token states (an intent head with its own fine-tuned top layers reads the states
//! tapped after the layer it branches from, in the same pass). A message that needs an embedding,
//! its entities and its intents pays for one pass.
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use concierge_engine::{Backend, Engine};
use concierge_models::entities::{encoder_taps, extract_from_states, features_from_taps, Entity};
use concierge_models::intent::IntentModel;
use concierge_models::{ModelInfo, TextEncoder, TokenStates, TokenizedText};

use crate::error::ServiceError;
use crate::grpc::{answers, with_deadline};
use crate::registry::{Tagger, Version};

/// What one input wants from the encoder pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tasks {
    pub embed: bool,
    pub entities: bool,
    pub intent: bool,
}

impl Tasks {
    pub const EMBED: Tasks = Tasks { embed: true, entities: false, intent: false };
    pub const ENTITIES: Tasks = Tasks { embed: false, entities: true, intent: false };
    pub const INTENT: Tasks = Tasks { embed: false, entities: false, intent: true };
}

pub struct TextInput {
    pub tokens: TokenizedText,
    pub normalize: bool,
    pub tasks: Tasks,
    /// For the intent head's fusion block: each attached image's positions `[h*w, C]` (see
    /// `CrossAttentionFusion::positions`), concatenated on the device thread; empty: text only.
    pub images: Vec<Tensor>,
}

/// One input's answers, as its [`Tasks`] asked.
#[derive(Debug, Clone, Default)]
pub struct TextOutput {
    pub embedding: Option<Vec<f32>>,
    pub entities: Option<Vec<Entity>>,
    /// Every intent label's probability, in the order of the head's labels.
    pub intent: Option<Vec<f32>>,
}

/// A text encoder version with the head versions that read its token states: what one batch
/// runs (batches never mix compositions). Built by the registry's snapshot per routing bucket.
pub struct TextModel {
    pub encoder: Arc<Version<TextEncoder>>,
    /// An entity tagger over this encoder's states (`input: "encoder"`), if one is loaded.
    pub tagger: Option<Arc<Version<Tagger>>>,
    /// An intent classifier over this encoder's states, if one is loaded.
    pub intent: Option<Arc<Version<IntentHead>>>,
}

/// An intent model with what serving needs to know about it.
pub struct IntentHead {
    pub model: IntentModel,
    /// The text encoder weights it was trained on (None: it does not say).
    pub reads: Option<String>,
    /// The image model weights its fusion block was trained on, when it fuses images.
    pub fuses_with: Option<String>,
    /// Why queries' images are refused whatever image model is loaded (a text-only model, no
    /// image model, or a fusion block trained on an image model not loaded at its load); None:
    /// images are fused with `fuses_with`'s features.
    pub no_images: Option<String>,
}

impl Backend for TextModel {
    type Input = TextInput;
    type Output = TextOutput;

    fn cost(&self, input: &TextInput) -> usize {
        input.tokens.len()
    }

    fn run(&self, batch: &[&TextInput]) -> Result<Vec<TextOutput>, String> {
        let tokens: Vec<&TokenizedText> = batch.iter().map(|i| &i.tokens).collect();
        let classify: Vec<usize> = (0..batch.len()).filter(|&i| batch[i].tasks.intent).collect();
        let intent = match classify.is_empty() {
            true => None,
            false => Some(self.intent.as_ref().ok_or("this text model has no intent head")?),
        };
        let tag: Vec<usize> = (0..batch.len()).filter(|&i| batch[i].tasks.entities).collect();
        let tagger = match tag.is_empty() {
            true => None,
            false => Some(&self.tagger.as_ref().ok_or("this text model has no entity tagger")?.model),
        };
        // One pass; a head with its own top layers also gets the states it branches from, and a
        // tagger that reads several layers gets theirs. When the branching head is the batch's
        // only reader, the encoder stops at the branch.
        let tap = intent.and_then(|h| h.model.tap());
        let layers = self.encoder.num_layers();
        let tagger_taps = tagger.map(|t| encoder_taps(t, layers)).unwrap_or_default();
        let taps: Vec<usize> = tap.into_iter().chain(tagger_taps.iter().copied()).collect();
        let only_intents = batch.iter().all(|i| !i.tasks.embed && !i.tasks.entities);
        // Pooling reads the last layer, and so does a tagger that asks for no taps; otherwise the
        // pass stops at the deepest tap (a tagger with its own top layers, an intent branch).
        let reads_last = batch.iter().any(|i| i.tasks.embed) || (tagger.is_some() && tagger_taps.is_empty());
        let (states, mut tapped) = match tap {
            Some(n) if only_intents => {
                let s = self.encoder.token_states_until(&tokens, n).map_err(|e| e.to_string())?;
                let t = s.hidden.clone();
                (s, vec![t])
            }
            _ if !reads_last && !taps.is_empty() => self.encoder.token_states_taps_until(&tokens, &taps).map_err(|e| e.to_string())?,
            _ => self.encoder.token_states_taps(&tokens, &taps).map_err(|e| e.to_string())?,
        };
        // A tagger reading the last layer alone reads `states`; one reading other layers, or its
        // own fine-tuned top layers, gets its features from its taps.
        let tagger_states = match tagger {
            Some(t) if !tagger_taps.is_empty() => {
                let own = tapped.split_off(tap.iter().len());
                features_from_taps(t, layers, own, &states.lens)
                    .map_err(|e| e.to_string())?
                    .map(|hidden| TokenStates { hidden, lens: states.lens.clone() })
            }
            _ => None,
        };
        let tapped = tapped.pop();
        let mut out = vec![TextOutput::default(); batch.len()];

        let embed: Vec<usize> = (0..batch.len()).filter(|&i| batch[i].tasks.embed).collect();
        if !embed.is_empty() {
            // Pooling reads only the rows of the inputs that want a vector.
            let sub = rows_of(&states.hidden, &states.lens, &embed).map_err(|e| e.to_string())?;
            let mut rows: Vec<Vec<f32>> = self
                .encoder
                .embed_states(&sub)
                .and_then(|t| Ok(t.to_vec2::<f32>()?))
                .map_err(|e| e.to_string())?;
            for (&i, row) in embed.iter().zip(rows.iter_mut()) {
                if batch[i].normalize {
                    concierge_models::encoder::l2_normalize(row);
                }
                out[i].embedding = Some(std::mem::take(row));
            }
        }

        if let Some(tagger) = tagger {
            let inputs: Vec<&TokenizedText> = tag.iter().map(|&i| tokens[i]).collect();
            let read = tagger_states.as_ref().unwrap_or(&states);
            let found = extract_from_states(tagger, &inputs, |k| read.of(tag[k])).map_err(|e| e.to_string())?;
            for (&i, ents) in tag.iter().zip(found) {
                out[i].entities = Some(ents);
            }
        }

        if let Some(head) = intent {
            let sub = rows_of(tapped.as_ref().unwrap_or(&states.hidden), &states.lens, &classify).map_err(|e| e.to_string())?;
            let images = classify
                .iter()
                .map(|&i| match batch[i].images.as_slice() {
                    [] => Ok(None),
                    [one] => Ok(Some(one.clone())),
                    many => Tensor::cat(many, 0).map(Some),
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            let probs = head.model.probabilities(&sub.hidden, &sub.lens, &images).map_err(|e| e.to_string())?;
            for (&i, p) in classify.iter().zip(probs) {
                out[i].intent = Some(p);
            }
        }
        Ok(out)
    }
}

/// The packed rows of inputs `which` (in that order) of a batch's packed states `[T, H]`.
fn rows_of(hidden: &Tensor, lens: &[usize], which: &[usize]) -> candle_core::Result<TokenStates> {
    if which.len() == lens.len() {
        return Ok(TokenStates { hidden: hidden.clone(), lens: lens.to_vec() });
    }
    let starts: Vec<usize> = lens.iter().scan(0, |s, &l| Some(std::mem::replace(s, *s + l))).collect();
    let rows = which.iter().map(|&i| hidden.narrow(0, starts[i], lens[i])).collect::<candle_core::Result<Vec<_>>>()?;
    Ok(TokenStates { hidden: Tensor::cat(&rows, 0)?, lens: which.iter().map(|&i| lens[i]).collect() })
}

/// A batching lane of text models (the text encoder's, or a tower's).
pub struct TextLane {
    pub engine: Engine<TextModel>,
}

/// All answers of one request, in input order.
pub struct Ran {
    pub outputs: Vec<TextOutput>,
    pub tokens: usize,
    pub model: Arc<TextModel>,
}

impl TextLane {
    /// Runs `texts` (each with the index its errors name: "input 3 has 302 tokens", and its
    /// images' fusion positions, empty: none) on `model`, the composition the request was
    /// routed to and checked against, for `tasks`.
    pub async fn run(
        &self,
        model: Arc<TextModel>,
        texts: Vec<(usize, String, Vec<Tensor>)>,
        tasks: Tasks,
        normalize: bool,
        truncate: bool,
        deadline: Option<Instant>,
    ) -> Result<Ran, ServiceError> {
        if tasks.entities && model.tagger.is_none() {
            return Err(ServiceError::Unimplemented("no entity tagger runs on this text model".into()));
        }
        if tasks.intent && model.intent.is_none() {
            return Err(ServiceError::Unimplemented("no intent model runs on this text model".into()));
        }
        // Tokenising is CPU work: keep it off the async runtime and off the device thread.
        let t0 = Instant::now();
        let m = model.clone();
        let inputs = tokio::task::spawn_blocking(move || {
            texts
                .into_iter()
                .map(|(i, text, images)| {
                    Ok(TextInput { tokens: m.encoder.tokenize(i, &text, truncate)?, normalize, tasks, images })
                })
                .collect::<Result<Vec<_>, ServiceError>>()
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("tokenisation task failed: {e}")))??;
        metrics::histogram!("concierge_tokenization_seconds").record(t0.elapsed().as_secs_f64());
        let tokens = inputs.iter().map(|i| i.tokens.len()).sum();

        let pending = self.engine.submit(&model, inputs, deadline)?;
        let outputs = with_deadline(deadline, answers(pending)).await?;
        Ok(Ran { outputs, tokens, model })
    }

    /// Embeds `texts` (each with the index its errors name) on `model`; returns the vectors in
    /// order, the token count and the encoder version's identity.
    pub async fn embed(
        &self,
        model: Arc<TextModel>,
        texts: Vec<(usize, String)>,
        normalize: bool,
        truncate: bool,
        deadline: Option<Instant>,
    ) -> Result<(Vec<Vec<f32>>, usize, ModelInfo), ServiceError> {
        let texts = texts.into_iter().map(|(i, t)| (i, t, Vec::new())).collect();
        let ran = self.run(model, texts, Tasks::EMBED, normalize, truncate, deadline).await?;
        let vectors = ran
            .outputs
            .into_iter()
            .map(|o| o.embedding.ok_or_else(|| ServiceError::Internal("the model returned no vector".into())))
            .collect::<Result<_, _>>()?;
        Ok((vectors, ran.tokens, ran.model.encoder.info()))
    }
}
