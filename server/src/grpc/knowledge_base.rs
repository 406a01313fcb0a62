//! `concierge.v1.KnowledgeBase`: validates, embeds texts with the towers, and calls the store
//! through the [`VectorStore`](crate::kb::VectorStore) seam.
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use concierge_kb::store::Applied;
use concierge_kb::{CollectionSpec, CollectionStats, Document, Metric, Query};
use concierge_proto::v1 as pb;
use concierge_proto::v1::knowledge_base_server::KnowledgeBase;
use tonic::{Request, Response, Status};

use super::{deadline_of, observe_version, respond, routing_bucket, Routed};
use crate::error::ServiceError;
use crate::registry::SlotName;
use crate::state::AppState;

/// Longest document id, in bytes.
const MAX_ID_BYTES: usize = 256;
/// Hits returned when a search does not say.
const DEFAULT_TOP_K: u32 = 10;

pub struct KnowledgeBaseService {
    state: Arc<AppState>,
}

fn invalid(msg: impl Into<String>) -> ServiceError {
    ServiceError::InvalidArgument(msg.into())
}

fn check_name(name: &str) -> Result<(), ServiceError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else if name.is_empty() {
        Err(invalid("collection is empty; name the collection"))
    } else {
        Err(invalid(format!(
            "collection name {name:?} is not allowed; use 1 to 64 letters, digits, '_', '-' or '.'"
        )))
    }
}

fn check_score(what: &str, v: Option<f32>) -> Result<(), ServiceError> {
    match v {
        Some(x) if !x.is_finite() => Err(invalid(format!("{what} must be a finite number"))),
        _ => Ok(()),
    }
}

fn metric_from(m: i32) -> Result<Metric, ServiceError> {
    match pb::Metric::try_from(m) {
        Ok(pb::Metric::Unspecified | pb::Metric::Cosine) => Ok(Metric::Cosine),
        Ok(pb::Metric::DotProduct) => Ok(Metric::Dot),
        Err(_) => Err(invalid(format!("metric {m} is unknown; use METRIC_COSINE or METRIC_DOT_PRODUCT"))),
    }
}

fn info(s: CollectionStats) -> pb::CollectionInfo {
    pb::CollectionInfo {
        name: s.spec.name,
        dimension: s.spec.dimension,
        metric: match s.spec.metric {
            Metric::Cosine => pb::Metric::Cosine,
            Metric::Dot => pb::Metric::DotProduct,
        } as i32,
        min_score: s.spec.min_score,
        documents: s.documents as u64,
        vector_bytes: s.vector_bytes as u64,
        embedder: s.spec.embedder,
    }
}

fn model_info(m: &concierge_models::ModelInfo) -> pb::ModelInfo {
    pb::ModelInfo { id: m.id.clone(), version: m.version.clone() }
}

/// What the document tower embeds: the title, the text, then each named metadata attribute the
/// document has as a "key: value" line.
fn text_to_embed(d: &pb::Document, keys: &[String]) -> String {
    let mut parts: Vec<String> = [&d.title, &d.text].into_iter().filter(|s| !s.is_empty()).cloned().collect();
    parts.extend(keys.iter().filter_map(|k| d.metadata.get(k).map(|v| format!("{k}: {v}"))));
    parts.join("\n")
}

impl KnowledgeBaseService {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    async fn create(&self, req: Request<pb::CreateCollectionRequest>) -> Result<pb::CollectionInfo, ServiceError> {
        let msg = req.into_inner();
        check_name(&msg.name)?;
        check_score("min_score", msg.min_score)?;
        let metric = metric_from(msg.metric)?;
        let store = self.state.kb.get()?;
        let doc_model = self.state.registry.snapshot().tower_model(SlotName::DocumentTower, 0)?;
        let doc_info = doc_model.encoder.info();
        let dimension = if msg.dimension == 0 { doc_info.dimension as u32 } else { msg.dimension };
        let spec = CollectionSpec {
            name: msg.name,
            dimension,
            metric,
            min_score: msg.min_score,
            embedder: format!("{}@{}", doc_info.id, doc_info.version),
        };
        Ok(info(store.create_collection(spec).await?))
    }

