//! The text encoder as a batching-engine backend.
use concierge_engine::Backend;
use concierge_models::{TextEncoder, TokenizedText};

pub struct TextInput {
    pub tokens: TokenizedText,
    pub normalize: bool,
}

pub struct TextModel {
    pub encoder: TextEncoder,
}

impl Backend for TextModel {
    type Input = TextInput;
    type Output = Vec<f32>;

    fn cost(&self, input: &TextInput) -> usize {
        input.tokens.len()
    }

    fn run(&self, batch: &[&TextInput]) -> Result<Vec<Vec<f32>>, String> {
        let tokens: Vec<&TokenizedText> = batch.iter().map(|i| &i.tokens).collect();
        let normalize: Vec<bool> = batch.iter().map(|i| i.normalize).collect();
        self.encoder.embed(&tokens, &normalize).map_err(|e| e.to_string())
    }
}
