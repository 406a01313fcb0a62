//! The model registry: every model the server runs is a named slot holding an active version
//! and optionally a candidate that answers a share of the slot's calls (a canary), plus the
//! version the last promotion replaced, kept for an instant rollback.
//!
//! Readers take a [`Snapshot`] (an `Arc`) when a request starts and route on it; a request then
//! keeps the `Arc`s of the versions it runs on to its end, so a promotion or rollback never
//! disturbs work in flight, and a version is freed when the last request using it ends. Changes
//! build a new snapshot and publish it under one lock, so the slots change together: a text
//! encoder is promoted with the head candidates trained on its states.
//!
//! Routing is by bucket: 10 000 buckets, a caller's routing key hashed to one of them (no key: a
//! random one). A slot's candidate answers the buckets below its share, so one key always sees
//! the same version and a key in one slot's canary cohort is in every slot's cohort.
use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use concierge_models::tagger::InputKind;
use concierge_models::{BiLstmCrf, ImageEncoder, ModelInfo, TextEncoder};

use crate::entities::CharTagger;
use crate::error::ServiceError;
use crate::text::{IntentHead, Tasks, TextModel};

/// Buckets a share is counted in: 1 bucket = 0.01% of the traffic.
pub const BUCKETS: u32 = 10_000;

/// A slot's name, as the admin API and metrics spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlotName {
    TextEncoder,
    ImageEncoder,
    Intent,
    Tagger,
    QueryTower,
    DocumentTower,
}

impl SlotName {
    pub const ALL: [SlotName; 6] = [
        SlotName::TextEncoder,
        SlotName::ImageEncoder,
        SlotName::Intent,
        SlotName::Tagger,
        SlotName::QueryTower,
        SlotName::DocumentTower,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SlotName::TextEncoder => "text-encoder",
            SlotName::ImageEncoder => "image-encoder",
            SlotName::Intent => "intent",
            SlotName::Tagger => "tagger",
            SlotName::QueryTower => "query-tower",
            SlotName::DocumentTower => "document-tower",
        }
    }

    pub fn parse(s: &str) -> Result<SlotName, ServiceError> {
        SlotName::ALL.into_iter().find(|n| n.as_str() == s.trim()).ok_or_else(|| {
            let names: Vec<&str> = SlotName::ALL.iter().map(|n| n.as_str()).collect();
            ServiceError::InvalidArgument(format!("no model slot is called {s:?}; the slots are {}", names.join(", ")))
        })
    }
}

impl std::fmt::Display for SlotName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One loaded checkpoint of a slot.
pub struct Version<T> {
    /// The operator's label, unique within the slot; stamped on every answer.
    pub label: String,
    /// The checkpoint's id (folder name or Hub repo id).
    pub id: String,
    /// Where it came from, for `List`.
    pub source: String,
    /// The weights' content hash or Hub commit: what a head trained on an encoder names.
    pub weights: String,
    /// Embedding width, or label/tag count for heads.
    pub dimension: usize,
    pub loaded_at: SystemTime,
    /// The model itself (the version derefs to it).
    pub loaded: T,
}

impl<T> Deref for Version<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.loaded
    }
}

impl<T> Version<T> {
    /// A version built in code (benches, tests), labelled with its weights' hash.
    pub fn wrap(id: &str, weights: &str, dimension: usize, loaded: T) -> Arc<Self> {
        Arc::new(Self {
            label: weights.into(),
            id: id.into(),
            source: "(built in code)".into(),
            weights: weights.into(),
            dimension,
            loaded_at: SystemTime::now(),
            loaded,
        })
    }

    /// The identity answers carry: the checkpoint's id and this version's label.
    pub fn info(&self) -> ModelInfo {
        ModelInfo { id: self.id.clone(), version: self.label.clone(), dimension: self.dimension, max_input_tokens: 0 }
    }
}

/// An entity tagger with what it was trained on.
pub struct Tagger {
    pub model: BiLstmCrf,
    /// For a tagger over encoder states: the encoder's weights it was trained on (None: it does
    /// not say; it is taken to read any encoder of its width).
    pub reads: Option<String>,
}

impl Tagger {
    pub fn over_encoder(&self) -> bool {
        self.model.config().input == InputKind::Encoder
    }
}

