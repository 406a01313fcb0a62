//! Loading a checkpoint into a slot, off the serving path: resolve its files (folder or Hub),
//! check them before anything is built (safetensors header and sizes, float dtypes, finite
//! weights, memory), build the model, check it against the slot (dimension, labels, the encoder
//! and image model it was trained on), run a warm-up pass whose outputs must be finite, and only
//! then put it in the registry. Start-up and the admin API's `Load` take this same path, so a
//! checkpoint that starts the server also loads live, and one refused live is refused at start.
//!
//! A refused checkpoint changes nothing: the slot's versions serve on.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use candle_core::{DType, Device, Tensor};
use concierge_models::entities::tagger_states;
use concierge_models::intent::{IntentFormat, IntentModel};
use concierge_models::tagger::InputKind;
use concierge_models::{BiLstmCrf, CrossAttentionFusion, ImageEncoder, ModelSource, TextEncoder, TokenizedText};

use crate::error::ServiceError;
use crate::registry::{reads_encoder, SlotName, Slots, Stage, Tagger, Version};
use crate::state::AppState;
use crate::text::IntentHead;

/// Texts the warm-up pass runs (one English, one Chinese: both tokenizer paths).
const WARM_UP_TEXTS: [&str; 2] = ["does this cream suit sensitive skin? order 12345, size M, red", "这款面霜适合敏感肌吗"];

/// Where a new version goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// The slot's active version (start-up).
    Active,
    /// The slot's candidate at 0% (the admin API's Load).
    Candidate,
}

/// What a load reports.
pub struct Loaded {
    pub label: String,
    pub seconds: f64,
}

/// Loads `source` into `slot`, labelled `label` (None: the weights' hash or Hub commit), checked
/// and warmed, and installs it. Blocking: run it on a blocking thread.
pub fn load_into(state: &AppState, slot: SlotName, source: &ModelSource, label: Option<&str>, install: Install) -> Result<Loaded, ServiceError> {
    let t0 = Instant::now();
    let shown = describe(source);
    let registry = &state.registry;
    registry.begin_load(slot, label.unwrap_or("(default label)"), &shown)?;
    // A panic in model code must fail the load, not the server.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| build(state, slot, source, label, &shown, install)))
        .unwrap_or_else(|p| {
            let why = concierge_engine::panic_message(p.as_ref()).unwrap_or_else(|| "(no message)".into());
            Err(ServiceError::Internal(format!("loading panicked: {why}")))
        })
        .and_then(|built| {
            let label = built.label().to_string();
            registry.change(|slots| built.install(slots, install)).map(|_| label)
        });
    match result {
        Ok(label) => {
            registry.end_load(slot);
            let seconds = t0.elapsed().as_secs_f64();
            tracing::info!(%slot, %label, source = %shown, ?install, seconds, "model version loaded");
            metrics::counter!("concierge_model_loads_total", "slot" => slot.as_str(), "outcome" => "loaded").increment(1);
            Ok(Loaded { label, seconds })
        }
        Err(e) => {
            tracing::warn!(%slot, source = %shown, error = %e, "model load refused; the slot's versions serve on");
            metrics::counter!("concierge_model_loads_total", "slot" => slot.as_str(), "outcome" => "refused").increment(1);
            registry.load_stage(slot, Stage::Failed(e.to_string()));
            Err(e)
        }
    }
}

/// How `List` and logs show a source.
pub fn describe(source: &ModelSource) -> String {
    match source {
        ModelSource::Dir(d) => d.display().to_string(),
        ModelSource::Hub { repo, revision } => format!("hub:{repo}@{revision}"),
    }
}

/// A checked, warmed version not yet installed.
enum Built {
    Text(SlotName, Version<TextEncoder>),
    Image(Version<ImageEncoder>),
    Intent(Version<IntentHead>),
    Tagger(Version<Tagger>),
}

impl Built {
    fn label(&self) -> &str {
        match self {
            Built::Text(_, v) => &v.label,
            Built::Image(v) => &v.label,
            Built::Intent(v) => &v.label,
            Built::Tagger(v) => &v.label,
        }
    }