    async fn drop_collection(&self, req: Request<pb::DropCollectionRequest>) -> Result<pb::DropCollectionResponse, ServiceError> {
        let msg = req.into_inner();
        check_name(&msg.name)?;
        self.state.kb.get()?.drop_collection(msg.name).await?;
        Ok(pb::DropCollectionResponse {})
    }

    fn validate_upsert(&self, msg: &pb::UpsertRequest) -> Result<(), ServiceError> {
        check_name(&msg.collection)?;
        let limit = self.state.config.kb_max_upsert_documents;
        if msg.documents.is_empty() {
            return Err(invalid("documents is empty; send at least one document"));
        }
        if msg.documents.len() > limit {
            return Err(invalid(format!(
                "{} documents in one upsert; the limit is {limit} (--kb-max-upsert-documents); split them over several calls",
                msg.documents.len()
            )));
        }
        let mut seen = HashSet::with_capacity(msg.documents.len());
        for (i, d) in msg.documents.iter().enumerate() {
            if d.id.is_empty() {
                return Err(invalid(format!("document {i} has no id; every document needs one")));
            }
            if d.id.len() > MAX_ID_BYTES {
                return Err(invalid(format!("document {i}'s id is {} bytes; the limit is {MAX_ID_BYTES}", d.id.len())));
            }
            if !seen.insert(d.id.as_str()) {
                return Err(invalid(format!("document id {:?} appears more than once in this upsert; send each id once", d.id)));
            }
            if d.vector.is_empty() && d.text.trim().is_empty() && d.title.trim().is_empty() {
                return Err(invalid(format!("document {i} ({:?}) has neither text nor a vector; give it text to embed", d.id)));
            }
            if d.vector.iter().any(|x| !x.is_finite()) {
                return Err(invalid(format!("document {i} ({:?}) has a NaN or infinite value in its vector", d.id)));
            }
            if d.metadata.keys().any(|k| k.is_empty()) {
                return Err(invalid(format!("document {i} ({:?}) has an empty metadata key", d.id)));
            }
        }
        Ok(())
    }

    async fn upsert(&self, req: Request<pb::UpsertRequest>, routed: &mut Routed) -> Result<pb::UpsertResponse, ServiceError> {
        let deadline = deadline_of(&req)?;
        let bucket = routing_bucket(&req);
        let msg = req.into_inner();
        self.validate_upsert(&msg)?;
        let store = self.state.kb.get()?;
        let dim = store.collection(&msg.collection)?.spec.dimension as usize;

        // Embed the documents that came without a vector, with the document tower.
        let texts: Vec<(usize, String)> = msg
            .documents
            .iter()
            .enumerate()
            .filter(|(_, d)| d.vector.is_empty())
            .map(|(i, d)| (i, text_to_embed(d, &msg.embed_metadata_keys)))
            .collect();
        let queue = self.state.config.max_queued_inputs;
        if texts.len() > queue {
            return Err(invalid(format!(
                "{} documents to embed in one upsert; this server queues at most {queue} texts (--max-queued-inputs); split them over several calls",
                texts.len()
            )));
        }
        let mut model = None;
        let mut embedded = Vec::new().into_iter();
        if !texts.is_empty() {
            let tower = &self.state.document_tower;
            let tower_model = self.state.registry.snapshot().tower_model(SlotName::DocumentTower, bucket)?;
            *routed = Some((SlotName::DocumentTower, tower_model.encoder.label.clone()));
            let tower_dim = tower_model.encoder.dimension;
            if tower_dim != dim {
                return Err(invalid(format!(
                    "collection {:?} holds vectors of dimension {dim} but the document tower embeds to {tower_dim}; send a vector with each document",
                    msg.collection
                )));
            }
            let (vectors, _, info) = tower.embed(tower_model, texts, false, msg.truncate.unwrap_or(false), deadline).await?;
            model = Some(model_info(&info));
            embedded = vectors.into_iter();
        }
        let mut documents = Vec::with_capacity(msg.documents.len());
        for (i, d) in msg.documents.into_iter().enumerate() {
            let vector = if d.vector.is_empty() {
                embedded.next().ok_or_else(|| ServiceError::Internal("fewer vectors than texts came back".into()))?
            } else {
                if d.vector.len() != dim {
                    return Err(invalid(format!(
                        "document {i} ({:?}) has a vector of dimension {}; collection {:?} holds dimension {dim}",
                        d.id,
                        d.vector.len(),
                        msg.collection
                    )));
                }
                d.vector
            };
            documents.push(Document {
                id: d.id,
                title: d.title,
                text: d.text,
                metadata: d.metadata.into_iter().collect::<BTreeMap<_, _>>(),
                vector,
            });
        }
        match store.upsert(msg.collection, documents).await? {
            Applied::Upserted { inserted, updated } => {
                Ok(pb::UpsertResponse { inserted: inserted as u32, updated: updated as u32, model })
            }
            other => Err(ServiceError::Internal(format!("upsert answered {other:?}"))),
        }
    }