/// Whether a head that reads `reads` can run on `encoder`'s states.
pub fn reads_encoder(reads: &Option<String>, encoder: &Version<TextEncoder>) -> bool {
    reads.as_ref().is_none_or(|w| *w == encoder.weights)
}

/// A slot's versions.
pub struct SlotState<T> {
    pub active: Option<Arc<Version<T>>>,
    pub candidate: Option<Arc<Version<T>>>,
    /// The candidate's share, in buckets (0..=BUCKETS).
    pub share: u32,
    /// The version the last promotion replaced, for Rollback.
    pub previous: Option<Arc<Version<T>>>,
}

impl<T> Clone for SlotState<T> {
    fn clone(&self) -> Self {
        Self { active: self.active.clone(), candidate: self.candidate.clone(), share: self.share, previous: self.previous.clone() }
    }
}

impl<T> Default for SlotState<T> {
    fn default() -> Self {
        Self { active: None, candidate: None, share: 0, previous: None }
    }
}

impl<T> SlotState<T> {
    /// The version that answers `bucket`: the candidate below its share, else the active one.
    pub fn pick(&self, bucket: u32) -> Option<&Arc<Version<T>>> {
        match &self.candidate {
            Some(c) if bucket < self.share => Some(c),
            _ => self.active.as_ref().or(self.candidate.as_ref().filter(|_| self.share > 0)),
        }
    }

    /// The version `bucket` prefers, then the other one: a request falls back to the other when
    /// its preferred version cannot serve it (a head trained on the other encoder).
    pub fn ordered(&self, bucket: u32) -> Vec<&Arc<Version<T>>> {
        let mut out: Vec<&Arc<Version<T>>> = Vec::with_capacity(2);
        if let Some(p) = self.pick(bucket) {
            out.push(p);
        }
        for v in [&self.active, &self.candidate].into_iter().flatten() {
            if !out.iter().any(|o| Arc::ptr_eq(o, v)) && (self.active.as_ref().is_some_and(|a| Arc::ptr_eq(a, v)) || self.share > 0) {
                out.push(v);
            }
        }
        out
    }

    /// Every version held (for label uniqueness and links).
    pub fn held(&self) -> impl Iterator<Item = &Arc<Version<T>>> {
        [&self.active, &self.candidate, &self.previous].into_iter().flatten()
    }

    /// Whether `label` names a version the slot holds.
    pub fn has_label(&self, label: &str) -> bool {
        self.held().any(|v| v.label == label)
    }
}

/// All slots at one moment. Requests route on it; the admin API replaces it.
#[derive(Clone, Default)]
pub struct Slots {
    pub text: SlotState<TextEncoder>,
    pub image: SlotState<ImageEncoder>,
    pub intent: SlotState<IntentHead>,
    pub tagger: SlotState<Tagger>,
    pub query: SlotState<TextEncoder>,
    pub document: SlotState<TextEncoder>,
    /// The optional heads (tagger, intent) the server was started to load: while one of these
    /// is still empty it is loading, so a call that needs it is told to retry (UNAVAILABLE)
    /// rather than that the server runs without it (UNIMPLEMENTED).
    pub expected: Vec<SlotName>,
}

/// A version of any slot, for what the admin API reports.
pub struct VersionView {
    pub label: String,
    pub id: String,
    pub source: String,
    pub weights: String,
    pub dimension: usize,
    pub loaded_at: SystemTime,
}

impl<T> From<&Version<T>> for VersionView {
    fn from(v: &Version<T>) -> Self {
        Self {
            label: v.label.clone(),
            id: v.id.clone(),
            source: v.source.clone(),
            weights: v.weights.clone(),
            dimension: v.dimension,
            loaded_at: v.loaded_at,
        }
    }
}

/// One slot as `List` shows it.
pub struct SlotView {
    pub active: Option<VersionView>,
    pub candidate: Option<VersionView>,
    pub share: u32,
    pub previous: Option<VersionView>,
}

impl<T> From<&SlotState<T>> for SlotView {
    fn from(s: &SlotState<T>) -> Self {
        let view = |v: &Option<Arc<Version<T>>>| v.as_deref().map(VersionView::from);
        Self { active: view(&s.active), candidate: view(&s.candidate), share: s.share, previous: view(&s.previous) }
    }
}

