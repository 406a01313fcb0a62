//! The store: every collection, and the one thread that changes them. Writers hand an [`Op`] to
//! the commit thread; it takes every op waiting (group commit), checks each against the state
//! as the ops before it leave it, appends the accepted ones to the log with one fsync, applies
//! them to memory in log order and only then answers. So an answered write is durable and
//! visible to every search that starts after the answer, and memory is always a replay of the
//! log. Snapshots are taken on the same thread once the log has grown past a size.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::collection::Collection;
use crate::types::{CollectionSpec, Metric, Op};
use crate::wal::{Recovery, Wal, WalOptions};

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum KbError {
    #[error("collection \"{0}\" does not exist; create it first (or check the name)")]
    NotFound(String),
    #[error("collection \"{0}\" already exists; drop it first to change its settings")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// The log cannot be written: nothing more is accepted until a restart.
    #[error("the knowledge base cannot write its log: {0}")]
    Storage(String),
    #[error("the knowledge base is shutting down; retry on another replica")]
    ShuttingDown,
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Created,
    Dropped,
    Upserted { inserted: usize, updated: usize },
    Deleted { deleted: usize, missing: usize },
    MinScoreSet,
}

pub struct StoreOptions {
    /// Take a snapshot (and drop the log before it) once this many log bytes follow the last.
    pub snapshot_after_bytes: u64,
    /// Most documents (an upsert counts its documents, other ops 1) in one group commit, so one
    /// fsync never waits on an unbounded write.
    pub max_group: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { snapshot_after_bytes: 256 << 20, max_group: 4096 }
    }
}

type Done = Box<dyn FnOnce(Result<Applied, KbError>) + Send>;

struct Pending {
    op: Op,
    done: Done,
}

#[derive(Default)]
struct State {
    collections: RwLock<BTreeMap<String, Arc<Collection>>>,
    /// Set when the log failed: why.
    broken: Mutex<Option<String>>,
}

pub struct Store {
    state: Arc<State>,
    tx: Mutex<Option<mpsc::Sender<Pending>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Store {
    /// Opens (or creates) the store in `dir`, recovering everything the log holds.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<(Self, Recovery), KbError> {
        let state = Arc::new(State::default());
        let mut replay_error = None;
        let (wal, recovery) = Wal::open(dir, WalOptions::default(), |lsn, op| {
            if replay_error.is_none() {
                if let Err(e) = apply(&state, op) {
                    replay_error = Some(format!("log record {lsn} cannot be applied: {e}"));
                }
            }
        })
        .map_err(|e| KbError::Storage(e.to_string()))?;
        if let Some(e) = replay_error {
            return Err(KbError::Storage(format!("{}: {e}", dir.display())));
        }
        let (tx, rx) = mpsc::channel();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("concierge-kb-commit".into())
            .spawn(move || commit_loop(st, wal, rx, opts))
            .map_err(|e| KbError::Storage(format!("cannot start the commit thread: {e}")))?;
        Ok((Self { state, tx: Mutex::new(Some(tx)), thread: Mutex::new(Some(thread)) }, recovery))
    }

    pub fn collection(&self, name: &str) -> Result<Arc<Collection>, KbError> {
        self.state.collections.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned().ok_or_else(|| KbError::NotFound(name.to_owned()))
    }

    pub fn collections(&self) -> Vec<Arc<Collection>> {
        self.state.collections.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// Queues a write; `done` is called on the commit thread once it is durable and applied
    /// (or refused). Never blocks on the disk.
    pub fn submit(&self, op: Op, done: impl FnOnce(Result<Applied, KbError>) + Send + 'static) {
        if let Some(why) = self.state.broken.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return done(Err(KbError::Storage(why)));
        }
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let pending = Pending { op, done: Box::new(done) };
        match tx {
            Some(tx) => {
                if let Err(mpsc::SendError(p)) = tx.send(pending) {
                    (p.done)(Err(KbError::ShuttingDown));
                }
            }
            None => (pending.done)(Err(KbError::ShuttingDown)),
        }
    }

    /// [`Store::submit`], waiting for the answer.
    pub fn write(&self, op: Op) -> Result<Applied, KbError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(op, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or(Err(KbError::ShuttingDown))
    }

