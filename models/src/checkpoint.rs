//! Where a checkpoint's files come from: a local folder, or the Hugging Face Hub by repo id and
//! revision (through `hf-hub`, honouring `HF_HOME` and `HF_HUB_OFFLINE`). Either way the result
//! is a set of local paths, checked before any weights are read.
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

/// Where to load a model from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A folder holding config.json, tokenizer.json and model.safetensors (and, for
    /// sentence-transformers checkpoints, modules.json, 1_Pooling/config.json and the folders
    /// of any Dense modules, e.g. 2_Dense/{config.json, model.safetensors}).
    Dir(PathBuf),
    /// A Hugging Face Hub repository at a revision (branch, tag or commit).
    Hub { repo: String, revision: String },
}

/// The local files of a text checkpoint.
#[derive(Debug, Clone)]
pub struct TextCheckpoint {
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub weights: PathBuf,
    /// sentence-transformers files, when the checkpoint has them.
    pub modules: Option<PathBuf>,
    pub pooling: Option<PathBuf>,
    /// The modules modules.json lists after Pooling, in order (empty without modules.json).
    pub after_pooling: Vec<AfterPooling>,
    pub sentence_bert_config: Option<PathBuf>,
    /// A display id: the repo id, or the folder's name.
    pub id: String,
    /// The Hub revision, or `sha256:<first 12 hex>` of the weights for a folder.
    pub version: String,
}

/// A sentence-transformers module that runs on the pooled vector, with its local files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterPooling {
    /// `sentence_transformers.models.Dense`: its folder's `config.json` and `model.safetensors`.
    Dense { config: PathBuf, weights: PathBuf },
    /// `sentence_transformers.models.Normalize`.
    Normalize,
}

const DENSE_CONFIG: &str = "the Dense module's config (in_features, out_features, bias, activation_function)";
const DENSE_WEIGHTS: &str = "the Dense module's weights (linear.weight, linear.bias) as model.safetensors; \
     a legacy pytorch_model.bin is not read: load and save the model with a current \
     sentence-transformers (model.save(path)) to get safetensors";

const REQUIRED: [(&str, &str); 3] = [
    ("config.json", "the transformer config (hidden_size, num_hidden_layers, ...)"),
    ("tokenizer.json", "a Hugging Face fast tokenizer"),
    ("model.safetensors", "the weights in safetensors format, named as in PyTorch"),
];

impl ModelSource {
    pub fn resolve_text(&self) -> Result<TextCheckpoint> {
        match self {
            ModelSource::Dir(dir) => resolve_dir(dir),
            ModelSource::Hub { repo, revision } => resolve_hub(repo, revision),
        }
    }

    /// An image checkpoint: `config.json` (a ResNet config) and `model.safetensors`.
    pub fn resolve_image(&self) -> Result<ImageCheckpoint> {
        match self {
            ModelSource::Dir(dir) => {
                if !dir.is_dir() {
                    return Err(ModelError::MissingFile {
                        path: dir.to_owned(),
                        expected: "an image model folder (did the set-up step that fetches the model run?)".into(),
                    });
                }
                let [config, weights] = IMAGE_FILES.map(|(name, what)| {
                    let p = dir.join(name);
                    if p.is_file() { Ok(p) } else { Err(ModelError::MissingFile { path: p, expected: what.into() }) }
                });
                let (config, weights) = (config?, weights?);
                let version = format!("sha256:{}", &files_sha256(&[&weights])?[..12]);
                Ok(ImageCheckpoint { config, weights, id: folder_id(dir), version })
            }
            ModelSource::Hub { repo, revision } => resolve_image_hub_in(repo, revision, None),
        }
    }
}

/// The files an image checkpoint needs.
const IMAGE_FILES: [(&str, &str); 2] = [
    ("config.json", "a ResNet config (block, layers, input conventions)"),
    ("model.safetensors", "the weights in safetensors format, named as torchvision names them"),
];

/// The local files of an image checkpoint.
#[derive(Debug, Clone)]
pub struct ImageCheckpoint {
    pub config: PathBuf,
    pub weights: PathBuf,
    /// A display id: the repo id, or the folder's name.
    pub id: String,
    /// The Hub commit, or `sha256:<first 12 hex>` of the weights for a folder.
    pub version: String,
}

