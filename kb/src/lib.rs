//! The knowledge base: named collections of documents with vectors, searched by exact top-k
//! inner product, changed only through a checksummed write-ahead log with group commit,
//! snapshots and compaction.
pub mod calibrate;
pub mod codec;
pub mod collection;
pub mod search;
pub mod store;
pub mod types;
pub mod wal;

pub use collection::{Collection, CollectionStats, Entry};
pub use search::{Hit, Query};
pub use types::{CollectionSpec, Document, Metric, Op};
pub use wal::{Recovery, TornTail, Wal, WalError, WalOptions};
