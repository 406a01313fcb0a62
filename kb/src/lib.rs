//! The knowledge base: named collections of documents with vectors, searched by exact top-k
//! inner product, changed only through a checksummed write-ahead log with group commit,
//! snapshots and compaction.
pub mod codec;
pub mod types;
pub mod wal;

pub use types::{CollectionSpec, Document, Metric, Op};
pub use wal::{Recovery, TornTail, Wal, WalError, WalOptions};
