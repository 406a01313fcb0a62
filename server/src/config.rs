//! Every setting of the server: one clap struct, each flag with an environment variable,
//! documented in `--help` and in the README's table.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "concierge",
    version,
    about = "concierge: intent, entities, embeddings and knowledge-base search over gRPC",
    args_override_self = true
)]
pub struct Config {
    /// A TOML file of settings: any flag by its long name (`max_batch_size = 64`), and a
    /// `[models.<slot>]` table per model slot (see the README's MLOps section). Flags on the
    /// command line override the file; the file overrides environment variables.
    #[arg(long, env = "CONCIERGE_CONFIG")]
    pub config: Option<PathBuf>,

    /// The admin token: `concierge.v1.Models` calls must bear `authorization: Bearer <token>`.
    /// Unset (and no --admin-token-file): the admin API refuses every call.
    #[arg(long, env = "CONCIERGE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,

    /// A file holding the admin token (first line), so it is not on the command line.
    #[arg(long, env = "CONCIERGE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Version label of a slot's start-up checkpoint, `SLOT=LABEL` (repeatable, or
    /// comma-separated); it is stamped on every answer. Default: the weights' content hash (or
    /// Hub commit). Slots: text-encoder, image-encoder, intent, tagger, query-tower, document-tower.
    #[arg(long = "version-label", env = "CONCIERGE_VERSION_LABELS", value_delimiter = ',')]
    pub version_labels: Vec<String>,

    /// Memory, in MiB, that a model load must leave free for serving (on the CPU): a load that
    /// would leave less is refused with RESOURCE_EXHAUSTED instead of running out of memory.
    #[arg(long, env = "CONCIERGE_LOAD_HEADROOM_MB", default_value_t = 256)]
    pub load_headroom_mb: u64,

    /// Candidates to load after start-up (from the config file's `[models.<slot>.candidate]`).
    #[arg(skip)]
    pub candidates: Vec<StartCandidate>,

    /// Address the gRPC server listens on.
    #[arg(long, env = "CONCIERGE_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,

    /// Address of the Prometheus endpoint (`GET /metrics`).
    #[arg(long, env = "CONCIERGE_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,

    /// Local checkpoint folder (config.json, tokenizer.json, model.safetensors, and the
    /// sentence-transformers files). Used unless --model-id is given.
    #[arg(long, env = "CONCIERGE_MODEL_DIR", default_value = "model-store/all-MiniLM-L6-v2")]
    pub model_dir: PathBuf,

    /// Hugging Face Hub repository id to load instead of --model-dir (honours HF_HOME,
    /// HF_HUB_OFFLINE and HF_ENDPOINT).
    #[arg(long, env = "CONCIERGE_MODEL_ID")]
    pub model_id: Option<String>,

    /// Hub revision (branch, tag or commit) for --model-id.
    #[arg(long, env = "CONCIERGE_REVISION", default_value = "main")]
    pub revision: String,

    /// Device to run models on: `cpu` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, env = "CONCIERGE_DEVICE", default_value = "cpu")]
    pub device: String,

    /// Run on the CPU (with a warning) when the --device GPU cannot be opened, instead of
    /// failing start-up.
    #[arg(long, env = "CONCIERGE_DEVICE_FALLBACK_CPU")]
    pub device_fallback_cpu: bool,

    /// Floating-point type of the weights and activations.
    #[arg(long, env = "CONCIERGE_DTYPE", value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,

    /// Most tokens in one text batch (sum over its inputs).
    #[arg(long, env = "CONCIERGE_MAX_BATCH_TOKENS", default_value_t = 16384)]
    pub max_batch_tokens: usize,

    /// Most inputs in one text batch.
    #[arg(long, env = "CONCIERGE_MAX_BATCH_SIZE", default_value_t = 128)]
    pub max_batch_size: usize,

    /// Longest the oldest queued input waits for its batch to fill, in milliseconds. 0: a batch
    /// takes whatever is queued the moment the device is free (batches still form under load).
    #[arg(long, env = "CONCIERGE_MAX_WAIT_MS", default_value_t = 0)]
    pub max_wait_ms: u64,

