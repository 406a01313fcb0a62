//! Sequence labelling around the entity tagger, without any model: reading the ATIS and MSRA
//! data sets, turning tag sequences into entity spans by conlleval's rules, and scoring
//! predicted tags against gold ones the way conlleval does.
use std::path::PathBuf;

pub mod conlleval;
pub mod data;
pub mod spans;

pub use conlleval::{evaluate, Counts, Evaluation, LabelScore};
pub use data::{parse_atis, parse_msra, read_atis, read_msra, repo_data_dir, Sentence};
pub use spans::{parse_tag, scheme_of, spans, tags_of, Prefix, Scheme, Span};

#[derive(Debug, thiserror::Error)]
pub enum SequenceError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}:{line}: {reason}")]
    Parse { path: PathBuf, line: usize, reason: String },

    #[error("tag {0:?} is neither O nor B-, I-, M-, E- or S- followed by a label")]
    BadTag(String),

    #[error("sentence {index}: {gold} gold tags but {pred} predicted")]
    LengthMismatch { index: usize, gold: usize, pred: usize },

    #[error("{gold} gold sentences but {pred} predicted")]
    CountMismatch { gold: usize, pred: usize },

    #[error("span {label} [{start}, {end}) does not fit a sentence of {len} tokens or overlaps another")]
    BadSpan { label: String, start: usize, end: usize, len: usize },
}

pub type Result<T, E = SequenceError> = std::result::Result<T, E>;
