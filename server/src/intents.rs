//! Intent classification's path: a query's images (for a head that fuses them) go through the
//! image lane for their feature maps first; then every query's text, with its images'
//! positions, rides the text lane, where the encoder pass is shared with embeddings and entities.
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;

use crate::error::ServiceError;
use crate::grpc::with_deadline;
use crate::image::{EncodedImage, ImageModel};
use crate::state::AppState;
use crate::text::{Tasks, TextModel};

/// One query: its text and its encoded images.
pub struct Query {
    pub text: String,
    pub images: Vec<Vec<u8>>,
}

/// Every label's probability for each query (in order, labels in the head's order), from
/// `model`'s intent head, which the caller has checked the queries against (images only when
/// the head fuses them).
pub async fn classify(
    state: &AppState,
    model: Arc<TextModel>,
    image_model: Option<Arc<ImageModel>>,
    queries: Vec<Query>,
    truncate: bool,
    deadline: Option<Instant>,
) -> Result<Vec<Vec<f32>>, ServiceError> {
    let work = async {
        let mut texts: Vec<(usize, String, Vec<Tensor>)> = Vec::with_capacity(queries.len());
        let mut images = Vec::new();
        for (q, query) in queries.into_iter().enumerate() {
            images.extend(query.images.into_iter().enumerate().map(|(index, bytes)| EncodedImage { bytes, index, query: Some(q) }));
            texts.push((q, query.text, Vec::new()));
        }
        if !images.is_empty() {
            let (Some(lane), Some(image_model)) = (state.image.as_ref(), image_model) else {
                return Err(ServiceError::Unimplemented("this server runs no image model the intent model fuses; it classifies text only".into()));
            };
            let owners: Vec<usize> = images.iter().map(|i| i.query.unwrap_or(0)).collect();
            let positions = lane.positions(image_model, images, deadline).await?;
            for (q, p) in owners.into_iter().zip(positions) {
                texts[q].2.push(p);
            }
        }
        let ran = state.text.run(model, texts, Tasks::INTENT, false, truncate, deadline).await?;
        ran.outputs
            .into_iter()
            .map(|o| o.intent.ok_or_else(|| ServiceError::Internal("the model returned no intents".into())))
            .collect()
    };
    with_deadline(deadline, work).await
}
