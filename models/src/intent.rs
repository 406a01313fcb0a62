//! Intent classification over the text encoder: token states -> (optional fine-tuned top
//! layers) -> (optional cross-attention to image features) -> pooling -> MLP -> label scores,
//! plus the *handoff* decision a customer-service backend acts on (hand the conversation to a
//! human when the top score is under a threshold calibrated on validation data, or when the
//! predicted label means out-of-scope).
//!
//! Two checkpoint formats load as they are:
//! - **concierge** (`intent_config.json` + `model.safetensors`, written by `concierge
//!   train-intent`): `head.hidden.N.{weight,bias}` (GELU between), `head.out.{weight,bias}`;
//!   when the top encoder layers were fine-tuned, their weights as `encoder.layer.N.*`
//!   (PyTorch's BERT names, absolute layer numbers) with the encoder's `encoder_config.json`,
//!   so serving taps the shared encoder's states after layer `branch_from` and runs the
//!   intent's own copies of the layers above (one shared pass plus the branch); `fusion.*` for
//!   the text×image block ([`crate::fusion`]).
//! - **Hugging Face `BertForSequenceClassification`** (`config.json` with `id2label`,
//!   `model.safetensors` with `bert.*`, `bert.pooler.dense.*`, `classifier.*`): the head is
//!   `classifier(tanh(pooler.dense([CLS])))` over the final states of *that* checkpoint's
//!   encoder, so it is served with the same folder as the text model.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::bert::{BertLayers, Config as BertConfig};
use crate::encoder::read_json;
use crate::error::{ModelError, Result};
use crate::fusion::{CrossAttentionFusion, FusionConfig};

/// How the head reduces an input's token states to one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntentPooling {
    /// Mean over the input's tokens (sentence-transformers' pooling of the default encoder).
    Mean,
    /// BERT's pooler: `tanh(W h_[CLS] + b)` (`BertForSequenceClassification`).
    ClsPooler,
}

/// The encoder a head was trained on: serving refuses a head whose encoder is not the one loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncoderRef {
    pub id: String,
    pub version: String,
}

/// `intent_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntentConfig {
    pub labels: Vec<String>,
    pub pooling: IntentPooling,
    /// Width of the pooled vector (the encoder's hidden size).
    pub input_dim: usize,
    /// Hidden widths of the MLP before the output layer (empty: a linear head).
    #[serde(default)]
    pub hidden: Vec<usize>,
    /// Top score under which the answer hands off to a human (calibrated on validation data).
    pub handoff_threshold: f32,
    /// Labels that mean "not something we handle" (CLINC150's `oos`): predicting one hands off.
    #[serde(default)]
    pub out_of_scope_labels: Vec<String>,
    /// With fine-tuned top layers: the encoder layer whose output they continue from.
    #[serde(default)]
    pub branch_from: Option<usize>,
    #[serde(default)]
    pub fusion: Option<FusionConfig>,
    pub encoder: Option<EncoderRef>,
    /// The image encoder whose feature maps the fusion block was trained on.
    #[serde(default)]
    pub image_encoder: Option<EncoderRef>,
    /// Free-form training provenance (data, command, scores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<serde_json::Value>,
}

/// A scored label.
#[derive(Debug, Clone, PartialEq)]
pub struct IntentScore {
    pub label: String,
    pub score: f32,
}

/// One input's answer: every label's probability, best first, and the handoff decision.
#[derive(Debug, Clone, PartialEq)]
pub struct IntentResult {
    pub intents: Vec<IntentScore>,
    pub handoff: bool,
}

/// What the checkpoint folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntentFormat {
    Concierge,
    HfSequenceClassification,
}

struct DenseLayer {
    w: Tensor,
    b: Tensor,
}

impl DenseLayer {
    fn load(vb: &VarBuilder, d_in: usize, d_out: usize) -> Result<Self> {
        Ok(Self { w: vb.get((d_out, d_in), "weight")?, b: vb.get(d_out, "bias")? })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.w.t()?)?.broadcast_add(&self.b)?)
    }
}

pub struct IntentModel {
    config: IntentConfig,
    format: IntentFormat,
    branch: Option<BertLayers>,
    fusion: Option<CrossAttentionFusion>,
    pooler: Option<DenseLayer>,
    hidden: Vec<DenseLayer>,
    out: DenseLayer,
    dir: PathBuf,
}

#[derive(Deserialize)]
struct HfLabels {
    id2label: std::collections::BTreeMap<String, String>,
    hidden_size: usize,
}

impl IntentModel {
    /// Which format `dir` holds, if either.
    pub fn detect(dir: &Path) -> Option<IntentFormat> {
        if dir.join("intent_config.json").is_file() {
            return Some(IntentFormat::Concierge);
        }
        let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        (v.get("id2label").is_some() && dir.join("model.safetensors").is_file()).then_some(IntentFormat::HfSequenceClassification)
    }

