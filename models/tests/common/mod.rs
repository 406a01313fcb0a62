//! Shared by the model tests: where the default model lives.
use std::path::PathBuf;

/// The default model folder (fetched by `scripts/fetch-default-model.sh`, which the README's
/// test command runs first). Override with CONCIERGE_TEST_MODEL_DIR.
pub fn default_model_dir() -> PathBuf {
    let dir = std::env::var_os("CONCIERGE_TEST_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model-store/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "the default model is not at {}: run scripts/fetch-default-model.sh first",
        dir.display()
    );
    dir
}