fn resolve_image_hub_in(repo_id: &str, revision: &str, offline_cache: Option<hf_hub::Cache>) -> Result<ImageCheckpoint> {
    let hub = HubFiles::new(repo_id, revision, offline_cache);
    let config = hub.need(IMAGE_FILES[0].0, IMAGE_FILES[0].1)?;
    let weights = hub.need(IMAGE_FILES[1].0, IMAGE_FILES[1].1)?;
    let version = snapshot_commit(&weights).unwrap_or_else(|| revision.to_owned());
    Ok(ImageCheckpoint { config, weights, id: repo_id.to_owned(), version })
}

fn folder_id(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string())
}

fn resolve_dir(dir: &Path) -> Result<TextCheckpoint> {
    if !dir.is_dir() {
        return Err(ModelError::MissingFile {
            path: dir.to_owned(),
            expected: "a model folder (did the set-up step that fetches the model run?)".into(),
        });
    }
    for (name, what) in REQUIRED {
        let p = dir.join(name);
        if !p.is_file() {
            return Err(ModelError::MissingFile { path: p, expected: what.into() });
        }
    }
    let weights = dir.join("model.safetensors");
    let optional = |rel: &str| Some(dir.join(rel)).filter(|p| p.is_file());
    let modules = optional("modules.json");
    let plan = match &modules {
        Some(m) => plan_modules(m)?,
        None => ModulePlan::default(),
    };
    let pooling = match &plan.pooling {
        Some(folder) => {
            let p = dir.join(folder).join("config.json");
            if !p.is_file() {
                return Err(ModelError::MissingFile {
                    path: p,
                    expected: format!("the pooling config that {} names", dir.join("modules.json").display()),
                });
            }
            Some(p)
        }
        None => optional("1_Pooling/config.json"),
    };
    let after_pooling = plan
        .after
        .iter()
        .map(|m| match m {
            Planned::Normalize => Ok(AfterPooling::Normalize),
            Planned::Dense(folder) => dense_files(&dir.join(folder)),
        })
        .collect::<Result<Vec<_>>>()?;
    // The version names the exact weights: the projection's too, when there is one.
    let mut weight_files = vec![weights.as_path()];
    weight_files.extend(after_pooling.iter().filter_map(|m| match m {
        AfterPooling::Dense { weights, .. } => Some(weights.as_path()),
        AfterPooling::Normalize => None,
    }));
    let version = format!("sha256:{}", &files_sha256(&weight_files)?[..12]);
    Ok(TextCheckpoint {
        config: dir.join("config.json"),
        tokenizer: dir.join("tokenizer.json"),
        modules,
        pooling,
        after_pooling,
        sentence_bert_config: optional("sentence_bert_config.json"),
        id: folder_id(dir),
        version,
        weights,
    })
}

/// A Dense module's files in a local folder.
fn dense_files(folder: &Path) -> Result<AfterPooling> {
    let config = folder.join("config.json");
    if !config.is_file() {
        return Err(ModelError::MissingFile { path: config, expected: DENSE_CONFIG.into() });
    }
    let weights = folder.join("model.safetensors");
    if !weights.is_file() {
        let bin = folder.join("pytorch_model.bin");
        if bin.is_file() {
            return Err(ModelError::Unsupported(format!(
                "{}: the Dense module's weights are only in PyTorch's pickle format, and only \
                 model.safetensors is read; load and save the model with a current \
                 sentence-transformers (model.save(path)) to write safetensors",
                bin.display()
            )));
        }
        return Err(ModelError::MissingFile { path: weights, expected: DENSE_WEIGHTS.into() });
    }
    Ok(AfterPooling::Dense { config, weights })
}

#[derive(Debug, Clone)]
pub struct StModule {
    pub kind: String,
    pub path: String,
}

