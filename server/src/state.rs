//! What every service shares: the configuration, the model registry and the batching lanes.
use std::sync::Arc;

use crate::config::Config;
use crate::entities::CharTaggerLane;
use crate::image::ImageLane;
use crate::kb::VectorStore;
use crate::registry::{ModelSlot, Registry};
use crate::text::TextLane;

pub struct AppState {
    pub config: Config,
    /// The device every model runs on.
    pub device: candle_core::Device,
    /// Every model slot's versions; requests route on its snapshots.
    pub registry: Registry,
    /// The text lane: the text encoder with the heads on its states (entities, intents), and
    /// the towers unless they have lanes of their own.
    pub text: Arc<TextLane>,
    /// The image lane; None when started with --no-image-model.
    pub image: Option<Arc<ImageLane>>,
    /// The knowledge base towers' lanes: the text lane unless their own checkpoints are set.
    pub query_tower: Arc<TextLane>,
    pub document_tower: Arc<TextLane>,
    pub kb: ModelSlot<dyn VectorStore>,
    /// The lane of character-level taggers (Chinese).
    pub char_tagger: Arc<CharTaggerLane>,
}
