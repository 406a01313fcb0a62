//! The concierge gRPC server: configuration, the gRPC edge, model slots, metrics and the
//! start/stop sequence. The only crate that knows tokio and tonic.
pub mod config;
pub mod entities;
pub mod error;
pub mod grpc;
pub mod image;
pub mod intents;
pub mod kb;
pub mod loader;
pub mod registry;
pub mod server;
pub mod state;
pub mod telemetry;
pub mod text;

pub use config::Config;
pub use server::{start, Running};
