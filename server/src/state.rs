//! What every service shares: the configuration, the model slots and the batching lanes.
use std::sync::Arc;

use crate::config::Config;
use crate::entities::{CharTaggerLane, Route};
use crate::image::ImageLane;
use crate::kb::VectorStore;
use crate::registry::ModelSlot;
use crate::text::TextLane;

pub struct AppState {
    pub config: Config,
    /// The text encoder behind `Embeddings`, with the heads on its states (entities, intents).
    pub text: Arc<TextLane>,
    /// The image encoder behind `EmbedImage` (and a fusing intent model's images); None when
    /// started with --no-image-model.
    pub image: Option<Arc<ImageLane>>,
    /// The knowledge base's towers: the same lane as `text` unless their own checkpoints are set.
    pub query_tower: Arc<TextLane>,
    pub document_tower: Arc<TextLane>,
    pub kb: ModelSlot<dyn VectorStore>,
    /// Which tagger answers `Entities/Extract` (set when the models load).
    pub entity_route: ModelSlot<Route>,
    /// The lane of a character-level tagger (unused when the tagger reads encoder states).
    pub char_tagger: Arc<CharTaggerLane>,
}