    /// Most inputs admitted and not yet answered; beyond it calls get RESOURCE_EXHAUSTED.
    #[arg(long, env = "CONCIERGE_MAX_QUEUED_INPUTS", default_value_t = 4096)]
    pub max_queued_inputs: usize,

    /// Most inputs in one request.
    #[arg(long, env = "CONCIERGE_MAX_CLIENT_BATCH_SIZE", default_value_t = 64)]
    pub max_client_batch_size: usize,

    /// Most tokens in one input (special tokens included); the model's own limit when unset
    /// or larger.
    #[arg(long, env = "CONCIERGE_MAX_INPUT_TOKENS")]
    pub max_input_tokens: Option<usize>,

    /// Largest request message accepted, in bytes (room for a few photos); larger ones get
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "CONCIERGE_MAX_MESSAGE_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Folder of the knowledge base: its write-ahead log and snapshots (created if missing).
    /// One server per folder.
    #[arg(long, env = "CONCIERGE_KB_DIR", default_value = "kb-data")]
    pub kb_dir: PathBuf,

    /// Write a knowledge-base snapshot (and delete the log before it) once this many MiB of log
    /// follow the last one.
    #[arg(long, env = "CONCIERGE_KB_SNAPSHOT_MB", default_value_t = 256)]
    pub kb_snapshot_mb: u64,

    /// Most hits one search may ask for.
    #[arg(long, env = "CONCIERGE_KB_MAX_TOP_K", default_value_t = 1000)]
    pub kb_max_top_k: usize,

    /// Most documents in one upsert (and ids in one delete, pairs in one calibration).
    #[arg(long, env = "CONCIERGE_KB_MAX_UPSERT_DOCUMENTS", default_value_t = 1000)]
    pub kb_max_upsert_documents: usize,

    /// Most searches scanned together in one pass over a collection.
    #[arg(long, env = "CONCIERGE_KB_MAX_SEARCH_BATCH", default_value_t = 64)]
    pub kb_max_search_batch: usize,

    /// Checkpoint folder of the knowledge base's query tower (a sentence-transformers model,
    /// optionally with a Dense projection). Unset: the text model serves as the query tower.
    #[arg(long, env = "CONCIERGE_QUERY_MODEL_DIR")]
    pub query_model_dir: Option<PathBuf>,

    /// Checkpoint folder of the document tower. Unset: the text model serves as the document
    /// tower.
    #[arg(long, env = "CONCIERGE_DOCUMENT_MODEL_DIR")]
    pub document_model_dir: Option<PathBuf>,

    /// Entity tagger folder (BiLSTM-CRF: config.json, model.safetensors, tags.json [, vocab.json]).
    /// The default, an English ATIS slot tagger over the default text model, is committed in
    /// checkpoints/; `checkpoints/entities-zh-msra` is the Chinese one, and
    /// `checkpoints/entities-zh-msra-ensemble` six of those voting (more accurate, about a third as fast).
    #[arg(long, env = "CONCIERGE_ENTITY_MODEL_DIR", default_value = "checkpoints/entities-en-atis")]
    pub entity_model_dir: PathBuf,

    /// Serve no entity tagger; Extract answers UNIMPLEMENTED.
    #[arg(long, env = "CONCIERGE_NO_ENTITY_MODEL")]
    pub no_entity_model: bool,

    /// Intent model folder: a concierge checkpoint (`intent_config.json` + `model.safetensors`,
    /// from `concierge train-intent`) trained on the text model, or a Hugging Face
    /// BertForSequenceClassification folder that is also the text model (--model-dir). The
    /// default, CLINC150 intents over the default text model, is committed in checkpoints/.
    #[arg(long, env = "CONCIERGE_INTENT_MODEL_DIR", default_value = "checkpoints/intents-en-clinc150")]
    pub intent_model_dir: PathBuf,

    /// Serve no intent model; Classify answers UNIMPLEMENTED.
    #[arg(long, env = "CONCIERGE_NO_INTENT_MODEL")]
    pub no_intent_model: bool,

    /// Most characters in one text for a character-level tagger.
    #[arg(long, env = "CONCIERGE_MAX_ENTITY_CHARS", default_value_t = 1000)]
    pub max_entity_chars: usize,