    fn install(self, slots: &mut Slots, install: Install) -> Result<(), ServiceError> {
        fn put<T>(slot: SlotName, s: &mut crate::registry::SlotState<T>, v: Version<T>, install: Install) -> Result<(), ServiceError> {
            if s.has_label(&v.label) {
                return Err(ServiceError::AlreadyExists(format!(
                    "the {slot} slot already holds a version labelled {:?}; give the new checkpoint its own label",
                    v.label
                )));
            }
            match install {
                Install::Active => s.active = Some(Arc::new(v)),
                Install::Candidate => {
                    s.candidate = Some(Arc::new(v));
                    s.share = 0;
                }
            }
            Ok(())
        }
        match self {
            Built::Text(SlotName::QueryTower, v) => put(SlotName::QueryTower, &mut slots.query, v, install),
            Built::Text(SlotName::DocumentTower, v) => put(SlotName::DocumentTower, &mut slots.document, v, install),
            Built::Text(_, v) => put(SlotName::TextEncoder, &mut slots.text, v, install),
            Built::Image(v) => put(SlotName::ImageEncoder, &mut slots.image, v, install),
            Built::Intent(v) => put(SlotName::Intent, &mut slots.intent, v, install),
            Built::Tagger(v) => put(SlotName::Tagger, &mut slots.tagger, v, install),
        }
    }
}

/// An error's message without the backtrace candle appends when RUST_BACKTRACE is set.
fn one_line(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    match s.find("\n   0: ") {
        Some(i) => s[..i].trim_end().to_string(),
        None => s,
    }
}

fn bad(slot: SlotName, source: &str, why: impl std::fmt::Display) -> ServiceError {
    ServiceError::InvalidArgument(format!("cannot load {source} into the {slot} slot: {why}"))
}

fn refused(slot: SlotName, source: &str, r: Refused) -> ServiceError {
    match r {
        Refused::Bad(why) => bad(slot, source, why),
        Refused::Memory(why) => ServiceError::ResourceExhausted(format!("cannot load {source} into the {slot} slot: {why}")),
    }
}

