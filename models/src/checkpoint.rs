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
    /// sentence-transformers checkpoints, modules.json and 1_Pooling/config.json).
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
    pub sentence_bert_config: Option<PathBuf>,
    /// A display id: the repo id, or the folder's name.
    pub id: String,
    /// The Hub revision, or `sha256:<first 12 hex>` of the weights for a folder.
    pub version: String,
}

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
    Ok(TextCheckpoint {
        config: dir.join("config.json"),
        tokenizer: dir.join("tokenizer.json"),
        modules: optional("modules.json"),
        pooling: pooling_path(dir, optional("modules.json").as_deref())?,
        sentence_bert_config: optional("sentence_bert_config.json"),
        id: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string()),
        version: format!("sha256:{}", &file_sha256(&weights)?[..12]),
        weights,
    })
}

/// The pooling config's path: the Pooling module's folder named in modules.json, else
/// `1_Pooling/config.json` when present.
fn pooling_path(dir: &Path, modules: Option<&Path>) -> Result<Option<PathBuf>> {
    if let Some(m) = modules {
        for module in read_modules(m)? {
            if module.kind.ends_with("models.Pooling") {
                let p = dir.join(&module.path).join("config.json");
                if !p.is_file() {
                    return Err(ModelError::MissingFile {
                        path: p,
                        expected: format!("the pooling config that {} names", m.display()),
                    });
                }
                return Ok(Some(p));
            }
        }
    }
    Ok(Some(dir.join("1_Pooling/config.json")).filter(|p| p.is_file()))
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

fn file_sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| ModelError::BadFile { path: path.to_owned(), reason: e.to_string() })?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)
        .map_err(|e| ModelError::BadFile { path: path.to_owned(), reason: e.to_string() })?;
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

fn resolve_hub(repo_id: &str, revision: &str) -> Result<TextCheckpoint> {
    use hf_hub::{Cache, Repo, RepoType};
    let repo = Repo::with_revision(repo_id.to_owned(), RepoType::Model, revision.to_owned());
    let offline = std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "True" | "yes" | "ON" | "on"))
        .unwrap_or(false);
    let hub_err = |file: &str, reason: String| ModelError::Hub {
        repo: repo_id.to_owned(),
        revision: revision.to_owned(),
        file: file.to_owned(),
        reason,
    };
    // Cache::from_env and ApiBuilder::from_env both follow HF_HOME.
    let get = |file: &str| -> Result<Option<PathBuf>> {
        if offline {
            Ok(Cache::from_env().repo(repo.clone()).get(file))
        } else {
            let api = hf_hub::api::sync::ApiBuilder::from_env()
                .with_progress(false)
                .build()
                .map_err(|e| hub_err(file, e.to_string()))?;
            match api.repo(repo.clone()).get(file) {
                Ok(p) => Ok(Some(p)),
                Err(hf_hub::api::sync::ApiError::RequestError(e))
                    if e.to_string().contains("404") =>
                {
                    Ok(None)
                }
                Err(e) => Err(hub_err(file, e.to_string())),
            }
        }
    };
    let need = |file: &str, what: &str| -> Result<PathBuf> {
        get(file)?.ok_or_else(|| {
            hub_err(
                file,
                if offline {
                    format!("not in the local cache and HF_HUB_OFFLINE is set; expected {what}")
                } else {
                    format!("not in the repository; expected {what}")
                },
            )
        })
    };
    let config = need(REQUIRED[0].0, REQUIRED[0].1)?;
    let tokenizer = need(REQUIRED[1].0, REQUIRED[1].1)?;
    let weights = need(REQUIRED[2].0, REQUIRED[2].1)?;
    let version = snapshot_commit(&weights).unwrap_or_else(|| revision.to_owned());
    let modules = get("modules.json")?;
    let mut pooling = None;
    if let Some(m) = &modules {
        for module in read_modules(m)? {
            if module.kind.ends_with("models.Pooling") {
                let rel = format!("{}/config.json", module.path);
                pooling = Some(need(&rel, "the pooling config that modules.json names")?);
            }
        }
    }
    Ok(TextCheckpoint {
        config,
        tokenizer,
        weights,
        modules,
        pooling,
        sentence_bert_config: get("sentence_bert_config.json")?,
        id: repo_id.to_owned(),
        version,
    })
}