    /// Image model folder: a ResNet `config.json` + `model.safetensors` with torchvision names.
    /// The default, Open-NSFW, is written by scripts/fetch-default-model.sh.
    #[arg(long, env = "CONCIERGE_IMAGE_MODEL_DIR", default_value = "model-store/open-nsfw")]
    pub image_model_dir: PathBuf,

    /// Hugging Face Hub repo of the image model (overrides --image-model-dir).
    #[arg(long, env = "CONCIERGE_IMAGE_MODEL_ID")]
    pub image_model_id: Option<String>,

    /// Hub revision (branch, tag or commit) of --image-model-id.
    #[arg(long, env = "CONCIERGE_IMAGE_REVISION", default_value = "main")]
    pub image_revision: String,

    /// Serve text only: load no image model; EmbedImage answers UNIMPLEMENTED.
    #[arg(long, env = "CONCIERGE_NO_IMAGE_MODEL")]
    pub no_image_model: bool,

    /// Most images in one device batch.
    #[arg(long, env = "CONCIERGE_MAX_IMAGE_BATCH_SIZE", default_value_t = 32)]
    pub max_image_batch_size: usize,

    /// Milliseconds the oldest waiting image may wait for its batch to fill (0: run what is
    /// there as soon as the device is free).
    #[arg(long, env = "CONCIERGE_MAX_IMAGE_WAIT_MS", default_value_t = 0)]
    pub max_image_wait_ms: u64,

    /// Most images admitted and not yet answered; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CONCIERGE_MAX_QUEUED_IMAGES", default_value_t = 512)]
    pub max_queued_images: usize,

    /// Most images in one EmbedImage request (in one Classify request: over all its queries).
    #[arg(long, env = "CONCIERGE_MAX_CLIENT_IMAGES", default_value_t = 16)]
    pub max_client_images: usize,

    /// Most bytes in one encoded image.
    #[arg(long, env = "CONCIERGE_MAX_IMAGE_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_image_bytes: usize,

    /// Most pixels (width x height, read from the header before decoding) in one image.
    #[arg(long, env = "CONCIERGE_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,

    /// Images decoded at once (each holds up to --max-image-pixels x 3 bytes while it
    /// decodes). Default: the number of CPUs.
    #[arg(long, env = "CONCIERGE_IMAGE_DECODE_THREADS")]
    pub image_decode_threads: Option<usize>,

    /// unsafe_score at or above which an image is `flagged`.
    #[arg(long, env = "CONCIERGE_IMAGE_MODERATION_THRESHOLD", default_value_t = 0.8)]
    pub image_moderation_threshold: f32,

    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT before exiting anyway.
    #[arg(long, env = "CONCIERGE_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, env = "CONCIERGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// A value that must not reach the logs (the configuration is logged at start-up).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// A candidate named in the config file: loaded once the server is up, then given its share.
#[derive(Debug, Clone)]
pub struct StartCandidate {
    pub slot: String,
    pub source: concierge_models::ModelSource,
    pub version: String,
    pub traffic_percent: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl DTypeArg {
    pub fn to_candle(self) -> candle_core::DType {
        match self {
            DTypeArg::F32 => candle_core::DType::F32,
            DTypeArg::F16 => candle_core::DType::F16,
            DTypeArg::Bf16 => candle_core::DType::BF16,
        }
    }
}

impl Config {
    /// Parses the command line (and the environment), with the `--config` file's settings
    /// under the command line's.
    pub fn from_args_and_file() -> anyhow::Result<Config> {
        Self::parse_from_with_file(std::env::args_os().collect())
    }

    /// [`Self::from_args_and_file`] for the given arguments (the first is the program name).
    pub fn parse_from_with_file(args: Vec<std::ffi::OsString>) -> anyhow::Result<Config> {
        let first = Config::try_parse_from(&args)?;
        let Some(path) = first.config.clone() else { return Ok(first) };
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("cannot read --config {}: {e}", path.display()))?;
        let (file_args, candidates) =
            file_settings(&text).map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
        let mut all = vec![args.first().cloned().unwrap_or_else(|| "concierge".into())];
        all.extend(file_args.into_iter().map(Into::into));
        all.extend(args.into_iter().skip(1));
        let mut config = Config::try_parse_from(all).map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
        config.candidates = candidates;
        Ok(config)
    }