fn build(state: &AppState, slot: SlotName, source: &ModelSource, label: Option<&str>, shown: &str, install: Install) -> Result<Built, ServiceError> {
    let cfg = &state.config;
    // Live loads leave room for serving; at start-up nothing serves yet.
    let headroom = match install {
        Install::Active => 0,
        Install::Candidate => cfg.load_headroom_mb,
    };
    let device = &state.device;
    let dtype = cfg.dtype.to_candle();
    let slots = state.registry.snapshot().slots.clone();
    let fail = |why: String| bad(slot, shown, why);
    let stamp = |id: String, weights: String, dimension: usize| {
        (label.map(str::to_string).unwrap_or_else(|| weights.clone()), id, weights, dimension)
    };
    match slot {
        SlotName::TextEncoder | SlotName::QueryTower | SlotName::DocumentTower => {
            let ckpt = source.resolve_text().map_err(|e| fail(one_line(&e)))?;
            let mut files = vec![ckpt.weights.clone()];
            files.extend(ckpt.after_pooling.iter().filter_map(|m| match m {
                concierge_models::checkpoint::AfterPooling::Dense { weights, .. } => Some(weights.clone()),
                _ => None,
            }));
            precheck(&files, device, dtype, headroom).map_err(|r| refused(slot, shown, r))?;
            let enc = TextEncoder::from_checkpoint(&ckpt, device, dtype, cfg.max_input_tokens).map_err(|e| fail(one_line(&e)))?;
            state.registry.load_stage(slot, Stage::Warming);
            let active = match slot {
                SlotName::QueryTower => &slots.query,
                SlotName::DocumentTower => &slots.document,
                _ => &slots.text,
            };
            if let Some(a) = &active.active {
                if a.dimension != enc.info().dimension {
                    return Err(fail(format!(
                        "it embeds to {} dimensions, but the slot's active version {:?} embeds to {}; callers and the \
                         knowledge base hold vectors of that width, so a new width needs a new deployment",
                        enc.info().dimension, a.label, a.dimension
                    )));
                }
            }
            let tokens = warm_up_tokens(&enc)?;
            let refs: Vec<&TokenizedText> = tokens.iter().collect();
            let vectors = enc.embed(&refs, &[false, false]).map_err(|e| fail(format!("the warm-up pass failed: {}", one_line(&e))))?;
            if vectors.iter().flatten().any(|x| !x.is_finite()) {
                return Err(fail("the warm-up pass gave NaN or infinite embeddings; the weights are broken".into()));
            }
            let (label, id, weights, dim) = stamp(enc.info().id.clone(), enc.info().version.clone(), enc.info().dimension);
            Ok(Built::Text(slot, Version { label, id, source: shown.into(), weights, dimension: dim, loaded_at: SystemTime::now(), loaded: enc }))
        }
        SlotName::ImageEncoder => {
            if state.image.is_none() {
                return Err(ServiceError::FailedPrecondition(
                    "this server was started with --no-image-model: it has no image lane to serve an image model on".into(),
                ));
            }
            let ckpt = source.resolve_image().map_err(|e| fail(one_line(&e)))?;
            precheck(std::slice::from_ref(&ckpt.weights), device, dtype, headroom).map_err(|r| refused(slot, shown, r))?;
            let enc = ImageEncoder::from_checkpoint(&ckpt, device, dtype).map_err(|e| fail(one_line(&e)))?;
            state.registry.load_stage(slot, Stage::Warming);
            if let Some(a) = &slots.image.active {
                if a.dimension != enc.info().dimension {
                    return Err(fail(format!(
                        "it embeds to {} dimensions, but the slot's active version {:?} embeds to {}",
                        enc.info().dimension, a.label, a.dimension
                    )));
                }
            }
            let pixels = vec![0.25f32; enc.input_len()];
            let out = enc.embed(&[&pixels], &[false]).map_err(|e| fail(format!("the warm-up pass failed: {}", one_line(&e))))?;
            if out.iter().any(|e| e.vector.iter().any(|x| !x.is_finite()) || e.unsafe_score.is_some_and(|s| !s.is_finite())) {
                return Err(fail("the warm-up pass gave NaN or infinite outputs; the weights are broken".into()));
            }
            let (label, id, weights, dim) = stamp(enc.info().id.clone(), enc.info().version.clone(), enc.info().dimension);
            Ok(Built::Image(Version { label, id, source: shown.into(), weights, dimension: dim, loaded_at: SystemTime::now(), loaded: enc }))
        }
        SlotName::Intent => {
            let (dir, id) = folder(source, &[("model.safetensors", "the intent model's weights")], &[
                "intent_config.json",
                "encoder_config.json",
                "config.json",
            ])
            .map_err(fail)?;
            let weights_file = dir.join("model.safetensors");
            precheck(std::slice::from_ref(&weights_file), device, DType::F32, headroom).map_err(|r| refused(slot, shown, r))?;
            let model = IntentModel::load(&dir, device).map_err(|e| fail(one_line(&e)))?;
            let weights = concierge_models::checkpoint::weights_version(&[&weights_file]).map_err(|e| fail(one_line(&e)))?;
            state.registry.load_stage(slot, Stage::Warming);
            let reads = match &model.config().encoder {
                Some(e) => Some(e.version.clone()),
                // Its classifier reads its own encoder's states: those weights must be serving.
                None if model.format() == IntentFormat::HfSequenceClassification => Some(weights.clone()),
                None => {
                    tracing::warn!(source = %shown, "the intent model does not say which text model it was trained on");
                    None
                }
            };
            let encoder = head_encoder(&slots, &reads, model.config().input_dim, None, "concierge train-intent").map_err(|why| {
                fail(match model.format() {
                    IntentFormat::HfSequenceClassification if fitting_encoder(&slots, &reads).is_none() => format!(
                        "it is a Hugging Face BertForSequenceClassification: its classifier reads the states of its own \
                         encoder (weights {weights}), not those of the text encoder loaded ({}); serve that folder as the \
                         text model too (--model-dir {}, or Load it into the text-encoder slot), or train an intent model on \
                         this text model (concierge train-intent --encoder-dir ...)",
                        held_encoders(&slots),
                        dir.display()
                    ),
                    _ => why,
                })
            })?;
            if let Some(tap) = model.tap() {
                if tap > encoder.num_layers() {
                    return Err(fail(format!("it continues from layer {tap}, but the text encoder has {} layers", encoder.num_layers())));
                }
            }
            if let Some(a) = &slots.intent.active {
                if a.model.labels() != model.labels() {
                    let (have, want) = (model.labels().len(), a.model.labels().len());
                    return Err(fail(if have != want {
                        format!("it has {have} intent labels, but the slot's active version {:?} has {want}; callers map these labels, so a new label set needs a new deployment", a.label)
                    } else {
                        let k = (0..have).find(|&k| a.model.labels()[k] != model.labels()[k]).unwrap_or(0);
                        format!("its label {k} is {:?}, but the active version's is {:?}; the label sets must match, in order", model.labels()[k], a.model.labels()[k])
                    }));
                }
            }
            let image = match (&model.config().image_encoder, model.image_channels()) {
                (Some(want), Some(c)) => slots.image.held().find(|v| v.weights == want.version && v.dimension == c).cloned(),
                _ => None,
            };
            let no_images = match (model.image_channels(), &model.config().image_encoder, &image) {
                (None, _, _) => Some("this intent model reads text only (it has no fusion block)".to_string()),
                (Some(_), _, _) if state.image.is_none() => {
                    Some("this server runs no image model (--no-image-model), so the intent model reads text only".into())
                }
                (Some(_), None, _) => {
                    Some("the intent model's fusion block does not name the image model it was trained on, so it reads text only".into())
                }
                (Some(_), Some(want), None) => Some(format!(
                    "the intent model's fusion block was trained on image model {} {}, which is not loaded, so it reads text only",
                    want.id, want.version
                )),
                _ => None,
            };
            if let (Some(why), true) = (&no_images, model.has_fusion()) {
                tracing::warn!(source = %shown, "{why}; queries with images get INVALID_ARGUMENT");
            }
            // Warm-up: the encoder to the branch, the head, with a dummy image when it fuses.
            let tokens = warm_up_tokens(encoder)?;
            let refs: Vec<&TokenizedText> = tokens.iter().collect();
            let (states, tapped) = encoder.token_states_tapped(&refs, model.tap()).map_err(|e| fail(format!("the warm-up pass failed: {}", one_line(&e))))?;
            let hidden = tapped.as_ref().unwrap_or(&states.hidden);
            let images: Vec<Option<Tensor>> = match &image {
                Some(img) => {
                    let pixels = vec![0.25f32; img.input_len()];
                    let f = img
                        .features(&[&pixels])
                        .and_then(|f| CrossAttentionFusion::positions(&f))
                        .and_then(|p| Ok(p.get(0)?))
                        .map_err(|e| fail(format!("the warm-up pass failed on the image features: {e}")))?;
                    vec![Some(f), None]
                }
                None => vec![None, None],
            };
            let probs = model.probabilities(hidden, &states.lens, &images).map_err(|e| fail(format!("the warm-up pass failed: {}", one_line(&e))))?;
            if probs.iter().flatten().any(|p| !p.is_finite()) {
                return Err(fail("the warm-up pass gave NaN or infinite intent probabilities; the weights are broken".into()));
            }
            let fuses_with = image.as_ref().filter(|_| no_images.is_none()).map(|v| v.weights.clone());
            let dim = model.labels().len();
            let (label, _, weights, dimension) = stamp(id.clone(), weights, dim);
            let head = IntentHead { model, reads, fuses_with, no_images };
            Ok(Built::Intent(Version { label, id, source: shown.into(), weights, dimension, loaded_at: SystemTime::now(), loaded: head }))
        }
        SlotName::Tagger => {
            let (dir, id) = folder(
                source,
                &[("config.json", "the tagger's config"), ("model.safetensors", "the tagger's weights"), ("tags.json", "the tag names")],
                &["vocab.json"],
            )
            .map_err(fail)?;
            let weights_file = dir.join("model.safetensors");
            precheck(std::slice::from_ref(&weights_file), device, DType::F32, headroom).map_err(|r| refused(slot, shown, r))?;
            let model = BiLstmCrf::load(&dir, device, DType::F32).map_err(|e| fail(one_line(&e)))?;
            let weights = concierge_models::checkpoint::weights_version(&[&weights_file]).map_err(|e| fail(one_line(&e)))?;
            state.registry.load_stage(slot, Stage::Warming);
            if let Some(a) = &slots.tagger.active {
                if a.model.tags() != model.tags() {
                    return Err(fail(format!(
                        "it has {} tags, but the slot's active version {:?} has {} (or they differ in name or order); callers \
                         map these entity labels, so a new tag set needs a new deployment",
                        model.tags().len(),
                        a.label,
                        a.model.tags().len()
                    )));
                }
            }
            let reads = model.config().extra.get("encoder").and_then(|e| e.get("version")).and_then(|v| v.as_str()).map(str::to_string);
            let crf = model.crf();
            for t in [crf.transitions(), crf.start_transitions(), crf.end_transitions()] {
                if !finite(t).map_err(|e| fail(one_line(&e)))? {
                    return Err(fail("its CRF transitions hold NaN or infinite values; the weights are broken".into()));
                }
            }
            let emissions = match model.config().input {
                InputKind::Encoder => {
                    if reads.is_none() {
                        tracing::warn!(source = %shown, "the entity tagger does not say which text model it was trained on");
                    }
                    let layers = model.config().encoder_layers.as_deref();
                    let encoder = head_encoder(&slots, &reads, model.config().input_dim, layers, "concierge train-tagger").map_err(fail)?;
                    let tokens = warm_up_tokens(encoder)?;
                    if let Some(branch) = model.branch() {
                        let (first, end) = (branch.layers().first(), branch.layers().first() + branch.layers().len());
                        if end != encoder.num_layers() {
                            return Err(fail(format!(
                                "its fine-tuned encoder layers are {first}..{end}, but the text encoder has {} layers; \
                                 serve it with the {end}-layer encoder it was trained on",
                                encoder.num_layers()
                            )));
                        }
                    }
                    let states = tagger_states(encoder, &[&tokens[0]], &model)
                        .map_err(|e| fail(format!("the warm-up pass failed: {}", one_line(&e))))?;
                    let x = states.hidden.unsqueeze(0).map_err(|e| fail(one_line(&e)))?;
                    model.forward_emissions(&x, &states.lens)
                }
                InputKind::Embeddings => model
                    .char_ids(&WARM_UP_TEXTS, device)
                    .and_then(|(ids, lens)| model.forward_emissions(&ids, &lens)),
            }
            .map_err(|e| fail(format!("the warm-up pass failed: {}", one_line(&e))))?;
            if !finite(&emissions).map_err(|e| fail(one_line(&e)))? {
                return Err(fail("the warm-up pass gave NaN or infinite emission scores; the weights are broken".into()));
            }
            let dim = model.tags().len();
            let (label, _, weights, dimension) = stamp(id.clone(), weights, dim);
            let tagger = Tagger { model, reads };
            Ok(Built::Tagger(Version { label, id, source: shown.into(), weights, dimension, loaded_at: SystemTime::now(), loaded: tagger }))
        }
    }
}

