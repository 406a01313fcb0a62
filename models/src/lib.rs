//! Model code for concierge, on candle only (no async runtime, no gRPC): the BERT text encoder
//! over packed batches, sentence-transformers pooling, tokenisation and checkpoint loading.
pub mod bert;
pub mod checkpoint;
pub mod encoder;
pub mod error;
pub mod pooling;
pub mod tokenize;

pub use checkpoint::ModelSource;
pub use encoder::{ModelInfo, TextEncoder};
pub use error::{ModelError, Result};
pub use tokenize::TokenizedText;
