//! One collection in memory: its documents, and their vectors in one dense row-major matrix so a
//! search is a scan of contiguous memory. Deletes move the last row into the hole, so the matrix
//! never has gaps. Readers (searches) and the single writer (the commit thread) share it through
//! a read-write lock: a search sees every write applied before it started.
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use crate::search::{self, Hit, Query};
use crate::types::{CollectionSpec, Document, Op};

/// A document's fields other than its vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: String,
    pub title: String,
    pub text: String,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Default)]
pub(crate) struct Rows {
    pub(crate) entries: Vec<Arc<Entry>>,
    pub(crate) vectors: Vec<f32>,
    pub(crate) index: HashMap<String, usize>,
}

impl Rows {
    /// Row `r` as a whole document (its vector copied out of the matrix).
    fn document(&self, r: usize, d: usize) -> Document {
        let e = &self.entries[r];
        Document {
            id: e.id.clone(),
            title: e.title.clone(),
            text: e.text.clone(),
            metadata: e.metadata.clone(),
            vector: self.vectors[r * d..(r + 1) * d].to_vec(),
        }
    }
}

pub struct Collection {
    spec: RwLock<CollectionSpec>,
    dim: usize,
    rows: RwLock<Rows>,
}

/// Figures a caller may show.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectionStats {
    pub spec: CollectionSpec,
    pub documents: usize,
    pub vector_bytes: usize,
}

impl Collection {
    pub fn new(spec: CollectionSpec) -> Self {
        let dim = spec.dimension as usize;
        Self { spec: RwLock::new(spec), dim, rows: RwLock::new(Rows::default()) }
    }

    pub fn spec(&self) -> CollectionSpec {
        self.spec.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn dimension(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn stats(&self) -> CollectionStats {
        let rows = self.read();
        CollectionStats { spec: self.spec(), documents: rows.entries.len(), vector_bytes: rows.vectors.len() * 4 }
    }

    fn read(&self) -> RwLockReadGuard<'_, Rows> {
        self.rows.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The stored document with this id.
    pub fn get(&self, id: &str) -> Option<Document> {
        let rows = self.read();
        rows.index.get(id).map(|&r| rows.document(r, self.dim))
    }

    /// Inserts or replaces documents (vectors already validated and normalised).
    pub(crate) fn upsert(&self, documents: Vec<Document>) {
        let d = self.dim;
        let mut rows = self.rows.write().unwrap_or_else(|e| e.into_inner());
        let rows = &mut *rows;
        for doc in documents {
            debug_assert_eq!(doc.vector.len(), d);
            let entry = Arc::new(Entry { id: doc.id, title: doc.title, text: doc.text, metadata: doc.metadata });
            match rows.index.get(&entry.id) {
                Some(&r) => {
                    rows.vectors[r * d..(r + 1) * d].copy_from_slice(&doc.vector);
                    rows.entries[r] = entry;
                }
                None => {
                    rows.index.insert(entry.id.clone(), rows.entries.len());
                    rows.entries.push(entry);
                    rows.vectors.extend_from_slice(&doc.vector);
                }
            }
        }
    }

    /// Removes documents by id; returns how many were there.
    pub(crate) fn delete(&self, ids: &[String]) -> usize {
        let d = self.dim;
        let mut rows = self.rows.write().unwrap_or_else(|e| e.into_inner());
        let rows = &mut *rows;
        let mut removed = 0;
        for id in ids {
            let Some(r) = rows.index.remove(id) else { continue };
            removed += 1;
            let last = rows.entries.len() - 1;
            if r != last {
                rows.vectors.copy_within(last * d..(last + 1) * d, r * d);
                rows.entries.swap(r, last);
                rows.index.insert(rows.entries[r].id.clone(), r);
            }
            rows.entries.pop();
            rows.vectors.truncate(last * d);
        }
        if rows.vectors.capacity() > 2 * rows.vectors.len() + 1024 * d {
            rows.vectors.shrink_to(rows.vectors.len() + rows.vectors.len() / 4);
        }
        removed
    }

    pub(crate) fn set_min_score(&self, min_score: Option<f32>) {
        self.spec.write().unwrap_or_else(|e| e.into_inner()).min_score = min_score;
    }

    /// Exact top-k for each query (vectors already of this collection's dimension, normalised
    /// for cosine). A query without its own `min_score` uses the collection's default.
    pub fn search(&self, queries: &[&Query]) -> Vec<Vec<Hit>> {
        let default_min = self.spec.read().unwrap_or_else(|e| e.into_inner()).min_score;
        let rows = self.read();
        search::top_k(&rows, self.dim, queries, default_min)
    }

    /// The ops that recreate this collection on an empty store: for snapshots.
    pub(crate) fn snapshot_ops(self: &Arc<Self>, chunk: usize) -> impl Iterator<Item = Op> + '_ {
        let spec = self.spec();
        let name = spec.name.clone();
        let total = self.len();
        std::iter::once(Op::CreateCollection(spec)).chain((0..total.div_ceil(chunk.max(1))).map(move |c| {
            let rows = self.read();
            let hi = ((c + 1) * chunk).min(rows.entries.len());
            let documents = (c * chunk..hi).map(|r| rows.document(r, self.dim)).collect();
            Op::Upsert { collection: name.clone(), documents }
        }))
    }
}