/// The held text encoder a head runs on (it reads `reads`'s states, `input_dim` wide: the
/// states after `layers` side by side, or the last layer's), or why none can; `retrain` is the
/// command that trains such a head.
fn head_encoder<'a>(
    slots: &'a Slots,
    reads: &Option<String>,
    input_dim: usize,
    layers: Option<&[usize]>,
    retrain: &str,
) -> Result<&'a Arc<Version<TextEncoder>>, String> {
    let encoder = fitting_encoder(slots, reads).ok_or_else(|| {
        format!(
            "it was trained on the states of text encoder weights {}, but the text-encoder slot holds {}; load that \
             encoder into the text-encoder slot first, or retrain it on a loaded one ({retrain} --encoder-dir ...)",
            reads.as_deref().unwrap_or("?"),
            held_encoders(slots)
        )
    })?;
    if let Some(&l) = layers.into_iter().flatten().find(|&&l| l > encoder.num_layers()) {
        return Err(format!("it reads the states after layer {l}, but the text encoder has {} layers", encoder.num_layers()));
    }
    let n = layers.map_or(1, <[usize]>::len);
    if input_dim != encoder.hidden_size() * n {
        return Err(match n {
            1 => format!("it reads token states of width {input_dim}, but the text encoder's are {}", encoder.hidden_size()),
            _ => format!(
                "it reads {n} layers' token states side by side, {input_dim} wide, but the text encoder's make {}",
                encoder.hidden_size() * n
            ),
        });
    }
    Ok(encoder)
}