impl Slots {
    pub fn view(&self, name: SlotName) -> SlotView {
        match name {
            SlotName::TextEncoder => (&self.text).into(),
            SlotName::ImageEncoder => (&self.image).into(),
            SlotName::Intent => (&self.intent).into(),
            SlotName::Tagger => (&self.tagger).into(),
            SlotName::QueryTower => (&self.query).into(),
            SlotName::DocumentTower => (&self.document).into(),
        }
    }

    fn has_label(&self, name: SlotName, label: &str) -> bool {
        match name {
            SlotName::TextEncoder => self.text.has_label(label),
            SlotName::ImageEncoder => self.image.has_label(label),
            SlotName::Intent => self.intent.has_label(label),
            SlotName::Tagger => self.tagger.has_label(label),
            SlotName::QueryTower => self.query.has_label(label),
            SlotName::DocumentTower => self.document.has_label(label),
        }
    }

    /// Runs `op` on slot `name`'s state, whatever its model type.
    fn with_slot<R>(&mut self, name: SlotName, op: impl SlotOp<R>) -> R {
        match name {
            SlotName::TextEncoder => op.run(&mut self.text),
            SlotName::ImageEncoder => op.run(&mut self.image),
            SlotName::Intent => op.run(&mut self.intent),
            SlotName::Tagger => op.run(&mut self.tagger),
            SlotName::QueryTower => op.run(&mut self.query),
            SlotName::DocumentTower => op.run(&mut self.document),
        }
    }

    /// What is wrong with the active versions together: a head whose active version reads
    /// another encoder than the active one, or fuses images from another image model.
    fn broken_links(&self) -> Vec<(SlotName, String)> {
        let mut out = Vec::new();
        let Some(text) = &self.text.active else { return out };
        if let Some(h) = &self.intent.active {
            if !reads_encoder(&h.reads, text) {
                out.push((SlotName::Intent, format!(
                    "the intent slot's active version {:?} reads the states of text encoder weights {}, not those of {:?}",
                    h.label, h.reads.as_deref().unwrap_or("?"), text.label
                )));
            } else if let Some(img) = &h.fuses_with {
                if self.image.active.as_ref().is_none_or(|a| a.weights != *img) {
                    out.push((SlotName::Intent, format!(
                        "the intent slot's active version {:?} fuses images from image model weights {img}, which would no longer be active",
                        h.label
                    )));
                }
            }
        }
        if let Some(t) = &self.tagger.active {
            if t.over_encoder() && !reads_encoder(&t.reads, text) {
                out.push((SlotName::Tagger, format!(
                    "the tagger slot's active version {:?} reads the states of text encoder weights {}, not those of {:?}",
                    t.label, t.reads.as_deref().unwrap_or("?"), text.label
                )));
            }
        }
        out
    }

    /// Promotes `name`'s candidate to `share` buckets (BUCKETS: makes it active). At 100%, heads
    /// whose active version would no longer fit are promoted with it when their candidate fits;
    /// otherwise nothing changes and the error says what to load first. Returns the slots changed.
    pub fn promote(&mut self, name: SlotName, share: u32) -> Result<Vec<SlotName>, ServiceError> {
        if !self.with_slot(name, HasCandidate) {
            return Err(ServiceError::FailedPrecondition(format!(
                "the {name} slot has no candidate to promote; Load one first"
            )));
        }
        if share < BUCKETS {
            if name == SlotName::DocumentTower && share > 0 {
                return Err(ServiceError::FailedPrecondition(
                    "a document tower decides the vectors stored in the knowledge base, so a traffic share would mix two \
                     vector spaces in one collection; promote it at 100% (and re-upsert the documents to re-embed them)"
                        .into(),
                ));
            }
            self.with_slot(name, SetShare(share));
            return Ok(vec![name]);
        }
        let mut draft = self.clone();
        draft.with_slot(name, MakeActive);
        let mut changed = vec![name];
        for _ in 0..2 {
            let broken = draft.broken_links();
            if broken.is_empty() {
                break;
            }
            for (dep, why) in broken {
                if changed.contains(&dep) || !draft.with_slot(dep, HasCandidate) {
                    return Err(ServiceError::FailedPrecondition(format!(
                        "promoting the {name} slot's candidate would break a head: {why}; load a {dep} checkpoint trained \
                         on the new version as the {dep} slot's candidate first, then promote {name} again (both move together)"
                    )));
                }
                draft.with_slot(dep, MakeActive);
                changed.push(dep);
            }
        }
        if let Some((_, why)) = draft.broken_links().into_iter().next() {
            return Err(ServiceError::FailedPrecondition(format!("promoting the {name} slot would break a head: {why}")));
        }
        *self = draft;
        Ok(changed)
    }