    /// Loads either format from a folder (f32: the heads are small; the branch layers use the
    /// same fused CPU kernels as the encoder).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        match Self::detect(dir) {
            Some(IntentFormat::Concierge) => Self::load_concierge(dir, device),
            Some(IntentFormat::HfSequenceClassification) => Self::load_hf(dir, device),
            None => Err(ModelError::MissingFile {
                path: dir.join("intent_config.json"),
                expected: "an intent checkpoint: intent_config.json + model.safetensors (concierge train-intent), \
                           or a Hugging Face BertForSequenceClassification folder (config.json with id2label + model.safetensors)"
                    .into(),
            }),
        }
    }

    fn weights(dir: &Path, device: &Device) -> Result<VarBuilder<'static>> {
        let path = dir.join("model.safetensors");
        if !path.is_file() {
            return Err(ModelError::MissingFile { path, expected: "the intent model's weights".into() });
        }
        // SAFETY: memory-mapped read-only; checkpoint folders are replaced, never edited in place.
        unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, device) }
            .map_err(|e| ModelError::BadFile { path, reason: e.to_string() })
    }

    fn load_concierge(dir: &Path, device: &Device) -> Result<Self> {
        let config: IntentConfig = read_json(&dir.join("intent_config.json"), "an intent_config.json")?;
        if config.labels.is_empty() {
            return Err(ModelError::BadFile { path: dir.join("intent_config.json"), reason: "no labels".into() });
        }
        let vb = Self::weights(dir, device)?;
        let bad = |e: ModelError| match e {
            ModelError::Candle(c) => ModelError::BadFile {
                path: dir.join("model.safetensors"),
                reason: format!("does not match intent_config.json: {c}"),
            },
            other => other,
        };
        let branch = match config.branch_from {
            None => None,
            Some(from) => {
                let bert: BertConfig = crate::bert::read_config(&dir.join("encoder_config.json"))?;
                if bert.hidden_size != config.input_dim {
                    return Err(ModelError::BadFile {
                        path: dir.join("encoder_config.json"),
                        reason: format!("hidden_size {} but input_dim {}", bert.hidden_size, config.input_dim),
                    });
                }
                Some(BertLayers::load(vb.clone(), &bert, from..bert.num_hidden_layers).map_err(bad)?)
            }
        };
        let fusion = match &config.fusion {
            None => None,
            Some(f) => Some(CrossAttentionFusion::load(vb.pp("fusion"), f).map_err(bad)?),
        };
        let (hidden, out) = Self::mlp(&vb.pp("head"), &config).map_err(bad)?;
        Ok(Self { format: IntentFormat::Concierge, branch, fusion, pooler: None, hidden, out, dir: dir.to_owned(), config })
    }

    fn mlp(vb: &VarBuilder, config: &IntentConfig) -> Result<(Vec<DenseLayer>, DenseLayer)> {
        let mut d = config.input_dim;
        let mut hidden = Vec::new();
        for (i, &h) in config.hidden.iter().enumerate() {
            hidden.push(DenseLayer::load(&vb.pp(format!("hidden.{i}")), d, h)?);
            d = h;
        }
        Ok((hidden, DenseLayer::load(&vb.pp("out"), d, config.labels.len())?))
    }

    fn load_hf(dir: &Path, device: &Device) -> Result<Self> {
        let path = dir.join("config.json");
        let hf: HfLabels = read_json(&path, "a BertForSequenceClassification config.json (id2label, hidden_size)")?;
        let mut labels = vec![String::new(); hf.id2label.len()];
        for (k, v) in &hf.id2label {
            let i: usize = k.parse().ok().filter(|&i| i < labels.len()).ok_or_else(|| ModelError::BadFile {
                path: path.clone(),
                reason: format!("id2label key {k:?} is not an index below {}", labels.len()),
            })?;
            labels[i] = v.clone();
        }
        let vb = Self::weights(dir, device)?;
        let root = if vb.contains_tensor("bert.pooler.dense.weight") { vb.pp("bert") } else { vb.clone() };
        let h = hf.hidden_size;
        let missing = |e: ModelError| match e {
            ModelError::Candle(c) => ModelError::BadFile {
                path: dir.join("model.safetensors"),
                reason: format!("not a BertForSequenceClassification checkpoint (pooler.dense and classifier expected): {c}"),
            },
            other => other,
        };
        let pooler = DenseLayer::load(&root.pp("pooler.dense"), h, h).map_err(missing)?;
        let out = DenseLayer::load(&vb.pp("classifier"), h, labels.len()).map_err(missing)?;
        let oos = labels.iter().filter(|l| is_out_of_scope_name(l)).cloned().collect();
        let config = IntentConfig {
            labels,
            pooling: IntentPooling::ClsPooler,
            input_dim: h,
            hidden: Vec::new(),
            // A plain classifier carries no calibration: hand off only under a coin flip.
            handoff_threshold: 0.5,
            out_of_scope_labels: oos,
            branch_from: None,
            fusion: None,
            encoder: None,
            image_encoder: None,
            training: None,
        };
        Ok(Self { format: IntentFormat::HfSequenceClassification, branch: None, fusion: None, pooler: Some(pooler), hidden: Vec::new(), out, dir: dir.to_owned(), config })
    }

    pub fn config(&self) -> &IntentConfig {
        &self.config
    }

    pub fn format(&self) -> IntentFormat {
        self.format
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn labels(&self) -> &[String] {
        &self.config.labels
    }

    /// The encoder layer whose states this head reads (`None`: the last layer's).
    pub fn tap(&self) -> Option<usize> {
        self.branch.as_ref().map(|b| b.first())
    }

    /// Whether image features can be fused in (the checkpoint has a fusion block).
    pub fn has_fusion(&self) -> bool {
        self.fusion.is_some()
    }

    /// Image channels the fusion block expects.
    pub fn image_channels(&self) -> Option<usize> {
        self.fusion.as_ref().map(|f| f.config().image_channels)
    }

    /// Logits `[B, labels]` from packed token states `[T, H]` (the encoder's states after layer
    /// [`Self::tap`], or its last layer's when that is None). `images[i]`, when given, holds
    /// input `i`'s image positions `[N, C]` (every image's feature map, see
    /// [`CrossAttentionFusion::positions`], concatenated); inputs without images take the
    /// text-only path.
    pub fn logits(&self, states: &Tensor, lens: &[usize], images: &[Option<Tensor>]) -> Result<Tensor> {
        let total: usize = lens.iter().sum();
        if states.dim(0)? != total || lens.contains(&0) {
            return Err(ModelError::InvalidInput("token states and lengths do not agree".into()));
        }
        if !images.is_empty() && images.len() != lens.len() {
            return Err(ModelError::InvalidInput(format!("{} image sets for {} inputs", images.len(), lens.len())));
        }
        // The head's weights are f32 whatever the encoder's dtype.
        let states = states.to_dtype(DType::F32)?;
        let x = match &self.branch {
            Some(b) => b.forward(&states, lens)?,
            None => states,
        };
        let mut pooled = Vec::with_capacity(lens.len());
        let mut start = 0;
        for (i, &len) in lens.iter().enumerate() {
            let mut rows = x.narrow(0, start, len)?;
            start += len;
            if let Some(img) = images.get(i).and_then(|o| o.as_ref()) {
                let fusion = self.fusion.as_ref().ok_or_else(|| {
                    ModelError::InvalidInput("this intent model has no fusion block: it takes text only".into())
                })?;
                rows = fusion.forward(&rows.unsqueeze(0)?, &img.to_dtype(DType::F32)?.unsqueeze(0)?, None)?.squeeze(0)?;
            }
            pooled.push(match (&self.pooler, self.config.pooling) {
                (Some(p), _) => p.forward(&rows.narrow(0, 0, 1)?)?.tanh()?,
                (None, IntentPooling::ClsPooler) => rows.narrow(0, 0, 1)?,
                (None, IntentPooling::Mean) => rows.mean_keepdim(0)?,
            });
        }
        let mut h = Tensor::cat(&pooled, 0)?;
        for layer in &self.hidden {
            h = layer.forward(&h)?.gelu_erf()?;
        }
        self.out.forward(&h)
    }

    /// Every label's probability (softmax of [`Self::logits`]), one row per input, in the order
    /// of [`Self::labels`].
    pub fn probabilities(&self, states: &Tensor, lens: &[usize], images: &[Option<Tensor>]) -> Result<Vec<Vec<f32>>> {
        let logits = self.logits(states, lens, images)?;
        Ok(candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()?)
    }

    /// Probabilities (softmax of [`Self::logits`]) and the handoff decision per input: see
    /// [`Self::rank`].
    pub fn classify(&self, logits: &Tensor, top_k: usize, threshold: Option<f32>) -> Result<Vec<IntentResult>> {
        let probs = candle_nn::ops::softmax(logits, D::Minus1)?.to_vec2::<f32>()?;
        Ok(probs.iter().map(|p| self.rank(p, top_k, threshold)).collect())
    }

    /// One input's answer from its probabilities (in label order): `intents` best first, cut to
    /// `top_k` (0: all); handoff when the top probability is under `threshold` (None: the
    /// checkpoint's) or the top label is out-of-scope.
    pub fn rank(&self, probs: &[f32], top_k: usize, threshold: Option<f32>) -> IntentResult {
        let threshold = threshold.unwrap_or(self.config.handoff_threshold);
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let handoff = match order.first() {
            Some(&best) => probs[best] < threshold || self.config.out_of_scope_labels.contains(&self.config.labels[best]),
            None => true,
        };
        let k = if top_k == 0 { order.len() } else { top_k.min(order.len()) };
        IntentResult {
            intents: order[..k].iter().map(|&i| IntentScore { label: self.config.labels[i].clone(), score: probs[i] }).collect(),
            handoff,
        }
    }
}

/// Label names that conventionally mean out-of-scope (CLINC150's `oos`, ...).
pub fn is_out_of_scope_name(label: &str) -> bool {
    matches!(label.to_ascii_lowercase().as_str(), "oos" | "out_of_scope" | "out-of-scope" | "other" | "none")
}
