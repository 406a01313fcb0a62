//! What the knowledge base stores and the operations that change it. Every change is one
//! [`Op`]: it is written to the log as one record, so a change is applied whole or not at all.
use std::collections::BTreeMap;

/// How scores are computed. Cosine normalises stored vectors and queries to unit length, so the
/// score is the inner product of unit vectors; `Dot` keeps vectors as given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Cosine,
    Dot,
}

/// A collection's settings, fixed at creation (except `min_score`, see [`Op::SetMinScore`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CollectionSpec {
    pub name: String,
    pub dimension: u32,
    pub metric: Metric,
    /// Hits scoring below this are left out unless a search gives its own `min_score`.
    pub min_score: Option<f32>,
    /// Which document tower embedded its texts (`id@version`), for the record.
    pub embedder: String,
}

/// One entry of a collection. `vector` is as stored (already normalised for cosine).
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub id: String,
    pub title: String,
    pub text: String,
    pub metadata: BTreeMap<String, String>,
    pub vector: Vec<f32>,
}

/// A change to the knowledge base.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    CreateCollection(CollectionSpec),
    DropCollection { name: String },
    /// Inserts or replaces documents by id.
    Upsert { collection: String, documents: Vec<Document> },
    /// Removes documents by id; ids not present are ignored.
    Delete { collection: String, ids: Vec<String> },
    SetMinScore { collection: String, min_score: Option<f32> },
}

impl Op {
    pub fn collection(&self) -> &str {
        match self {
            Op::CreateCollection(spec) => &spec.name,
            Op::DropCollection { name } => name,
            Op::Upsert { collection, .. } | Op::Delete { collection, .. } | Op::SetMinScore { collection, .. } => collection,
        }
    }
}