    /// Makes `name`'s previous version active again; the version it replaces becomes the
    /// candidate at 0%. Heads that would no longer fit roll back with it.
    pub fn rollback(&mut self, name: SlotName) -> Result<Vec<SlotName>, ServiceError> {
        if !self.with_slot(name, HasPrevious) {
            return Err(ServiceError::FailedPrecondition(format!(
                "the {name} slot has no previous version to roll back to (none was replaced since start-up, or it was \
                 already rolled back); to stop a canary, Promote its candidate to 0%"
            )));
        }
        let mut draft = self.clone();
        draft.with_slot(name, RollBack);
        let mut changed = vec![name];
        for (dep, why) in draft.broken_links() {
            if changed.contains(&dep) || !draft.with_slot(dep, HasPrevious) {
                return Err(ServiceError::FailedPrecondition(format!(
                    "rolling back the {name} slot would break a head: {why}; load a fitting {dep} version first"
                )));
            }
            draft.with_slot(dep, RollBack);
            changed.push(dep);
        }
        if let Some((_, why)) = draft.broken_links().into_iter().next() {
            return Err(ServiceError::FailedPrecondition(format!("rolling back the {name} slot would break a head: {why}")));
        }
        *self = draft;
        Ok(changed)
    }
}

/// An operation on a slot's state that does not care about its model type.
trait SlotOp<R> {
    fn run<T>(self, s: &mut SlotState<T>) -> R;
}

struct HasCandidate;
impl SlotOp<bool> for HasCandidate {
    fn run<T>(self, s: &mut SlotState<T>) -> bool {
        s.candidate.is_some()
    }
}

struct HasPrevious;
impl SlotOp<bool> for HasPrevious {
    fn run<T>(self, s: &mut SlotState<T>) -> bool {
        s.previous.is_some()
    }
}

struct SetShare(u32);
impl SlotOp<()> for SetShare {
    fn run<T>(self, s: &mut SlotState<T>) {
        s.share = self.0;
    }
}

struct MakeActive;
impl SlotOp<()> for MakeActive {
    fn run<T>(self, s: &mut SlotState<T>) {
        if let Some(c) = s.candidate.take() {
            s.previous = s.active.replace(c);
            s.share = 0;
        }
    }
}

struct RollBack;
impl SlotOp<()> for RollBack {
    fn run<T>(self, s: &mut SlotState<T>) {
        if let Some(p) = s.previous.take() {
            s.candidate = s.active.replace(p);
            s.share = 0;
        }
    }
}

/// The slots as requests see them, with the compositions built from them so far (a text
/// model is an encoder version with the head versions that read it; batches never mix
/// compositions, so requests on the same versions must share one `Arc`).
pub struct Snapshot {
    pub slots: Slots,
    texts: Mutex<HashMap<(usize, usize, usize), Arc<TextModel>>>,
    chars: Mutex<HashMap<usize, Arc<CharTagger>>>,
    device: candle_core::Device,
}

fn ptr<T>(v: Option<&Arc<Version<T>>>) -> usize {
    v.map_or(0, |v| Arc::as_ptr(v) as usize)
}

impl Snapshot {
    /// Why a call that needs the empty head `slot` (Tagger or Intent) gets no answer: it is
    /// still loading (the server was started to load it), or the server runs without it.
    pub fn missing(&self, slot: SlotName) -> ServiceError {
        let (what, flag, without) = match slot {
            SlotName::Intent => ("intent model", "--no-intent-model", "it classifies no intents"),
            _ => ("entity tagger", "--no-entity-model", "it extracts no entities"),
        };
        if self.slots.expected.contains(&slot) {
            ServiceError::Unavailable(format!("the {what} is still loading; retry shortly"))
        } else {
            ServiceError::Unimplemented(format!("no {what} is loaded (the server was started with {flag}); {without}"))
        }
    }

