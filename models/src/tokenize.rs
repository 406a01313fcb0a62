//! Text tokenisation with a Hugging Face fast tokenizer. Checkpoints often ship a
//! `tokenizer.json` that pads and truncates to a fixed length (all-MiniLM-L6-v2 pads to 128);
//! both are switched off here: batches are packed without padding and the length limit is
//! enforced by us, so an over-long input is either rejected with its token count or truncated
//! exactly as sentence-transformers truncates it.
use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{ModelError, Result};

/// One tokenised input, ready for the encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedText {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Tokens the untruncated text had (equal to `ids.len()` unless truncated).
    pub original_len: usize,
    /// Per token, the word it belongs to (the tokenizer's pre-tokenisation: whitespace and
    /// punctuation for BERT); None for special tokens. For word-level heads (entity tagging).
    pub words: Vec<Option<u32>>,
    /// Per token, its `[start, end)` byte range in the input text (`(0, 0)` for special tokens).
    pub offsets: Vec<(usize, usize)>,
}

impl TokenizedText {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

pub struct TextTokenizer {
    plain: Tokenizer,
    truncating: Tokenizer,
    max_len: usize,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`; `max_len` is the model's limit in tokens, special tokens included.
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        let mut plain = Tokenizer::from_file(path).map_err(|e| ModelError::BadFile {
            path: path.to_owned(),
            reason: format!("expected a Hugging Face tokenizer.json: {e}"),
        })?;
        plain.with_padding(None);
        plain
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut truncating = plain.clone();
        truncating
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(Self { plain, truncating, max_len })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokenises `text`, the `index`-th input of its request (named in errors).
    pub fn encode(&self, index: usize, text: &str, truncate: bool) -> Result<TokenizedText> {
        let enc = self
            .plain
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(format!("input {index}: {e}")))?;
        let original_len = enc.len();
        let enc = if original_len <= self.max_len {
            enc
        } else if truncate {
            self.truncating
                .encode(text, true)
                .map_err(|e| ModelError::Tokenizer(format!("input {index}: {e}")))?
        } else {
            return Err(ModelError::InputTooLong { index, tokens: original_len, limit: self.max_len });
        };
        Ok(TokenizedText {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
            original_len,
            words: enc.get_word_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
        })
    }
}
