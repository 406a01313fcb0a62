//! Shared by the model tests.
pub use concierge_models::repo_default_model_dir as default_model_dir;