    /// Stops taking writes, commits everything already queued and stops the commit thread.
    pub fn shutdown(&self) {
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A collection as the ops already accepted in this group leave it.
type Overlay = HashMap<String, Option<(usize, Metric)>>;

fn lookup(state: &State, overlay: &Overlay, name: &str) -> Option<(usize, Metric)> {
    match overlay.get(name) {
        Some(v) => *v,
        None => state.collections.read().unwrap_or_else(|e| e.into_inner()).get(name).map(|c| {
            let spec = c.spec();
            (spec.dimension as usize, spec.metric)
        }),
    }
}

/// Checks an op against the state it will meet and puts it in stored form (cosine vectors
/// normalised). A refused op changes nothing.
fn check(state: &State, overlay: &mut Overlay, op: Op) -> Result<Op, KbError> {
    let exists = |overlay: &Overlay, name: &str| lookup(state, overlay, name).ok_or_else(|| KbError::NotFound(name.to_owned()));
    match op {
        Op::CreateCollection(spec) => {
            if lookup(state, overlay, &spec.name).is_some() {
                return Err(KbError::AlreadyExists(spec.name));
            }
            if spec.dimension == 0 || spec.dimension > 65_536 {
                return Err(KbError::InvalidArgument(format!("dimension {} is out of range; use 1 to 65536", spec.dimension)));
            }
            check_score("min_score", spec.min_score)?;
            overlay.insert(spec.name.clone(), Some((spec.dimension as usize, spec.metric)));
            Ok(Op::CreateCollection(spec))
        }
        Op::DropCollection { name } => {
            exists(overlay, &name)?;
            overlay.insert(name.clone(), None);
            Ok(Op::DropCollection { name })
        }
        Op::Upsert { collection, mut documents } => {
            let (dim, metric) = exists(overlay, &collection)?;
            let mut seen = HashSet::with_capacity(documents.len());
            for (i, doc) in documents.iter_mut().enumerate() {
                if !seen.insert(doc.id.as_str()) {
                    return Err(KbError::InvalidArgument(format!("document id \"{}\" appears more than once in this upsert; send each id once", doc.id)));
                }
                if doc.vector.len() != dim {
                    return Err(KbError::InvalidArgument(format!(
                        "document {i} (\"{}\") has a vector of dimension {}; collection \"{collection}\" holds dimension {dim}",
                        doc.id,
                        doc.vector.len()
                    )));
                }
                if doc.vector.iter().any(|x| !x.is_finite()) {
                    return Err(KbError::InvalidArgument(format!("document {i} (\"{}\") has a NaN or infinite value in its vector", doc.id)));
                }
                if metric == Metric::Cosine && !normalize(&mut doc.vector) {
                    return Err(KbError::InvalidArgument(format!(
                        "document {i} (\"{}\") has an all-zero vector, which has no direction for cosine similarity",
                        doc.id
                    )));
                }
            }
            Ok(Op::Upsert { collection, documents })
        }
        Op::Delete { collection, ids } => {
            exists(overlay, &collection)?;
            Ok(Op::Delete { collection, ids })
        }
        Op::SetMinScore { collection, min_score } => {
            exists(overlay, &collection)?;
            check_score("min_score", min_score)?;
            Ok(Op::SetMinScore { collection, min_score })
        }
    }
}

fn check_score(what: &str, v: Option<f32>) -> Result<(), KbError> {
    match v {
        Some(x) if !x.is_finite() => Err(KbError::InvalidArgument(format!("{what} must be a finite number"))),
        _ => Ok(()),
    }
}

/// Scales `v` to unit length; false for the zero vector.
pub fn normalize(v: &mut [f32]) -> bool {
    let norm = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return false;
    }
    let inv = (1.0 / norm) as f32;
    v.iter_mut().for_each(|x| *x *= inv);
    true
}

/// Applies a checked (or replayed) op to memory.
fn apply(state: &State, op: Op) -> Result<Applied, KbError> {
    let get = |name: &str| {
        state.collections.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned().ok_or_else(|| KbError::NotFound(name.to_owned()))
    };
    match op {
        Op::CreateCollection(spec) => {
            let mut all = state.collections.write().unwrap_or_else(|e| e.into_inner());
            if all.contains_key(&spec.name) {
                return Err(KbError::AlreadyExists(spec.name));
            }
            record_collection(&spec, 0);
            all.insert(spec.name.clone(), Arc::new(Collection::new(spec)));
            Ok(Applied::Created)
        }
        Op::DropCollection { name } => {
            let removed = state.collections.write().unwrap_or_else(|e| e.into_inner()).remove(&name);
            match removed {
                Some(_) => {
                    metrics::gauge!("concierge_kb_documents", "collection" => name).set(0.0);
                    Ok(Applied::Dropped)
                }
                None => Err(KbError::NotFound(name)),
            }
        }
        Op::Upsert { collection, documents } => {
            let c = get(&collection)?;
            if let Some(doc) = documents.iter().find(|d| d.vector.len() != c.dimension()) {
                return Err(KbError::InvalidArgument(format!("document \"{}\" has the wrong dimension", doc.id)));
            }
            let before = c.len();
            let total = documents.len();
            c.upsert(documents);
            let inserted = c.len() - before;
            record_collection(&c.spec(), c.len());
            Ok(Applied::Upserted { inserted, updated: total - inserted })
        }
        Op::Delete { collection, ids } => {
            let c = get(&collection)?;
            let deleted = c.delete(&ids);
            record_collection(&c.spec(), c.len());
            Ok(Applied::Deleted { deleted, missing: ids.len() - deleted })
        }
        Op::SetMinScore { collection, min_score } => {
            get(&collection)?.set_min_score(min_score);
            Ok(Applied::MinScoreSet)
        }
    }
}

fn record_collection(spec: &CollectionSpec, documents: usize) {
    metrics::gauge!("concierge_kb_documents", "collection" => spec.name.clone()).set(documents as f64);
}

fn commit_loop(state: Arc<State>, mut wal: Wal, rx: mpsc::Receiver<Pending>, opts: StoreOptions) {
    let weight = |op: &Op| match op {
        Op::Upsert { documents, .. } => documents.len().max(1),
        _ => 1,
    };
    // After a failed snapshot, the next try waits for another quarter of the threshold.
    let mut snapshot_at = opts.snapshot_after_bytes;
    while let Ok(first) = rx.recv() {
        let mut size = weight(&first.op);
        let mut group = vec![first];
        while size < opts.max_group {
            match rx.try_recv() {
                Ok(p) => {
                    size += weight(&p.op);
                    group.push(p);
                }
                Err(_) => break,
            }
        }
        if let Some(why) = state.broken.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            group.into_iter().for_each(|p| (p.done)(Err(KbError::Storage(why.clone()))));
            continue;
        }
        let mut overlay = Overlay::new();
        let mut ops = Vec::with_capacity(group.len());
        let mut waiting = Vec::with_capacity(group.len());
        for p in group {
            match check(&state, &mut overlay, p.op) {
                Ok(op) => {
                    ops.push(op);
                    waiting.push(p.done);
                }
                Err(e) => (p.done)(Err(e)),
            }
        }
        if ops.is_empty() {
            continue;
        }
        let t0 = Instant::now();
        if let Err(e) = wal.append(&ops) {
            let why = format!("{e}; writes are refused until the server is restarted (check the disk)");
            tracing::error!(error = %e, "knowledge-base log append failed");
            *state.broken.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
            waiting.into_iter().for_each(|done| done(Err(KbError::Storage(why.clone()))));
            continue;
        }
        metrics::histogram!("concierge_kb_commit_seconds").record(t0.elapsed().as_secs_f64());
        metrics::histogram!("concierge_kb_commit_group_size").record(ops.len() as f64);
        for (op, done) in ops.into_iter().zip(waiting) {
            let result = apply(&state, op);
            if let Err(e) = &result {
                // The check above makes this unreachable; if it is reached, memory and log disagree.
                tracing::error!(error = %e, "a logged op could not be applied");
            }
            done(result);
        }
        if wal.bytes_since_snapshot() >= snapshot_at {
            snapshot_at = if take_snapshot(&state, &mut wal) {
                opts.snapshot_after_bytes
            } else {
                wal.bytes_since_snapshot() + (opts.snapshot_after_bytes / 4).max(1)
            };
        }
    }
}

/// Writes a snapshot; false when it failed (the log is kept, so nothing is lost).
fn take_snapshot(state: &State, wal: &mut Wal) -> bool {
    let t0 = Instant::now();
    let collections: Vec<Arc<Collection>> = state.collections.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
    let ops = collections.iter().flat_map(|c| c.snapshot_ops(1024));
    match wal.snapshot(ops) {
        Ok(()) => {
            metrics::histogram!("concierge_kb_snapshot_seconds").record(t0.elapsed().as_secs_f64());
            tracing::info!(lsn = wal.last_lsn(), secs = t0.elapsed().as_secs_f64(), "knowledge-base snapshot written; older log removed");
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "knowledge-base snapshot failed; the log is kept and replayed instead");
            false
        }
    }
}