/// The held text encoder version a head reading `reads` runs on: the active one first.
fn fitting_encoder<'a>(slots: &'a Slots, reads: &Option<String>) -> Option<&'a Arc<Version<TextEncoder>>> {
    slots.text.held().find(|e| reads_encoder(reads, e))
}

fn held_encoders(slots: &Slots) -> String {
    let s: Vec<String> = slots.text.held().map(|v| format!("{:?} (weights {})", v.label, v.weights)).collect();
    if s.is_empty() { "nothing".into() } else { s.join(", ") }
}

fn warm_up_tokens(enc: &TextEncoder) -> Result<Vec<TokenizedText>, ServiceError> {
    WARM_UP_TEXTS
        .iter()
        .enumerate()
        .map(|(i, t)| enc.tokenize(i, t, true).map_err(|e| ServiceError::Internal(format!("the warm-up text does not tokenise: {e}"))))
        .collect()
}

fn finite(t: &Tensor) -> candle_core::Result<bool> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite()))
}

/// The folder of a head checkpoint and its id: a local folder as it is, or the Hub snapshot
/// folder holding `required` (and those of `optional` the repo has).
fn folder(source: &ModelSource, required: &[(&str, &str)], optional: &[&str]) -> Result<(PathBuf, String), String> {
    match source {
        ModelSource::Dir(d) => {
            if !d.is_dir() {
                return Err(format!("{} is not a folder on the server", d.display()));
            }
            let id = d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| d.display().to_string());
            Ok((d.clone(), id))
        }
        ModelSource::Hub { repo, revision } => {
            let dir = concierge_models::checkpoint::hub_folder(repo, revision, required, optional).map_err(|e| e.to_string())?;
            Ok((dir, repo.clone()))
        }
    }
}

