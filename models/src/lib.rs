//! Model code for concierge, on candle only (no async runtime, no gRPC): the BERT text encoder
//! over packed batches, sentence-transformers pooling and Dense/Normalize modules, tokenisation
//! and checkpoint loading, image decoding and preprocessing, the ResNet image encoder, the text x
//! image cross-attention fusion block, and the BiLSTM-CRF sequence tagger with its data, spans
//! and conlleval scores, and entity extraction.
pub mod bert;
pub mod checkpoint;
pub mod dense;
pub mod encoder;
pub mod entities;
pub mod error;
pub mod fusion;
pub mod image_encoder;
pub mod imageproc;
pub mod intent;
pub mod pooling;
pub mod resnet;
pub mod sequence;
pub mod tagger;
pub mod tokenize;

pub use checkpoint::{ImageCheckpoint, ModelSource};
pub use encoder::{ModelInfo, TextEncoder, TokenStates};
pub use image_encoder::{ImageEmbedding, ImageEncoder};
pub use error::{ModelError, Result};
pub use fusion::{CrossAttentionFusion, FusionConfig};
pub use resnet::{ResNet, ResNetConfig, ResNetOutput};
pub use tagger::{BiLstmCrf, TaggerConfig};
pub use tokenize::TokenizedText;

/// The default model's folder in this repository (`model-store/all-MiniLM-L6-v2`, written by
/// `scripts/fetch-default-model.sh`), or `$CONCIERGE_TEST_MODEL_DIR` when set: for the tests and
/// benches of this workspace. Panics, saying how to fetch it, when the model is not there.
pub fn repo_default_model_dir() -> std::path::PathBuf {
    let dir = std::env::var_os("CONCIERGE_TEST_MODEL_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../model-store/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "the default model is not at {}: run scripts/fetch-default-model.sh first",
        dir.display()
    );
    dir
}