    /// The start-up version label of `slot`, if one is set.
    pub fn version_label(&self, slot: &str) -> Option<&str> {
        self.version_labels.iter().filter_map(|s| s.split_once('=')).find(|(k, _)| k.trim() == slot).map(|(_, v)| v.trim())
    }

    /// The admin token, from --admin-token or the first line of --admin-token-file.
    pub fn admin_token(&self) -> anyhow::Result<Option<String>> {
        if let Some(Secret(t)) = &self.admin_token {
            return Ok(Some(t.trim().to_string()).filter(|t| !t.is_empty()));
        }
        match &self.admin_token_file {
            None => Ok(None),
            Some(p) => {
                let s = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("cannot read --admin-token-file {}: {e}", p.display()))?;
                let t = s.lines().next().unwrap_or("").trim().to_string();
                anyhow::ensure!(!t.is_empty(), "--admin-token-file {} is empty", p.display());
                Ok(Some(t))
            }
        }
    }

    /// Where the text model comes from.
    pub fn model_source(&self) -> concierge_models::ModelSource {
        match &self.model_id {
            Some(repo) => concierge_models::ModelSource::Hub { repo: repo.clone(), revision: self.revision.clone() },
            None => concierge_models::ModelSource::Dir(self.model_dir.clone()),
        }
    }

    /// Where the image model comes from.
    pub fn image_model_source(&self) -> concierge_models::ModelSource {
        match &self.image_model_id {
            Some(repo) => concierge_models::ModelSource::Hub { repo: repo.clone(), revision: self.image_revision.clone() },
            None => concierge_models::ModelSource::Dir(self.image_model_dir.clone()),
        }
    }

    pub fn image_decode_threads(&self) -> usize {
        self.image_decode_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2))
    }

    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }

    /// The device named by --device. A GPU that cannot be opened (no CUDA in this build, no
    /// driver, no such device, a card older than the build's compute capability) fails start-up
    /// with what to fix, or, with --device-fallback-cpu, runs on the CPU with a warning.
    pub fn candle_device(&self) -> anyhow::Result<candle_core::Device> {
        let d = self.device.trim();
        if d == "cpu" {
            return Ok(candle_core::Device::Cpu);
        }
        let ordinal = d
            .strip_prefix("cuda:")
            .or_else(|| (d == "cuda").then_some("0"))
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| anyhow::anyhow!("--device {d:?}: expected `cpu` or `cuda:N`"))?;
        match open_cuda(ordinal) {
            Ok(device) => Ok(device),
            Err(e) if self.device_fallback_cpu => {
                tracing::warn!("{e:#}; --device-fallback-cpu is set, so every model runs on the CPU");
                Ok(candle_core::Device::Cpu)
            }
            Err(e) => Err(e),
        }
    }

    /// Settings that cannot work together, caught before anything starts.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.max_batch_size > 0, "--max-batch-size must be at least 1");
        anyhow::ensure!(self.max_batch_tokens > 0, "--max-batch-tokens must be at least 1");
        anyhow::ensure!(self.max_client_batch_size > 0, "--max-client-batch-size must be at least 1");
        anyhow::ensure!(self.max_queued_inputs >= self.max_client_batch_size,
            "--max-queued-inputs ({}) must be at least --max-client-batch-size ({}), or no full request could ever be admitted",
            self.max_queued_inputs, self.max_client_batch_size);
        anyhow::ensure!(self.kb_max_top_k > 0, "--kb-max-top-k must be at least 1");
        anyhow::ensure!(self.kb_max_search_batch > 0, "--kb-max-search-batch must be at least 1");
        anyhow::ensure!(self.kb_max_upsert_documents > 0, "--kb-max-upsert-documents must be at least 1");
        anyhow::ensure!(self.max_image_batch_size > 0, "--max-image-batch-size must be at least 1");
        anyhow::ensure!(self.max_client_images > 0, "--max-client-images must be at least 1");
        anyhow::ensure!(self.max_queued_images >= self.max_client_images,
            "--max-queued-images ({}) must be at least --max-client-images ({}), or no full request could ever be admitted",
            self.max_queued_images, self.max_client_images);
        anyhow::ensure!(self.max_image_bytes > 0 && self.max_image_pixels > 0, "--max-image-bytes and --max-image-pixels must be at least 1");
        anyhow::ensure!(self.image_decode_threads() > 0, "--image-decode-threads must be at least 1");
        anyhow::ensure!((0.0..=1.0).contains(&self.image_moderation_threshold),
            "--image-moderation-threshold must be a probability in [0, 1], got {}", self.image_moderation_threshold);
        for l in &self.version_labels {
            let (slot, label) = l.split_once('=').ok_or_else(|| anyhow::anyhow!("--version-label {l:?}: expected SLOT=LABEL"))?;
            anyhow::ensure!(SLOTS.contains(&slot.trim()), "--version-label {l:?}: no slot is called {slot:?}; the slots are {}", SLOTS.join(", "));
            anyhow::ensure!(!label.trim().is_empty(), "--version-label {l:?}: the label is empty");
        }
        if let Some(m) = self.max_input_tokens {
            anyhow::ensure!(m >= 2, "--max-input-tokens must leave room for the special tokens (at least 2)");
        }
        Ok(())
    }
}

