//! The knowledge base behind the gRPC service. [`VectorStore`] is the seam: the service embeds
//! texts with the towers and calls a store through this trait alone. [`LocalStore`] is the
//! in-process store (`concierge-kb`: vectors in memory, write-ahead log on local disk, searches
//! batched on their own engine lane). A deployment that outgrows one node implements the trait
//! over a distributed vector database (Qdrant, Milvus) instead; see the README.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use concierge_engine::{Backend, BatchLimits, Engine};
use concierge_kb::store::{Applied, KbError, Store};
use concierge_kb::{Collection, CollectionSpec, CollectionStats, Document, Hit, Op, Query};
use tokio::sync::oneshot;

use crate::error::ServiceError;
use crate::grpc::with_deadline;

#[tonic::async_trait]
pub trait VectorStore: Send + Sync + 'static {
    async fn create_collection(&self, spec: CollectionSpec) -> Result<CollectionStats, ServiceError>;
    async fn drop_collection(&self, name: String) -> Result<(), ServiceError>;
    fn list_collections(&self) -> Vec<CollectionStats>;
    fn collection(&self, name: &str) -> Result<CollectionStats, ServiceError>;
    /// Durable and visible to later searches when it returns.
    async fn upsert(&self, collection: String, documents: Vec<Document>) -> Result<Applied, ServiceError>;
    async fn delete(&self, collection: String, ids: Vec<String>) -> Result<Applied, ServiceError>;
    async fn set_min_score(&self, collection: String, min_score: Option<f32>) -> Result<(), ServiceError>;
    /// Exact top-k; `query.vector` has the collection's dimension.
    async fn search(&self, collection: &str, query: Query, deadline: Option<Instant>) -> Result<Vec<Hit>, ServiceError>;
    /// The stored documents of `ids` (None where an id is not there).
    fn get(&self, collection: &str, ids: &[String]) -> Result<Vec<Option<Document>>, ServiceError>;
    /// Finishes queued writes; called once the gRPC server has drained.
    fn shutdown(&self);
}

impl From<KbError> for ServiceError {
    fn from(e: KbError) -> Self {
        match e {
            KbError::NotFound(_) => ServiceError::NotFound(e.to_string()),
            KbError::AlreadyExists(_) => ServiceError::AlreadyExists(e.to_string()),
            KbError::InvalidArgument(_) => ServiceError::InvalidArgument(e.to_string()),
            KbError::Storage(_) | KbError::ShuttingDown => ServiceError::Unavailable(e.to_string()),
        }
    }
}

/// One search waiting for the device, with the collection it was resolved against.
pub struct SearchJob {
    collection: Arc<Collection>,
    query: Query,
}

/// The search lane's backend: a batch's queries against the same collection are scanned
/// together (one pass over its rows).
pub struct SearchLane;

impl Backend for SearchLane {
    type Input = SearchJob;
    type Output = Vec<Hit>;

    fn cost(&self, _: &SearchJob) -> usize {
        1
    }

    fn run(&self, batch: &[&SearchJob]) -> Result<Vec<Vec<Hit>>, String> {
        let mut groups: HashMap<*const Collection, Vec<usize>> = HashMap::new();
        for (i, job) in batch.iter().enumerate() {
            groups.entry(Arc::as_ptr(&job.collection)).or_default().push(i);
        }
        let mut out = vec![Vec::new(); batch.len()];
        for members in groups.values() {
            let queries: Vec<&Query> = members.iter().map(|&i| &batch[i].query).collect();
            let hits = batch[members[0]].collection.search(&queries);
            for (&i, h) in members.iter().zip(hits) {
                out[i] = h;
            }
        }
        Ok(out)
    }
}

pub struct LocalStore {
    store: Store,
    lane: Arc<SearchLane>,
    engine: Engine<SearchLane>,
}

impl LocalStore {
    pub fn new(store: Store, limits: BatchLimits) -> std::io::Result<Self> {
        Ok(Self { store, lane: Arc::new(SearchLane), engine: Engine::start("search", limits)? })
    }

    /// Searches queued now (for tests).
    pub fn queued_searches(&self) -> usize {
        self.engine.queued()
    }

    async fn write(&self, op: Op) -> Result<Applied, ServiceError> {
        let (tx, rx) = oneshot::channel();
        self.store.submit(op, move |r| {
            let _ = tx.send(r);
        });
        Ok(rx.await.map_err(|_| ServiceError::Unavailable("the knowledge base stopped before answering".into()))??)
    }
}

#[tonic::async_trait]
impl VectorStore for LocalStore {
    async fn create_collection(&self, spec: CollectionSpec) -> Result<CollectionStats, ServiceError> {
        let name = spec.name.clone();
        self.write(Op::CreateCollection(spec)).await?;
        Ok(self.store.collection(&name)?.stats())
    }

    async fn drop_collection(&self, name: String) -> Result<(), ServiceError> {
        self.write(Op::DropCollection { name }).await.map(|_| ())
    }

    fn list_collections(&self) -> Vec<CollectionStats> {
        self.store.collections().iter().map(|c| c.stats()).collect()
    }

    fn collection(&self, name: &str) -> Result<CollectionStats, ServiceError> {
        Ok(self.store.collection(name)?.stats())
    }

    async fn upsert(&self, collection: String, documents: Vec<Document>) -> Result<Applied, ServiceError> {
        self.write(Op::Upsert { collection, documents }).await
    }

    async fn delete(&self, collection: String, ids: Vec<String>) -> Result<Applied, ServiceError> {
        self.write(Op::Delete { collection, ids }).await
    }

    async fn set_min_score(&self, collection: String, min_score: Option<f32>) -> Result<(), ServiceError> {
        self.write(Op::SetMinScore { collection, min_score }).await.map(|_| ())
    }

    async fn search(&self, collection: &str, query: Query, deadline: Option<Instant>) -> Result<Vec<Hit>, ServiceError> {
        let collection = self.store.collection(collection)?;
        let mut pending = self.engine.submit(&self.lane, vec![SearchJob { collection, query }], deadline)?;
        let p = pending.pop().ok_or_else(|| ServiceError::Internal("the search lane returned no reply".into()))?;
        with_deadline(deadline, async move {
            Ok(p.await.map_err(|_| ServiceError::Internal("the search lane dropped a search unanswered".into()))??)
        })
        .await
    }

    fn get(&self, collection: &str, ids: &[String]) -> Result<Vec<Option<Document>>, ServiceError> {
        let c = self.store.collection(collection)?;
        Ok(ids.iter().map(|id| c.get(id)).collect())
    }

    fn shutdown(&self) {
        self.engine.shutdown();
        self.store.shutdown();
    }
}