/// Checks safetensors files before a model is built from them: the header parses, every
/// tensor's bytes lie inside the file (a truncated copy is caught here, not by a crash later),
/// every tensor is a float or an index buffer, no float is NaN or infinite, and the memory the
/// model will take is free (system memory on the CPU; on a GPU, the allocation's own error fails
/// the load).
pub fn precheck(files: &[PathBuf], device: &Device, dtype: DType, headroom_mb: u64) -> Result<(), Refused> {
    let mut need: u64 = 0;
    for f in files {
        need += check_safetensors(f, dtype).map_err(Refused::Bad)?;
    }
    if device.is_cpu() {
        if let Some(avail) = mem_available() {
            // Room for the model plus working memory for the batches that run meanwhile.
            let margin = headroom_mb << 20;
            if need.saturating_add(margin) > avail {
                return Err(Refused::Memory(format!(
                    "it needs about {} MiB of memory plus the {} MiB kept free for serving (--load-headroom-mb), and \
                     {} MiB are free; make room (a Load over the slot's candidate frees it) or use a machine with more",
                    need >> 20,
                    headroom_mb,
                    avail >> 20
                )));
            }
        }
    }
    Ok(())
}

/// Why a precheck refused a checkpoint.
pub enum Refused {
    /// The files are broken or not a model.
    Bad(String),
    /// Not enough free memory to load it beside what serves.
    Memory(String),
}

