//! The text encoder as a whole: checkpoint -> tokenizer + BERT + sentence-transformers pooling,
//! then the modules after pooling (Dense projections, Normalize). This is what the serving
//! engine holds (behind a swappable handle) and calls per batch.
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::bert::{BertEncoder, Config, PackedBatch};
use crate::checkpoint::{ModelSource, TextCheckpoint};
use crate::dense::Head;
use crate::error::{ModelError, Result};
use crate::pooling::Pooling;
use crate::tokenize::{TextTokenizer, TokenizedText};

/// Identity of a loaded checkpoint, stamped on every response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub id: String,
    pub version: String,
    pub dimension: usize,
    pub max_input_tokens: usize,
}

/// A batch's token ids, type ids and lengths, laid end to end (see [`PackedBatch`]).
fn packed(inputs: &[&TokenizedText]) -> (Vec<u32>, Vec<u32>, Vec<usize>) {
    let ids = inputs.iter().flat_map(|t| t.ids.iter().copied()).collect();
    let type_ids = inputs.iter().flat_map(|t| t.type_ids.iter().copied()).collect();
    (ids, type_ids, inputs.iter().map(|t| t.len()).collect())
}

/// Packed token states of one batch (see [`TextEncoder::token_states`]).
#[derive(Debug, Clone)]
pub struct TokenStates {
    /// `[sum of lens, hidden]`, f32.
    pub hidden: Tensor,
    pub lens: Vec<usize>,
}

impl TokenStates {
    /// Input `i`'s rows `[lens[i], hidden]`.
    pub fn of(&self, i: usize) -> Result<Tensor> {
        let start: usize = self.lens[..i].iter().sum();
        Ok(self.hidden.narrow(0, start, self.lens[i])?)
    }
}

pub struct TextEncoder {
    bert: BertEncoder,
    tokenizer: TextTokenizer,
    pooling: Pooling,
    head: Head,
    info: ModelInfo,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

/// A JSON file of a checkpoint, or a `BadFile` error saying what was expected.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelError::BadFile { path: path.to_owned(), reason: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
        path: path.to_owned(),
        reason: format!("expected {what}: {e}"),
    })
}

impl TextEncoder {
    /// Loads a checkpoint. `max_input_tokens` caps the model's own limit (None: the model's).
    pub fn load(source: &ModelSource, device: &Device, dtype: DType, max_input_tokens: Option<usize>) -> Result<Self> {
        let ckpt = source.resolve_text()?;
        Self::from_checkpoint(&ckpt, device, dtype, max_input_tokens)
    }

