#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("the {lane} queue is full ({queued} inputs waiting, limit {limit}); retry with backoff")]
    Overloaded { lane: &'static str, queued: usize, limit: usize },
    #[error("the deadline passed before the input was computed ({waited_ms} ms in queue)")]
    DeadlineExceeded { waited_ms: u64 },
    #[error("the server is shutting down and accepts no new work")]
    ShuttingDown,
    #[error("the model failed on this batch: {0}")]
    Model(String),
}
