//! The dynamic batching engine. Callers from many threads submit inputs; one device thread
//! packs them into batches (bounded by inputs, by cost such as tokens, and by a maximum wait),
//! runs the model and answers each input on its own oneshot channel.
//!
//! It knows neither gRPC nor candle: a model is anything implementing [`Backend`]. Admission is
//! bounded (a full queue answers [`EngineError::Overloaded`] at once), deadlines are honoured
//! (an expired input is answered, never computed) and an input whose caller went away is dropped
//! before it costs compute. Each input carries the `Arc` of the model version it was prepared for,
//! so a model can be swapped while serving: batches never mix versions, and an old version lives
//! until its last queued input is done.
mod batcher;
mod error;

pub use batcher::{BatchLimits, Device, Engine, Pending};
pub use error::EngineError;

/// The message a caught panic carries (`panic!("...")` with or without formatting), if any.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    payload.downcast_ref::<String>().cloned().or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
}

/// A model the engine can run batches of.
pub trait Backend: Send + Sync + 'static {
    type Input: Send + 'static;
    type Output: Send + 'static;
    /// What an input weighs against [`BatchLimits::max_batch_cost`] (for text: its tokens).
    fn cost(&self, input: &Self::Input) -> usize;
    /// Runs one batch; must return one output per input, in order.
    fn run(&self, batch: &[&Self::Input]) -> Result<Vec<Self::Output>, String>;
}
