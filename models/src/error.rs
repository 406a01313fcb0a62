//! Errors of the model layer. Each says what is wrong and, where it can, what to do about it.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("checkpoint file {path} is missing: {expected}")]
    MissingFile { path: PathBuf, expected: String },

    #[error("checkpoint file {path} is not valid: {reason}")]
    BadFile { path: PathBuf, reason: String },

    #[error("could not fetch {file} of {repo}@{revision} from the Hugging Face Hub: {reason}")]
    Hub { repo: String, revision: String, file: String, reason: String },

    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    #[error("input {index} has {tokens} tokens; the limit is {limit}; set truncate=true or shorten it")]
    InputTooLong { index: usize, tokens: usize, limit: usize },

    /// A caller's input the model cannot take (e.g. a sequence length of zero or past the
    /// batch's padded length); the message says which.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    #[error("unsupported model: {0}")]
    Unsupported(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