    pub fn from_checkpoint(
        ckpt: &TextCheckpoint,
        device: &Device,
        dtype: DType,
        max_input_tokens: Option<usize>,
    ) -> Result<Self> {
        let cfg: Config = crate::bert::read_config(&ckpt.config)?;
        if let Some(t) = cfg.model_type.as_deref().filter(|t| !matches!(*t, "bert" | "roberta" | "xlm-roberta" | "mpnet")) {
            return Err(ModelError::Unsupported(format!(
                "{}: model_type \"{t}\"; this encoder runs BERT and MPNet checkpoints",
                ckpt.config.display()
            )));
        }
        // sentence-transformers truncates at max_seq_length, which may be below the positions.
        let st_max = match &ckpt.sentence_bert_config {
            Some(p) => read_json::<SentenceBertConfig>(p, "a sentence_bert_config.json")?.max_seq_length,
            None => None,
        };
        let mut max_len = st_max.unwrap_or(cfg.max_position_embeddings).min(cfg.max_position_embeddings);
        if let Some(cap) = max_input_tokens {
            max_len = max_len.min(cap);
        }
        let pooling = match &ckpt.pooling {
            Some(p) => Pooling::from_file(p)?,
            None => Pooling::mean(),
        };
        // SAFETY: the weights file is memory-mapped read-only; it must not change while loaded,
        // which holds for checkpoint folders (replaced, never edited in place).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&ckpt.weights], dtype, device) }
            .map_err(|e| ModelError::BadFile { path: ckpt.weights.clone(), reason: e.to_string() })?;
        let bert = BertEncoder::load(vb, &cfg).map_err(|e| match e {
            ModelError::Candle(c) => ModelError::BadFile {
                path: ckpt.weights.clone(),
                reason: format!("does not match {}: {c}", ckpt.config.display()),
            },
            other => other,
        })?;
        let head = Head::load(&ckpt.after_pooling, bert.hidden_size() * pooling.modes.len(), device)?;
        let tokenizer = TextTokenizer::from_file(&ckpt.tokenizer, max_len)?;
        let info = ModelInfo {
            id: ckpt.id.clone(),
            version: ckpt.version.clone(),
            dimension: head.dimension(),
            max_input_tokens: max_len,
        };
        tracing::info!(
            id = %info.id, version = %info.version, dim = info.dimension, max_len, ?device, ?dtype,
            projected = !head.is_identity(), normalizes = head.normalizes(), "text encoder loaded"
        );
        Ok(Self { bert, tokenizer, pooling, head, info })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenize(&self, index: usize, text: &str, truncate: bool) -> Result<TokenizedText> {
        self.tokenizer.encode(index, text, truncate)
    }

    /// Whether the checkpoint ends with a sentence-transformers `Normalize` module. Such a model
    /// is meant to give unit vectors (sentence-transformers always normalises them); here the
    /// final normalisation is `embed`'s `normalize[i]`, so `normalize = false` (the server's
    /// per-request flag) still returns the vector from before the model's own Normalize.
    pub fn normalizes(&self) -> bool {
        self.head.normalizes()
    }

    /// Embeddings `[B, D]` (f32) for a batch of tokenised inputs: pooled, then through the
    /// checkpoint's Dense modules (and any Normalize between them); not normalised at the end,
    /// even when the checkpoint ends with Normalize (see [`Self::normalizes`]).
    pub fn embed_tensor(&self, inputs: &[&TokenizedText]) -> Result<Tensor> {
        let states = self.token_states(inputs)?;
        self.embed_states(&states)
    }

    /// The encoder's last hidden states for a batch, packed: `[sum of lengths, hidden]` (f32),
    /// input `i` owning rows `offsets[i]..offsets[i] + lens[i]`. One encoder pass that every
    /// head (pooling for embeddings, the entity tagger, ...) can read.
    pub fn token_states(&self, inputs: &[&TokenizedText]) -> Result<TokenStates> {
        self.token_states_tapped(inputs, None).map(|(s, _)| s)
    }

    /// [`Self::token_states`], plus (with `tap = Some(n)`) the states after layer `n` (f32:
    /// the residual stream is f32 whatever the weights' dtype), for heads that continue from there with their own fine-tuned top layers:
    /// still one pass.
    pub fn token_states_tapped(&self, inputs: &[&TokenizedText], tap: Option<usize>) -> Result<(TokenStates, Option<Tensor>)> {
        let taps: Vec<usize> = tap.into_iter().collect();
        self.token_states_taps(inputs, &taps).map(|(s, mut t)| (s, t.pop()))
    }

    /// [`Self::token_states`], plus the states after each layer in `taps` (`0`: the embeddings)
    /// in f32, in that order: one pass for every head's reads.
    pub fn token_states_taps(&self, inputs: &[&TokenizedText], taps: &[usize]) -> Result<(TokenStates, Vec<Tensor>)> {
        let (ids, type_ids, lens) = packed(inputs);
        let (hidden, tapped) = self.bert.forward_taps(&PackedBatch { ids: &ids, type_ids: &type_ids, lens: &lens }, taps)?;
        Ok((TokenStates { hidden: hidden.to_dtype(DType::F32)?, lens }, tapped))
    }

    /// [`Self::token_states_taps`], stopping after the deepest tap (the layers above are
    /// skipped; the returned states are that tap's): for a batch no reader of the last layer
    /// is in.
    pub fn token_states_taps_until(&self, inputs: &[&TokenizedText], taps: &[usize]) -> Result<(TokenStates, Vec<Tensor>)> {
        let (ids, type_ids, lens) = packed(inputs);
        let (hidden, tapped) = self.bert.forward_taps_until(&PackedBatch { ids: &ids, type_ids: &type_ids, lens: &lens }, taps)?;
        Ok((TokenStates { hidden: hidden.to_dtype(DType::F32)?, lens }, tapped))
    }

    /// The states after layer `n` alone (the layers above are skipped), in f32:
    /// for a batch whose only reader is a head branching at `n`.
    pub fn token_states_until(&self, inputs: &[&TokenizedText], n: usize) -> Result<TokenStates> {
        let (ids, type_ids, lens) = packed(inputs);
        let hidden = self.bert.forward_until(&PackedBatch { ids: &ids, type_ids: &type_ids, lens: &lens }, n)?;
        Ok(TokenStates { hidden, lens })
    }

    /// Number of transformer layers (what a branch's `tap` counts).
    pub fn num_layers(&self) -> usize {
        self.bert.num_layers()
    }

    /// Embeddings `[B, D]` from token states (see [`Self::embed_tensor`]).
    pub fn embed_states(&self, states: &TokenStates) -> Result<Tensor> {
        let pooled = self.pooling.pool(&states.hidden, &states.lens)?;
        self.head.forward(&pooled)
    }

    /// Hidden size of the token states.
    pub fn hidden_size(&self) -> usize {
        self.bert.hidden_size()
    }

    /// One vector per input, L2-normalised where `normalize[i]` (which is what a checkpoint's
    /// trailing Normalize module asks for: see [`Self::normalizes`]).
    pub fn embed(&self, inputs: &[&TokenizedText], normalize: &[bool]) -> Result<Vec<Vec<f32>>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let mut rows = self.embed_tensor(inputs)?.to_vec2::<f32>()?;
        for (row, &n) in rows.iter_mut().zip(normalize) {
            if n {
                l2_normalize(row);
            }
        }
        Ok(rows)
    }
}

/// In place, as torch.nn.functional.normalize: `x / max(||x||, 1e-12)`.
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}