    fn check_ids(&self, ids: &[String], what: &str) -> Result<(), ServiceError> {
        let limit = self.state.config.kb_max_upsert_documents;
        if ids.is_empty() {
            return Err(invalid(format!("ids is empty; name at least one document to {what}")));
        }
        if ids.len() > limit {
            return Err(invalid(format!("{} ids in one call; the limit is {limit}; split them over several calls", ids.len())));
        }
        if let Some(i) = ids.iter().position(|id| id.is_empty()) {
            return Err(invalid(format!("id {i} is empty")));
        }
        Ok(())
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<pb::GetResponse, ServiceError> {
        let msg = req.into_inner();
        check_name(&msg.collection)?;
        self.check_ids(&msg.ids, "get")?;
        let found = self.state.kb.get()?.get(&msg.collection, &msg.ids)?;
        let mut out = pb::GetResponse::default();
        for (id, doc) in msg.ids.into_iter().zip(found) {
            match doc {
                Some(d) => out.documents.push(pb::Document {
                    id: d.id,
                    text: d.text,
                    title: d.title,
                    metadata: d.metadata.into_iter().collect(),
                    vector: if msg.with_vectors { d.vector } else { Vec::new() },
                }),
                None => out.missing.push(id),
            }
        }
        Ok(out)
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<pb::DeleteResponse, ServiceError> {
        let msg = req.into_inner();
        check_name(&msg.collection)?;
        self.check_ids(&msg.ids, "delete")?;
        match self.state.kb.get()?.delete(msg.collection, msg.ids).await? {
            Applied::Deleted { deleted, missing } => Ok(pb::DeleteResponse { deleted: deleted as u32, missing: missing as u32 }),
            other => Err(ServiceError::Internal(format!("delete answered {other:?}"))),
        }
    }

    async fn search(&self, req: Request<pb::SearchRequest>, routed: &mut Routed) -> Result<pb::SearchResponse, ServiceError> {
        let deadline = deadline_of(&req)?;
        let bucket = routing_bucket(&req);
        let msg = req.into_inner();
        check_name(&msg.collection)?;
        let max_k = self.state.config.kb_max_top_k;
        let top_k = msg.top_k.unwrap_or(DEFAULT_TOP_K);
        if top_k == 0 || top_k as usize > max_k {
            return Err(invalid(format!("top_k is {top_k}; ask for 1 to {max_k} hits (--kb-max-top-k)")));
        }
        check_score("min_score", msg.min_score)?;
        if msg.filter.keys().any(|k| k.is_empty()) {
            return Err(invalid("the filter has an empty metadata key"));
        }
        let has_text = !msg.query.is_empty();
        match (has_text, msg.vector.is_empty()) {
            (true, false) => return Err(invalid("both query and vector are set; send one of them")),
            (false, true) => return Err(invalid("query is empty; send the question as query (or a vector)")),
            _ => {}
        }
        if has_text && msg.query.trim().is_empty() {
            return Err(invalid("query is only whitespace; send the question as query"));
        }
        let store = self.state.kb.get()?;
        let spec = store.collection(&msg.collection)?.spec;
        let dim = spec.dimension as usize;
        let (mut vector, model) = if has_text {
            let tower = &self.state.query_tower;
            let tower_model = self.state.registry.snapshot().tower_model(SlotName::QueryTower, bucket)?;
            *routed = Some((SlotName::QueryTower, tower_model.encoder.label.clone()));
            let (vectors, _, info) = tower.embed(tower_model, vec![(0, msg.query)], false, msg.truncate.unwrap_or(false), deadline).await?;
            let v = vectors.into_iter().next().ok_or_else(|| ServiceError::Internal("no query vector came back".into()))?;
            if v.len() != dim {
                return Err(invalid(format!(
                    "collection {:?} holds vectors of dimension {dim} but the query tower embeds to {}; search it with a vector",
                    msg.collection,
                    v.len()
                )));
            }
            (v, Some(model_info(&info)))
        } else {
            if msg.vector.len() != dim {
                return Err(invalid(format!(
                    "the query vector has dimension {}; collection {:?} holds dimension {dim}",
                    msg.vector.len(),
                    msg.collection
                )));
            }
            if msg.vector.iter().any(|x| !x.is_finite()) {
                return Err(invalid("the query vector has a NaN or infinite value"));
            }
            (msg.vector, None)
        };
        if spec.metric == Metric::Cosine && !concierge_kb::store::normalize(&mut vector) {
            return Err(invalid("the query vector is all zeros, which has no direction for cosine similarity"));
        }
        let query = Query {
            vector,
            top_k: top_k as usize,
            min_score: msg.min_score,
            filter: msg.filter.into_iter().collect(),
        };
        let hits = store.search(&msg.collection, query, deadline).await?;
        Ok(pb::SearchResponse {
            hits: hits
                .into_iter()
                .map(|h| pb::Hit {
                    id: h.entry.id.clone(),
                    score: h.score,
                    text: h.entry.text.clone(),
                    title: h.entry.title.clone(),
                    metadata: h.entry.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                })
                .collect(),
            model,
        })
    }

    async fn calibrate(&self, req: Request<pb::CalibrateThresholdRequest>) -> Result<pb::CalibrateThresholdResponse, ServiceError> {
        let deadline = deadline_of(&req)?;
        let bucket = routing_bucket(&req);
        let msg = req.into_inner();
        check_name(&msg.collection)?;
        let limit = self.state.config.kb_max_upsert_documents;
        if msg.pairs.is_empty() || msg.pairs.len() > limit {
            return Err(invalid(format!("send 1 to {limit} labelled pairs; got {}", msg.pairs.len())));
        }
        if let Some(i) = msg.pairs.iter().position(|p| p.query.trim().is_empty()) {
            return Err(invalid(format!("pair {i} has an empty query")));
        }
        if !msg.pairs.iter().any(|p| p.relevant) {
            return Err(invalid("no pair is marked relevant; a threshold needs relevant and irrelevant examples"));
        }
        let store = self.state.kb.get()?;
        let spec = store.collection(&msg.collection)?.spec;
        let ids: Vec<String> = msg.pairs.iter().map(|p| p.document_id.clone()).collect();
        let docs: Vec<Option<Vec<f32>>> = store.get(&msg.collection, &ids)?.into_iter().map(|d| d.map(|d| d.vector)).collect();
        if let Some(i) = docs.iter().position(|d| d.is_none()) {
            return Err(invalid(format!("pair {i}: document {:?} is not in collection {:?}", ids[i], msg.collection)));
        }
        let texts = msg.pairs.iter().enumerate().map(|(i, p)| (i, p.query.clone())).collect();
        let tower_model = self.state.registry.snapshot().tower_model(SlotName::QueryTower, bucket)?;
        let (vectors, _, _) = self.state.query_tower.embed(tower_model, texts, false, true, deadline).await?;
        let mut scored = Vec::with_capacity(msg.pairs.len());
        for ((mut q, doc), pair) in vectors.into_iter().zip(docs).zip(&msg.pairs) {
            let doc = doc.unwrap_or_default();
            if q.len() != doc.len() {
                return Err(invalid(format!(
                    "the query tower embeds to {} but collection {:?} holds dimension {}",
                    q.len(),
                    msg.collection,
                    doc.len()
                )));
            }
            if spec.metric == Metric::Cosine {
                concierge_kb::store::normalize(&mut q);
            }
            scored.push((concierge_kernels::dot::dot(&q, &doc), pair.relevant));
        }
        let c = concierge_kb::calibrate::calibrate(&scored)
            .ok_or_else(|| invalid("no threshold can be chosen from these pairs"))?;
        if !msg.dry_run {
            store.set_min_score(msg.collection, Some(c.min_score)).await?;
        }
        Ok(pb::CalibrateThresholdResponse {
            min_score: c.min_score,
            precision: c.precision,
            recall: c.recall,
            f1: c.f1,
            pairs: scored.len() as u32,
        })
    }
}

#[tonic::async_trait]
impl KnowledgeBase for KnowledgeBaseService {
    async fn create_collection(&self, req: Request<pb::CreateCollectionRequest>) -> Result<Response<pb::CollectionInfo>, Status> {
        let start = Instant::now();
        respond("CreateCollection", start, self.create(req).await)
    }

    async fn drop_collection(&self, req: Request<pb::DropCollectionRequest>) -> Result<Response<pb::DropCollectionResponse>, Status> {
        let start = Instant::now();
        respond("DropCollection", start, self.drop_collection(req).await)
    }

    async fn upsert(&self, req: Request<pb::UpsertRequest>) -> Result<Response<pb::UpsertResponse>, Status> {
        let start = Instant::now();
        let mut routed = None;
        let result = respond("Upsert", start, self.upsert(req, &mut routed).await);
        observe_version(routed, start, &result);
        result
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let start = Instant::now();
        respond("Get", start, self.get(req).await)
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let start = Instant::now();
        respond("Delete", start, self.delete(req).await)
    }

    async fn search(&self, req: Request<pb::SearchRequest>) -> Result<Response<pb::SearchResponse>, Status> {
        let start = Instant::now();
        let mut routed = None;
        let result = respond("Search", start, self.search(req, &mut routed).await);
        observe_version(routed, start, &result);
        result
    }

    async fn calibrate_threshold(&self, req: Request<pb::CalibrateThresholdRequest>) -> Result<Response<pb::CalibrateThresholdResponse>, Status> {
        let start = Instant::now();
        respond("CalibrateThreshold", start, self.calibrate(req).await)
    }

    async fn list_collections(
        &self,
        _: Request<pb::ListCollectionsRequest>,
    ) -> Result<Response<pb::ListCollectionsResponse>, Status> {
        let store = self.state.kb.get().map_err(Status::from)?;
        Ok(Response::new(pb::ListCollectionsResponse { collections: store.list_collections().into_iter().map(info).collect() }))
    }

    async fn get_collection(&self, req: Request<pb::GetCollectionRequest>) -> Result<Response<pb::CollectionInfo>, Status> {
        let name = req.into_inner().name;
        check_name(&name).map_err(Status::from)?;
        let store = self.state.kb.get().map_err(Status::from)?;
        Ok(Response::new(info(store.collection(&name).map_err(Status::from)?)))
    }
}