/// Reads sentence-transformers' `modules.json`.
pub fn read_modules(path: &Path) -> Result<Vec<StModule>> {
    let bad = |reason: String| ModelError::BadFile { path: path.to_owned(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let arr = v.as_array().ok_or_else(|| bad("expected a JSON array of modules".into()))?;
    arr.iter()
        .map(|m| {
            let kind = m.get("type").and_then(|t| t.as_str());
            let p = m.get("path").and_then(|t| t.as_str()).unwrap_or("");
            match kind {
                Some(kind) => Ok(StModule { kind: kind.to_owned(), path: p.to_owned() }),
                None => Err(bad("a module has no \"type\"".into())),
            }
        })
        .collect()
}

/// The sentence-transformers modules this loader runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StModuleKind {
    Transformer,
    Pooling,
    Dense,
    Normalize,
}

impl StModule {
    /// The module's kind, or None for a type this loader does not run. sentence-transformers
    /// names the classes `sentence_transformers.models.Dense` up to version 5 and by their
    /// defining module from 6 on (`sentence_transformers.base.modules.dense.Dense`).
    pub fn known_kind(&self) -> Option<StModuleKind> {
        let class = self.kind.strip_prefix("sentence_transformers.")?.rsplit('.').next()?;
        match class {
            "Transformer" => Some(StModuleKind::Transformer),
            "Pooling" => Some(StModuleKind::Pooling),
            "Dense" => Some(StModuleKind::Dense),
            "Normalize" => Some(StModuleKind::Normalize),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
struct ModulePlan {
    /// The Pooling module's folder.
    pooling: Option<String>,
    after: Vec<Planned>,
}

#[derive(Debug)]
enum Planned {
    Dense(String),
    Normalize,
}

/// Checks modules.json against what this loader runs: a Transformer, Pooling, then any number
/// of Dense and Normalize. Anything else is an error naming it, never skipped: a skipped
/// module would give vectors unlike the model's.
fn plan_modules(path: &Path) -> Result<ModulePlan> {
    let mut plan = ModulePlan::default();
    for (i, m) in read_modules(path)?.into_iter().enumerate() {
        let unsupported = |why: &str| {
            ModelError::Unsupported(format!("{}: module {i} ({}, path \"{}\") {why}", path.display(), m.kind, m.path))
        };
        let Some(kind) = m.known_kind() else {
            return Err(unsupported(
                "is not a module this loader runs; it runs sentence_transformers.models.Transformer, \
                 then Pooling, then any of Dense and Normalize",
            ));
        };
        match (kind, plan.pooling.is_some()) {
            (StModuleKind::Transformer, false) => {}
            (StModuleKind::Transformer, true) => return Err(unsupported("comes after Pooling")),
            (StModuleKind::Pooling, false) => plan.pooling = Some(m.path),
            (StModuleKind::Pooling, true) => return Err(unsupported("is a second Pooling")),
            (StModuleKind::Dense | StModuleKind::Normalize, false) => {
                return Err(unsupported("comes before Pooling; only Dense and Normalize after Pooling are run"));
            }
            (StModuleKind::Dense, true) => plan.after.push(Planned::Dense(m.path)),
            (StModuleKind::Normalize, true) => plan.after.push(Planned::Normalize),
        }
    }
    Ok(plan)
}

/// The version string of a folder checkpoint: `sha256:` and the first 12 hex digits of the
/// hash of its weight files.
pub fn weights_version(paths: &[&Path]) -> Result<String> {
    Ok(format!("sha256:{}", &files_sha256(paths)?[..12]))
}

/// sha256 of the files' bytes, one after the other.
fn files_sha256(paths: &[&Path]) -> Result<String> {
    let mut h = Sha256::new();
    for &path in paths {
        let mut f = std::fs::File::open(path)
            .map_err(|e| ModelError::BadFile { path: path.to_owned(), reason: e.to_string() })?;
        std::io::copy(&mut f, &mut h)
            .map_err(|e| ModelError::BadFile { path: path.to_owned(), reason: e.to_string() })?;
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The commit a Hub cache path belongs to (`.../snapshots/<commit>/file`), so responses name
/// the exact weights even when the revision asked for was a branch.
fn snapshot_commit(path: &Path) -> Option<String> {
    let mut parts = path.components().rev().map(|c| c.as_os_str().to_string_lossy().into_owned());
    let mut prev = parts.next()?;
    for part in parts {
        if part == "snapshots" {
            return Some(prev);
        }
        prev = part;
    }
    None
}

/// Files of one Hub repository at a revision, from the network or only from a local cache.
struct HubFiles {
    repo_id: String,
    revision: String,
    repo: hf_hub::Repo,
    offline_cache: Option<hf_hub::Cache>,
}

impl HubFiles {
    /// `offline_cache`: resolve only from that cache (so tests need not set process-wide
    /// environment variables); None: HF_HUB_OFFLINE decides.
    fn new(repo_id: &str, revision: &str, offline_cache: Option<hf_hub::Cache>) -> Self {
        let offline_cache = offline_cache.or_else(|| {
            let offline = std::env::var("HF_HUB_OFFLINE")
                .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "True" | "yes" | "ON" | "on"))
                .unwrap_or(false);
            // Cache::from_env (and, online, ApiBuilder::from_env) follow HF_HOME.
            offline.then(hf_hub::Cache::from_env)
        });
        let repo = hf_hub::Repo::with_revision(repo_id.to_owned(), hf_hub::RepoType::Model, revision.to_owned());
        Self { repo_id: repo_id.to_owned(), revision: revision.to_owned(), repo, offline_cache }
    }

    fn err(&self, file: &str, reason: String) -> ModelError {
        ModelError::Hub { repo: self.repo_id.clone(), revision: self.revision.clone(), file: file.to_owned(), reason }
    }

    fn get(&self, file: &str) -> Result<Option<PathBuf>> {
        if let Some(cache) = &self.offline_cache {
            return Ok(cache.repo(self.repo.clone()).get(file));
        }
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(false)
            .build()
            .map_err(|e| self.err(file, e.to_string()))?;
        match api.repo(self.repo.clone()).get(file) {
            Ok(p) => Ok(Some(p)),
            Err(hf_hub::api::sync::ApiError::RequestError(e)) if e.to_string().contains("404") => Ok(None),
            Err(e) => Err(self.err(file, e.to_string())),
        }
    }

    fn need(&self, file: &str, what: &str) -> Result<PathBuf> {
        self.get(file)?.ok_or_else(|| {
            self.err(
                file,
                if self.offline_cache.is_some() {
                    format!("not in the local cache and HF_HUB_OFFLINE is set; expected {what}")
                } else {
                    format!("not in the repository; expected {what}")
                },
            )
        })
    }
}

/// The folder holding `required` (each named with what it should be, for the error) and those of
/// `optional` that exist, of a Hub repository at a revision: the cache's snapshot folder, from the
/// network or, with HF_HUB_OFFLINE, from the cache alone. For checkpoints loaded from a folder
/// (intent models, taggers) that come from the Hub.
pub fn hub_folder(repo_id: &str, revision: &str, required: &[(&str, &str)], optional: &[&str]) -> Result<PathBuf> {
    hub_folder_in(repo_id, revision, required, optional, None)
}

fn hub_folder_in(
    repo_id: &str,
    revision: &str,
    required: &[(&str, &str)],
    optional: &[&str],
    offline_cache: Option<hf_hub::Cache>,
) -> Result<PathBuf> {
    let hub = HubFiles::new(repo_id, revision, offline_cache);
    let mut folder = None;
    for (file, what) in required {
        let path = hub.need(file, what)?;
        folder.get_or_insert_with(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    for file in optional {
        hub.get(file)?;
    }
    folder.ok_or_else(|| hub.err("", "no files were asked for".into()))
}

fn resolve_hub(repo_id: &str, revision: &str) -> Result<TextCheckpoint> {
    resolve_hub_in(repo_id, revision, None)
}

/// Resolves from the Hub, or only from `offline_cache` when given.
fn resolve_hub_in(repo_id: &str, revision: &str, offline_cache: Option<hf_hub::Cache>) -> Result<TextCheckpoint> {
    let hub = HubFiles::new(repo_id, revision, offline_cache);
    let get = |file: &str| hub.get(file);
    let need = |file: &str, what: &str| hub.need(file, what);
    let config = need(REQUIRED[0].0, REQUIRED[0].1)?;
    let tokenizer = need(REQUIRED[1].0, REQUIRED[1].1)?;
    let weights = need(REQUIRED[2].0, REQUIRED[2].1)?;
    let version = snapshot_commit(&weights).unwrap_or_else(|| revision.to_owned());
    let modules = get("modules.json")?;
    let plan = match &modules {
        Some(m) => plan_modules(m)?,
        None => ModulePlan::default(),
    };
    let pooling = match &plan.pooling {
        Some(folder) => Some(need(&hub_path(folder, "config.json"), "the pooling config that modules.json names")?),
        None => None,
    };
    let after_pooling = plan
        .after
        .iter()
        .map(|m| match m {
            Planned::Normalize => Ok(AfterPooling::Normalize),
            Planned::Dense(folder) => Ok(AfterPooling::Dense {
                config: need(&hub_path(folder, "config.json"), DENSE_CONFIG)?,
                weights: need(&hub_path(folder, "model.safetensors"), DENSE_WEIGHTS)?,
            }),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(TextCheckpoint {
        config,
        tokenizer,
        weights,
        modules,
        pooling,
        after_pooling,
        sentence_bert_config: get("sentence_bert_config.json")?,
        id: repo_id.to_owned(),
        version,
    })
}

/// A file inside a module's folder, as a repository path (modules.json may name the root as "").
fn hub_path(folder: &str, file: &str) -> String {
    let folder = folder.trim_matches('/');
    if folder.is_empty() { file.to_owned() } else { format!("{folder}/{file}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-st-dense");

    /// The tiny Dense fixture laid out as a Hub cache (`models--acme--tiny/snapshots/<commit>`).
    fn hub_cache(tag: &str) -> (PathBuf, PathBuf) {
        let root = std::env::temp_dir().join(format!("concierge-dense-hub-{tag}-{}", std::process::id()));
        let repo = root.join("models--acme--tiny");
        let snap = repo.join("snapshots/89abcdef0123456789abcdef0123456789abcdef");
        for f in ["config.json", "tokenizer.json", "model.safetensors", "modules.json", "sentence_bert_config.json",
            "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors"]
        {
            let to = snap.join(f);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(Path::new(FIXTURE).join(f), to).unwrap();
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "89abcdef0123456789abcdef0123456789abcdef").unwrap();
        (root, snap)
    }

    #[test]
    fn hub_folder_is_the_snapshot_holding_a_heads_files() {
        let (root, snap) = hub_cache("folder");
        let cache = || Some(hf_hub::Cache::new(root.clone()));
        let dir = hub_folder_in("acme/tiny", "main", &[("config.json", "c"), ("model.safetensors", "w")], &["vocab.json"], cache()).unwrap();
        assert_eq!(dir, snap);
        let err = hub_folder_in("acme/tiny", "main", &[("tags.json", "the tag names")], &[], cache()).unwrap_err().to_string();
        assert!(err.contains("tags.json") && err.contains("the tag names"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn hub_resolution_fetches_the_dense_folder() {
        let (root, snap) = hub_cache("ok");
        let ckpt = resolve_hub_in("acme/tiny", "main", Some(hf_hub::Cache::new(root.clone()))).unwrap();
        assert_eq!(ckpt.pooling.as_deref(), Some(snap.join("1_Pooling/config.json").as_path()));
        assert_eq!(
            ckpt.after_pooling,
            vec![
                AfterPooling::Dense { config: snap.join("2_Dense/config.json"), weights: snap.join("2_Dense/model.safetensors") },
                AfterPooling::Normalize,
            ]
        );
        let local = resolve_dir(Path::new(FIXTURE)).unwrap();
        assert_eq!(local.after_pooling.len(), 2);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn image_checkpoints_resolve_from_a_folder_and_the_hub_cache() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resnet18-tiny");
        let local = ModelSource::Dir(fixture.clone()).resolve_image().unwrap();
        assert_eq!(local.id, "resnet18-tiny");
        assert!(local.version.starts_with("sha256:"));
        let root = std::env::temp_dir().join(format!("concierge-image-hub-{}", std::process::id()));
        let commit = "fedcba9876543210fedcba9876543210fedcba98";
        let snap = root.join("models--acme--resnet/snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(root.join("models--acme--resnet/refs")).unwrap();
        std::fs::write(root.join("models--acme--resnet/refs/main"), commit).unwrap();
        std::fs::copy(fixture.join("config.json"), snap.join("config.json")).unwrap();
        let err = resolve_image_hub_in("acme/resnet", "main", Some(hf_hub::Cache::new(root.clone()))).unwrap_err();
        assert!(err.to_string().contains("model.safetensors"), "{err}");
        std::fs::copy(fixture.join("model.safetensors"), snap.join("model.safetensors")).unwrap();
        let hub = resolve_image_hub_in("acme/resnet", "main", Some(hf_hub::Cache::new(root.clone()))).unwrap();
        assert_eq!((hub.id.as_str(), hub.version.as_str()), ("acme/resnet", commit));
        assert_eq!(hub.weights, snap.join("model.safetensors"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn hub_resolution_names_missing_dense_weights() {
        let (root, snap) = hub_cache("missing");
        std::fs::remove_file(snap.join("2_Dense/model.safetensors")).unwrap();
        let err = resolve_hub_in("acme/tiny", "main", Some(hf_hub::Cache::new(root.clone()))).unwrap_err().to_string();
        assert!(err.contains("2_Dense/model.safetensors") && err.contains("pytorch_model.bin is not read"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