    /// The text model for `bucket` that can answer `needs`: its encoder version, and the head
    /// versions for that bucket that read that encoder. A bucket whose preferred encoder has no
    /// head for a task falls back to the other encoder version.
    pub fn text_model(&self, bucket: u32, needs: Tasks) -> Result<Arc<TextModel>, ServiceError> {
        for encoder in self.slots.text.ordered(bucket) {
            if let Some(m) = self.compose(encoder, bucket, needs) {
                return Ok(m);
            }
        }
        if self.slots.text.active.is_none() {
            return Err(ServiceError::Unavailable("the text model is still loading; retry shortly".into()));
        }
        if needs.intent && self.slots.intent.active.is_none() {
            return Err(self.missing(SlotName::Intent));
        }
        if needs.entities && self.slots.tagger.active.is_none() {
            return Err(self.missing(SlotName::Tagger));
        }
        Err(ServiceError::Unavailable("no loaded head reads the states of a loaded text encoder; an operator must load one".into()))
    }

    /// A tower's text model for `bucket` (the towers serve embeddings only).
    pub fn tower_model(&self, slot: SlotName, bucket: u32) -> Result<Arc<TextModel>, ServiceError> {
        let state = match slot {
            SlotName::QueryTower => &self.slots.query,
            _ => &self.slots.document,
        };
        let encoder = state
            .pick(bucket)
            .ok_or_else(|| ServiceError::Unavailable(format!("the {slot} is still loading; retry shortly")))?;
        Ok(self.compose(encoder, bucket, Tasks::default()).expect("a composition without needs always exists"))
    }

    fn compose(&self, encoder: &Arc<Version<TextEncoder>>, bucket: u32, needs: Tasks) -> Option<Arc<TextModel>> {
        let intent = self.slots.intent.ordered(bucket).into_iter().find(|h| reads_encoder(&h.reads, encoder));
        if needs.intent && intent.is_none() {
            return None;
        }
        let tagger = self
            .slots
            .tagger
            .ordered(bucket)
            .into_iter()
            .find(|t| t.over_encoder() && reads_encoder(&t.reads, encoder));
        if needs.entities && tagger.is_none() {
            return None;
        }
        let key = (Arc::as_ptr(encoder) as usize, ptr(tagger), ptr(intent));
        let mut cache = self.texts.lock().unwrap_or_else(|e| e.into_inner());
        Some(
            cache
                .entry(key)
                .or_insert_with(|| {
                    Arc::new(TextModel { encoder: encoder.clone(), tagger: tagger.cloned(), intent: intent.cloned() })
                })
                .clone(),
        )
    }

    /// The character-level tagger backend of a tagger version (one `Arc` per version).
    pub fn char_tagger(&self, tagger: &Arc<Version<Tagger>>) -> Arc<CharTagger> {
        let mut cache = self.chars.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(Arc::as_ptr(tagger) as usize)
            .or_insert_with(|| Arc::new(CharTagger { tagger: tagger.clone(), device: self.device.clone() }))
            .clone()
    }

    /// A snapshot of `slots` that keeps the compositions of `self` whose versions are all
    /// still held (so requests before and after a change still batch together).
    fn next(&self, slots: Slots) -> Snapshot {
        let texts: HashMap<_, _> = self
            .texts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, m)| {
                let enc_ok = slots.text.held().chain(slots.query.held()).chain(slots.document.held()).any(|v| Arc::ptr_eq(v, &m.encoder));
                let tag_ok = m.tagger.as_ref().is_none_or(|t| slots.tagger.held().any(|v| Arc::ptr_eq(v, t)));
                let int_ok = m.intent.as_ref().is_none_or(|h| slots.intent.held().any(|v| Arc::ptr_eq(v, h)));
                enc_ok && tag_ok && int_ok
            })
            .map(|(k, m)| (*k, m.clone()))
            .collect();
        let chars: HashMap<_, _> = self
            .chars
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, c)| slots.tagger.held().any(|v| Arc::ptr_eq(v, &c.tagger)))
            .map(|(k, c)| (*k, c.clone()))
            .collect();
        Snapshot { slots, texts: Mutex::new(texts), chars: Mutex::new(chars), device: self.device.clone() }
    }
}

/// What a load in progress, or the last failed one, shows in `List`.
#[derive(Debug, Clone)]
pub struct Activity {
    pub label: String,
    pub source: String,
    pub stage: Stage,
    pub since: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    Loading,
    Warming,
    Failed(String),
}

/// The slots, swapped as a whole.
pub struct Registry {
    current: RwLock<Arc<Snapshot>>,
    /// Serialises changes (so two promotions cannot lose each other's update).
    changing: Mutex<()>,
    /// Per slot: a load in progress, or the last load that failed.
    activity: Mutex<HashMap<SlotName, Activity>>,
}