/// Opens GPU `ordinal` and checks that this build's kernels can run on it.
fn open_cuda(ordinal: usize) -> anyhow::Result<candle_core::Device> {
    let flag = format!("--device cuda:{ordinal}");
    if !candle_core::utils::cuda_is_available() {
        anyhow::bail!("{flag}: this binary was built without CUDA; rebuild with `--features cuda` (scripts/build-cuda.sh) or use --device cpu");
    }
    // cudarc loads libcuda.so.1 on first use and panics when it cannot.
    let opened = std::panic::catch_unwind(|| candle_core::Device::new_cuda(ordinal)).map_err(|p| {
        let why = concierge_engine::panic_message(p.as_ref());
        anyhow::anyhow!("{}", why.unwrap_or_else(|| "the CUDA driver library could not be loaded".into()))
    });
    let device = opened.and_then(|r| r.map_err(anyhow::Error::from)).map_err(|e| {
        anyhow::anyhow!(
            "{flag}: cannot open the GPU ({e}); check that the NVIDIA driver is installed (libcuda.so.1, `nvidia-smi`), that \
             LD_LIBRARY_PATH finds libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libcudart.so.13 and libnvrtc.so.13 \
             (README, CUDA), and that GPU {ordinal} exists; or use --device cpu, or --device-fallback-cpu"
        )
    })?;
    check_compute_capability(&device, &flag)?;
    Ok(device)
}

/// The compute capability the CUDA kernels were built for (CUDA_COMPUTE_CAP at build time).
pub const BUILT_COMPUTE_CAP: Option<&str> = option_env!("CUDA_COMPUTE_CAP");

/// Whether kernels built for compute capability `built` (e.g. 90) run on a card of `card`:
/// candle's kernels are PTX, which the driver compiles for the same or a newer card, never for
/// an older one.
pub fn compute_capability_fits(built: u32, card: u32) -> bool {
    card >= built
}