/// Bytes the file's tensors take in memory as `dtype` (floats converted to it).
fn check_safetensors(path: &Path, dtype: DType) -> Result<u64, String> {
    use std::io::Read;
    let name = path.display();
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot open {name}: {e}"))?;
    let len = f.metadata().map_err(|e| format!("cannot read {name}: {e}"))?.len();
    let mut head = [0u8; 8];
    f.read_exact(&mut head).map_err(|_| format!("{name} is not a safetensors file (shorter than its 8-byte header length)"))?;
    let n = u64::from_le_bytes(head);
    if n > 100 << 20 || 8 + n > len {
        return Err(format!("{name} is truncated or not a safetensors file (its header says {n} bytes; the file has {len})"));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| format!("cannot read {name}'s header: {e}"))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("{name}'s safetensors header is not valid JSON: {e}"))?;
    let data_len = len - 8 - n;
    let mut need = 0u64;
    let mut floats: Vec<(String, &'static str, u64, u64)> = Vec::new();
    for (tensor, info) in &header {
        if tensor == "__metadata__" {
            continue;
        }
        let dt = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
        let offsets: Vec<u64> = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default();
        let [start, end] = offsets[..] else {
            return Err(format!("{name}: tensor {tensor} has no data_offsets"));
        };
        if end > data_len || start > end {
            return Err(format!(
                "{name} is truncated: tensor {tensor} lies at bytes {start}..{end} of the data, but the file holds {data_len}; copy it again"
            ));
        }
        let float = match dt {
            "F32" => Some("F32"),
            "F16" => Some("F16"),
            "BF16" => Some("BF16"),
            "F64" => Some("F64"),
            _ => None,
        };
        match float {
            Some(kind) => {
                let width = match kind {
                    "F64" => 8,
                    "F32" => 4,
                    _ => 2,
                };
                need += (end - start) / width * dtype.size_in_bytes() as u64;
                floats.push((tensor.clone(), kind, start, end));
            }
            None => {
                let index = ["position_ids", "token_type_ids", "num_batches_tracked"].iter().any(|s| tensor.ends_with(s));
                if !index {
                    return Err(format!(
                        "{name}: tensor {tensor} has dtype {dt}; model weights must be floats (F32, F16, BF16, F64)"
                    ));
                }
                need += end - start;
            }
        }
    }
    // Finite weights: one streaming read of the data.
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(|e| format!("cannot read {name}: {e}"))?;
    for (tensor, kind, start, end) in floats {
        let bytes = &data[start as usize..end as usize];
        let bad = match kind {
            "F32" => bytes.chunks_exact(4).any(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
            "F64" => bytes.chunks_exact(8).any(|b| !f64::from_le_bytes(b.try_into().unwrap_or([0; 8])).is_finite()),
            // f16: exponent bits all ones; bf16: the top half of an f32.
            "F16" => bytes.chunks_exact(2).any(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00),
            _ => bytes.chunks_exact(2).any(|b| !f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16).is_finite()),
        };
        if bad {
            return Err(format!("{name}: tensor {tensor} holds NaN or infinite values; the checkpoint is broken (retrain or re-export it)"));
        }
    }
    Ok(need)
}

/// MemAvailable from /proc/meminfo, in bytes (None off Linux).
fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, tensors: &[(&str, &str, Vec<u8>)]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dt, bytes) in tensors {
            let start = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dt, "shape": [bytes.len() / 4], "data_offsets": [start, data.len()]}),
            );
        }
        let h = serde_json::to_vec(&header).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(data);
        std::fs::write(path, out).unwrap();
    }

    #[test]
    fn safetensors_checks_catch_truncation_nan_and_int_weights() {
        let dir = std::env::temp_dir().join(format!("concierge-precheck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.safetensors");
        let ok: Vec<u8> = [1.0f32, -2.0, 0.5].iter().flat_map(|x| x.to_le_bytes()).collect();
        write(&p, &[("w", "F32", ok.clone())]);
        assert_eq!(check_safetensors(&p, DType::F32).unwrap(), 12);
        let full = std::fs::read(&p).unwrap();
        std::fs::write(&p, &full[..full.len() - 3]).unwrap();
        assert!(check_safetensors(&p, DType::F32).unwrap_err().contains("truncated"));
        let nan: Vec<u8> = [1.0f32, f32::NAN].iter().flat_map(|x| x.to_le_bytes()).collect();
        write(&p, &[("w", "F32", ok.clone()), ("b", "F32", nan)]);
        assert!(check_safetensors(&p, DType::F32).unwrap_err().contains("tensor b holds NaN"));
        let f16_inf = vec![0x00, 0x7c];
        write(&p, &[("h", "F16", f16_inf)]);
        assert!(check_safetensors(&p, DType::F32).unwrap_err().contains("NaN or infinite"));
        write(&p, &[("w", "I32", ok.clone())]);
        assert!(check_safetensors(&p, DType::F32).unwrap_err().contains("must be floats"));
        write(&p, &[("embeddings.position_ids", "I64", vec![0; 16])]);
        assert!(check_safetensors(&p, DType::F32).is_ok());
        std::fs::write(&p, b"abc").unwrap();
        assert!(check_safetensors(&p, DType::F32).unwrap_err().contains("not a safetensors file"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
