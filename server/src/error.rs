//! The service layer's errors and the one place that decides their gRPC status codes.
use concierge_engine::EngineError;
use concierge_models::ModelError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request itself is wrong; the message says what to change.
    #[error("{0}")]
    InvalidArgument(String),
    /// The server is at capacity, or the message is over a size limit.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A named thing (a collection) is not there.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The operation does not fit the state (promote without a candidate).
    #[error("{0}")]
    FailedPrecondition(String),
    /// An admin call without credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// An admin call with the wrong credentials, or to a server without an admin token.
    #[error("{0}")]
    PermissionDenied(String),
    /// Not ready (model loading) or shutting down: retry elsewhere or later.
    #[error("{0}")]
    Unavailable(String),
    /// A feature this server was started without (e.g. --no-image-model).
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Internal(String),
}

impl From<EngineError> for ServiceError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Overloaded { .. } => ServiceError::ResourceExhausted(e.to_string()),
            EngineError::DeadlineExceeded { .. } => ServiceError::DeadlineExceeded(e.to_string()),
            EngineError::ShuttingDown => ServiceError::Unavailable(e.to_string()),
            EngineError::Model(_) => ServiceError::Internal(e.to_string()),
        }
    }
}

impl From<ModelError> for ServiceError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::InputTooLong { .. } | ModelError::Tokenizer(_) | ModelError::InvalidInput(_) => ServiceError::InvalidArgument(e.to_string()),
            other => ServiceError::Internal(other.to_string()),
        }
    }
}

impl ServiceError {
    pub fn code(&self) -> Code {
        match self {
            ServiceError::InvalidArgument(_) => Code::InvalidArgument,
            ServiceError::ResourceExhausted(_) => Code::ResourceExhausted,
            ServiceError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ServiceError::NotFound(_) => Code::NotFound,
            ServiceError::AlreadyExists(_) => Code::AlreadyExists,
            ServiceError::FailedPrecondition(_) => Code::FailedPrecondition,
            ServiceError::Unauthenticated(_) => Code::Unauthenticated,
            ServiceError::PermissionDenied(_) => Code::PermissionDenied,
            ServiceError::Unavailable(_) => Code::Unavailable,
            ServiceError::Unimplemented(_) => Code::Unimplemented,
            ServiceError::Internal(_) => Code::Internal,
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}