#[cfg(feature = "cuda")]
fn check_compute_capability(device: &candle_core::Device, flag: &str) -> anyhow::Result<()> {
    let (major, minor) = device.as_cuda_device()?.cuda_stream().context().compute_capability()?;
    let card = (major * 10 + minor) as u32;
    if let Some(built) = BUILT_COMPUTE_CAP.and_then(|c| c.trim().parse::<u32>().ok()) {
        anyhow::ensure!(
            compute_capability_fits(built, card),
            "{flag}: this binary's CUDA kernels were built for compute capability {built}, but the GPU is {major}.{minor}; \
             rebuild with CUDA_COMPUTE_CAP={card} scripts/build-cuda.sh"
        );
        if built != card {
            tracing::warn!(built, card, "the GPU is newer than the build's compute capability; its kernels are compiled from PTX at start-up");
        }
    }
    tracing::info!(card = %format!("{major}.{minor}"), built = ?BUILT_COMPUTE_CAP, "GPU opened");
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn check_compute_capability(_: &candle_core::Device, _: &str) -> anyhow::Result<()> {
    Ok(())
}

/// The model slots, as the config file and --version-label name them.
const SLOTS: [&str; 6] = ["text-encoder", "image-encoder", "intent", "tagger", "query-tower", "document-tower"];

/// A config file's settings as command-line arguments, and its candidates. Top-level keys are
/// flags by long name (`true` turns a switch on, arrays repeat the flag); `[models.<slot>]`
/// tables give each slot's `dir` (or `hub` + `revision` where the slot takes a Hub repo),
/// `version` (its label), `enabled = false` (serve without it), and an optional `candidate`
/// table (`dir`/`hub`/`revision`, `version`, `traffic_percent`).
fn file_settings(text: &str) -> anyhow::Result<(Vec<String>, Vec<StartCandidate>)> {
    let table: toml::Table = text.parse().map_err(|e| anyhow::anyhow!("not valid TOML: {e}"))?;
    let mut args = Vec::new();
    let mut candidates = Vec::new();
    let scalar = |key: &str, v: &toml::Value| -> anyhow::Result<String> {
        Ok(match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            other => anyhow::bail!("{key}: expected a string or a number, got {other}"),
        })
    };
    for (key, value) in &table {
        if key == "models" {
            continue;
        }
        anyhow::ensure!(key != "config", "a config file cannot name another (config = ...)");
        let flag = format!("--{}", key.replace('_', "-"));
        match value {
            toml::Value::Boolean(true) => args.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    args.push(flag.clone());
                    args.push(scalar(key, item)?);
                }
            }
            toml::Value::Table(_) => anyhow::bail!("{key}: unexpected table; only [models.<slot>] tables are known"),
            v => {
                args.push(flag);
                args.push(scalar(key, v)?);
            }
        }
    }
    let Some(models) = table.get("models") else { return Ok((args, candidates)) };
    let models = models.as_table().ok_or_else(|| anyhow::anyhow!("models: expected [models.<slot>] tables"))?;
    for (slot, entry) in models {
        anyhow::ensure!(SLOTS.contains(&slot.as_str()), "[models.{slot}]: no slot is called {slot:?}; the slots are {}", SLOTS.join(", "));
        let entry = entry.as_table().ok_or_else(|| anyhow::anyhow!("models.{slot}: expected a table"))?;
        let (dir_flag, hub_flag, rev_flag, off_flag) = match slot.as_str() {
            "text-encoder" => ("--model-dir", Some("--model-id"), Some("--revision"), None),
            "image-encoder" => ("--image-model-dir", Some("--image-model-id"), Some("--image-revision"), Some("--no-image-model")),
            "intent" => ("--intent-model-dir", None, None, Some("--no-intent-model")),
            "tagger" => ("--entity-model-dir", None, None, Some("--no-entity-model")),
            "query-tower" => ("--query-model-dir", None, None, None),
            _ => ("--document-model-dir", None, None, None),
        };
        for (k, v) in entry {
            let s = |v: &toml::Value| scalar(&format!("models.{slot}.{k}"), v);
            match k.as_str() {
                "dir" => args.extend([dir_flag.to_string(), s(v)?]),
                "hub" | "revision" => {
                    let flag = if k == "hub" { hub_flag } else { rev_flag };
                    let flag = flag.ok_or_else(|| {
                        anyhow::anyhow!("models.{slot}.{k}: the {slot} slot starts from a folder (dir = ...); load a Hub checkpoint into it with the admin API's Load")
                    })?;
                    args.extend([flag.to_string(), s(v)?]);
                }
                "version" => args.extend(["--version-label".to_string(), format!("{slot}={}", s(v)?)]),
                "enabled" => match (v.as_bool(), off_flag) {
                    (Some(true), _) => {}
                    (Some(false), Some(off)) => args.push(off.to_string()),
                    (Some(false), None) => anyhow::bail!("models.{slot}.enabled: the {slot} slot cannot be turned off"),
                    (None, _) => anyhow::bail!("models.{slot}.enabled: expected true or false"),
                },
                "candidate" => {
                    let c = v.as_table().ok_or_else(|| anyhow::anyhow!("models.{slot}.candidate: expected a table"))?;
                    let get = |name: &str| c.get(name).map(|v| scalar(&format!("models.{slot}.candidate.{name}"), v)).transpose();
                    let source = match (get("dir")?, get("hub")?) {
                        (Some(d), None) => concierge_models::ModelSource::Dir(d.into()),
                        (None, Some(repo)) => concierge_models::ModelSource::Hub { repo, revision: get("revision")?.unwrap_or_else(|| "main".into()) },
                        _ => anyhow::bail!("models.{slot}.candidate: give exactly one of dir or hub"),
                    };
                    let version = get("version")?.ok_or_else(|| anyhow::anyhow!("models.{slot}.candidate.version: a candidate needs a version label"))?;
                    let traffic_percent: f32 = get("traffic_percent")?.map(|p| p.parse()).transpose()
                        .map_err(|e| anyhow::anyhow!("models.{slot}.candidate.traffic_percent: {e}"))?.unwrap_or(0.0);
                    anyhow::ensure!((0.0..=100.0).contains(&traffic_percent), "models.{slot}.candidate.traffic_percent must be in 0..100");
                    candidates.push(StartCandidate { slot: slot.clone(), source, version, traffic_percent });
                }
                other => anyhow::bail!("models.{slot}.{other}: unknown key; expected dir, hub, revision, version, enabled or candidate"),
            }
        }
    }
    Ok((args, candidates))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_sets_flags_under_the_command_line() {
        let dir = std::env::temp_dir().join(format!("concierge-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("concierge.toml");
        std::fs::write(
            &path,
            r#"
max_batch_size = 7
no_image_model = true
[models.text-encoder]
dir = "some/model"
version = "enc-v1"
[models.intent]
dir = "some/intents"
version = "int-v1"
[models.intent.candidate]
dir = "some/intents-v2"
version = "int-v2"
traffic_percent = 10
"#,
        )
        .unwrap();
        let args = |extra: &[&str]| {
            let mut a: Vec<std::ffi::OsString> = vec!["concierge".into(), "--config".into(), path.clone().into()];
            a.extend(extra.iter().map(Into::into));
            Config::parse_from_with_file(a).unwrap()
        };
        let c = args(&[]);
        assert_eq!(c.max_batch_size, 7);
        assert!(c.no_image_model);
        assert_eq!(c.model_dir, PathBuf::from("some/model"));
        assert_eq!(c.version_label("text-encoder"), Some("enc-v1"));
        assert_eq!(c.version_label("intent"), Some("int-v1"));
        assert_eq!(c.candidates.len(), 1);
        assert_eq!((c.candidates[0].slot.as_str(), c.candidates[0].version.as_str(), c.candidates[0].traffic_percent), ("intent", "int-v2", 10.0));
        let c = args(&["--max-batch-size", "9", "--admin-token", "hunter2"]);
        assert!(!format!("{c:?}").contains("hunter2"), "the logged configuration must not show the admin token");
        assert_eq!(c.admin_token().unwrap().as_deref(), Some("hunter2"));
        assert_eq!(c.max_batch_size, 9, "the command line overrides the file");
        std::fs::write(&path, "[models.intnet]\ndir = \"x\"\n").unwrap();
        let e = Config::parse_from_with_file(vec!["concierge".into(), "--config".into(), path.clone().into()]).unwrap_err();
        assert!(e.to_string().contains("no slot is called \"intnet\""), "{e}");

        std::fs::remove_dir_all(&dir).ok();
    }
}

#[cfg(test)]
mod device_tests {
    use clap::Parser;

    #[test]
    fn a_gpu_this_build_cannot_open_fails_start_up_or_falls_back() {
        let mut c = super::Config::try_parse_from(["concierge", "--device", "cuda:0"]).unwrap();
        if candle_core::utils::cuda_is_available() {
            eprintln!("skipped: this is a CUDA build; the GPU checks run on a GPU machine");
            return;
        }
        let e = c.candle_device().unwrap_err().to_string();
        assert!(e.contains("built without CUDA") && e.contains("--device cpu"), "{e}");
        c.device_fallback_cpu = true;
        assert!(c.candle_device().unwrap().is_cpu());
        let c = super::Config::try_parse_from(["concierge", "--device", "gpu0"]).unwrap();
        assert!(c.candle_device().unwrap_err().to_string().contains("expected `cpu` or `cuda:N`"));
    }

    #[test]
    fn kernels_run_on_the_same_or_a_newer_card_only() {
        assert!(super::compute_capability_fits(90, 90));
        assert!(super::compute_capability_fits(80, 90));
        assert!(!super::compute_capability_fits(90, 86));
    }
}
