//! What every service shares: the configuration, the model slots and the batching lanes.
use concierge_engine::Engine;

use crate::config::Config;
use crate::registry::ModelSlot;
use crate::text::TextModel;

pub struct AppState {
    pub config: Config,
    pub text: ModelSlot<TextModel>,
    pub text_engine: Engine<TextModel>,
}