impl Registry {
    pub fn new(device: candle_core::Device) -> Self {
        let empty = Snapshot { slots: Slots::default(), texts: Mutex::default(), chars: Mutex::default(), device };
        Self { current: RwLock::new(Arc::new(empty)), changing: Mutex::new(()), activity: Mutex::default() }
    }

    /// The slots now; a request routes on one snapshot from start to end.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Applies `change` to a copy of the slots and publishes it, or leaves everything as it was
    /// when `change` fails.
    pub fn change<R>(&self, change: impl FnOnce(&mut Slots) -> Result<R, ServiceError>) -> Result<R, ServiceError> {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.snapshot();
        let mut slots = now.slots.clone();
        let r = change(&mut slots)?;
        let next = Arc::new(now.next(slots));
        publish_metrics(&next.slots);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(r)
    }

    /// Marks a load into `slot` as started; refuses a second concurrent load into one slot, and
    /// a label the slot already holds.
    pub fn begin_load(&self, slot: SlotName, label: &str, source: &str) -> Result<(), ServiceError> {
        if self.snapshot().slots.has_label(slot, label) {
            return Err(ServiceError::AlreadyExists(format!(
                "the {slot} slot already holds a version labelled {label:?}; give the new checkpoint its own label"
            )));
        }
        let mut act = self.activity.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = act.get(&slot).filter(|a| !matches!(a.stage, Stage::Failed(_))) {
            return Err(ServiceError::FailedPrecondition(format!(
                "a load into the {slot} slot ({:?} from {}) is still running; wait for it to finish (List shows its state)",
                a.label, a.source
            )));
        }
        act.insert(slot, Activity { label: label.into(), source: source.into(), stage: Stage::Loading, since: SystemTime::now() });
        Ok(())
    }

    /// Moves a load on to `stage` (Warming, or Failed with the reason).
    pub fn load_stage(&self, slot: SlotName, stage: Stage) {
        if let Some(a) = self.activity.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&slot) {
            a.stage = stage;
        }
    }

    /// Ends a load that succeeded (its version is now in the slots).
    pub fn end_load(&self, slot: SlotName) {
        self.activity.lock().unwrap_or_else(|e| e.into_inner()).remove(&slot);
    }

    pub fn activity(&self, slot: SlotName) -> Option<Activity> {
        self.activity.lock().unwrap_or_else(|e| e.into_inner()).get(&slot).cloned()
    }
}

/// Gauges of what each slot serves: `concierge_model_version_info{slot,version,state}` = 1 and
/// `concierge_model_candidate_share{slot}` (0..1).
/// A version's series that no longer holds is set to 0 (Prometheus keeps the last value).
fn publish_metrics(slots: &Slots) {
    static SHOWN: Mutex<Vec<(SlotName, String, &'static str)>> = Mutex::new(Vec::new());
    let mut now = Vec::new();
    for name in SlotName::ALL {
        let view = slots.view(name);
        metrics::gauge!("concierge_model_candidate_share", "slot" => name.as_str())
            .set(if view.candidate.is_some() { view.share as f64 / BUCKETS as f64 } else { 0.0 });
        for (v, state) in [(&view.active, "active"), (&view.candidate, "candidate"), (&view.previous, "previous")] {
            if let Some(v) = v {
                now.push((name, v.label.clone(), state));
            }
        }
    }
    let mut shown = SHOWN.lock().unwrap_or_else(|e| e.into_inner());
    for (slot, label, state) in shown.iter().filter(|s| !now.contains(s)) {
        metrics::gauge!("concierge_model_version_info", "slot" => slot.as_str(), "version" => label.clone(), "state" => *state).set(0.0);
    }
    for (slot, label, state) in &now {
        metrics::gauge!("concierge_model_version_info", "slot" => slot.as_str(), "version" => label.clone(), "state" => *state).set(1.0);
    }
    *shown = now;
}

/// The bucket of a routing key: a stable 64-bit FNV-1a hash of it, mixed, modulo [`BUCKETS`]
/// (the same on every server and every release: a key's cohort must not move).
pub fn bucket_of(key: &str) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64's finaliser: FNV's low bits alone are poorly mixed for short keys.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h % BUCKETS as u64) as u32
}

/// A bucket for a call without a routing key.
pub fn random_bucket() -> u32 {
    fastrand::u32(0..BUCKETS)
}

/// Counts a finished call against the version that answered it:
/// `concierge_model_requests_total{slot,version,code}` and
/// `concierge_model_request_duration_seconds{slot,version}`, so an A/B can be judged.
pub fn observe_version(slot: SlotName, version: &str, code: &str, seconds: f64) {
    metrics::counter!("concierge_model_requests_total", "slot" => slot.as_str(), "version" => version.to_string(), "code" => code.to_string())
        .increment(1);
    metrics::histogram!("concierge_model_request_duration_seconds", "slot" => slot.as_str(), "version" => version.to_string())
        .record(seconds);
}

/// The knowledge base's store: one slot, replaced only at start-up.
pub struct ModelSlot<T: ?Sized> {
    name: &'static str,
    current: RwLock<Option<Arc<T>>>,
}

impl<T: ?Sized> ModelSlot<T> {
    /// `name` completes "… is still loading": "the knowledge base".
    pub fn empty(name: &'static str) -> Self {
        Self { name, current: RwLock::new(None) }
    }

    /// The serving version, or UNAVAILABLE while none is loaded.
    pub fn get(&self) -> Result<Arc<T>, ServiceError> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| ServiceError::Unavailable(format!("{} is still loading; retry shortly", self.name)))
    }

    /// Puts `model` in service; returns the version it replaced.
    pub fn replace(&self, model: Arc<T>) -> Option<Arc<T>> {
        self.current.write().unwrap_or_else(|e| e.into_inner()).replace(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket_of("shopper-42"), bucket_of("shopper-42"));
        let n = 20_000;
        let below_10pct = (0..n).filter(|i| bucket_of(&format!("shopper-{i}")) < BUCKETS / 10).count();
        let share = below_10pct as f64 / n as f64;
        assert!((share - 0.10).abs() < 0.01, "10% of keys should land below 10% of the buckets; got {share}");
    }

    #[test]
    fn slot_names_round_trip() {
        for n in SlotName::ALL {
            assert_eq!(SlotName::parse(n.as_str()).unwrap(), n);
        }
        assert!(SlotName::parse("encoder").unwrap_err().to_string().contains("text-encoder"));
    }

    fn version(label: &str) -> Arc<Version<()>> {
        Arc::new(Version { label: label.into(), id: "m".into(), source: "s".into(), weights: label.into(), dimension: 1, loaded_at: SystemTime::now(), loaded: () })
    }

    #[test]
    fn candidate_answers_buckets_below_its_share() {
        let mut s = SlotState::<()> { active: Some(version("a")), candidate: Some(version("b")), share: 1000, previous: None };
        assert_eq!(s.pick(999).unwrap().label, "b");
        assert_eq!(s.pick(1000).unwrap().label, "a");
        assert_eq!(s.ordered(5).iter().map(|v| v.label.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        s.share = 0;
        assert_eq!(s.pick(0).unwrap().label, "a");
        assert_eq!(s.ordered(0).len(), 1, "a candidate at 0% serves no call, not even as a fallback");
        MakeActive.run(&mut s);
        assert_eq!((s.active.as_ref().unwrap().label.as_str(), s.previous.as_ref().unwrap().label.as_str()), ("b", "a"));
        RollBack.run(&mut s);
        assert_eq!((s.active.as_ref().unwrap().label.as_str(), s.candidate.as_ref().unwrap().label.as_str()), ("a", "b"));
        assert!(s.previous.is_none());
    }

    /// While a head the server was started to load is still empty, a call that needs it is told
    /// to retry (it is loading), not that the server runs without it; a head it was started
    /// without is UNIMPLEMENTED, with the flag that turned it off.
    #[test]
    fn a_head_still_loading_is_unavailable_and_a_disabled_one_unimplemented() {
        let registry = Registry::new(candle_core::Device::Cpu);
        registry.change(|slots| Ok(slots.expected = vec![SlotName::Tagger])).unwrap();
        let snap = registry.snapshot();
        let loading = snap.missing(SlotName::Tagger);
        assert_eq!(loading.code(), tonic::Code::Unavailable, "{loading:?}");
        assert!(loading.to_string().contains("entity tagger is still loading"), "{loading}");
        let off = snap.missing(SlotName::Intent);
        assert_eq!(off.code(), tonic::Code::Unimplemented, "{off:?}");
        assert!(off.to_string().contains("--no-intent-model"), "{off}");
    }
}
