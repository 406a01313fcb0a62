//! The image encoder as a whole: checkpoint -> ResNet + the preprocessing its config names,
//! plus the moderation head when the checkpoint has one. This is what the serving engine holds
//! and calls per batch; decoding runs before, on the caller's blocking pool.
use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

use crate::checkpoint::{ImageCheckpoint, ModelSource};
use crate::encoder::ModelInfo;
use crate::error::{ModelError, Result};
use crate::imageproc::{self, ImageError, ImageLimits, Preprocess};
use crate::resnet::{ResNet, ResNetConfig};

/// Class names a checkpoint's head may carry, in either of the common spellings.
#[derive(Deserialize, Default)]
struct HeadLabels {
    /// `["safe", "unsafe"]`.
    labels: Option<Vec<String>>,
    /// Hugging Face's `{"0": "safe", "1": "unsafe"}`.
    id2label: Option<BTreeMap<String, String>>,
}

impl HeadLabels {
    fn names(self, classes: usize) -> Vec<String> {
        if let Some(l) = self.labels {
            return l;
        }
        if let Some(m) = self.id2label {
            let mut names = vec![String::new(); classes];
            for (k, v) in m {
                if let Some(slot) = k.parse::<usize>().ok().and_then(|i| names.get_mut(i)) {
                    *slot = v;
                }
            }
            return names;
        }
        Vec::new()
    }
}

/// Label names (case-insensitive) whose probability is the moderation score.
const UNSAFE_LABELS: [&str; 3] = ["unsafe", "nsfw", "not_safe_for_work"];

/// One image's outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageEmbedding {
    /// The pooled feature vector (L2-normalised when asked).
    pub vector: Vec<f32>,
    /// Probability of the head's "unsafe" class, when the checkpoint has a moderation head.
    pub unsafe_score: Option<f32>,
}

pub struct ImageEncoder {
    net: ResNet,
    preprocess: Preprocess,
    info: ModelInfo,
    device: Device,
    dtype: DType,
    /// The head's class whose probability is the moderation score.
    unsafe_class: Option<usize>,
}

impl ImageEncoder {
    pub fn load(source: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        let ckpt = source.resolve_image()?;
        Self::from_checkpoint(&ckpt, device, dtype)
    }

    pub fn from_checkpoint(ckpt: &ImageCheckpoint, device: &Device, dtype: DType) -> Result<Self> {
        let net = ResNet::from_files(&ckpt.config, &ckpt.weights, device, dtype)?;
        let cfg = net.config().clone();
        let text = std::fs::read_to_string(&ckpt.config)
            .map_err(|e| ModelError::BadFile { path: ckpt.config.clone(), reason: e.to_string() })?;
        let labels: HeadLabels = serde_json::from_str(&text).unwrap_or_default();
        let classes = cfg.num_classes.unwrap_or(0);
        let names = labels.names(classes);
        if classes > 0 && !names.is_empty() && names.len() != classes {
            return Err(ModelError::BadFile {
                path: ckpt.config.clone(),
                reason: format!("{} labels for a head of {classes} classes", names.len()),
            });
        }
        let unsafe_class = names.iter().position(|n| UNSAFE_LABELS.iter().any(|u| n.eq_ignore_ascii_case(u)));
        let info = ModelInfo {
            id: ckpt.id.clone(),
            version: ckpt.version.clone(),
            dimension: cfg.feature_dim()?,
            max_input_tokens: 0,
        };
        Ok(Self { preprocess: Preprocess::from_config(&cfg), net, info, device: device.clone(), dtype, unsafe_class })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn config(&self) -> &ResNetConfig {
        self.net.config()
    }

    pub fn preprocessing(&self) -> &Preprocess {
        &self.preprocess
    }

    /// Whether responses carry a moderation score.
    pub fn has_moderation(&self) -> bool {
        self.unsafe_class.is_some()
    }

    /// Floats in one prepared image (`3 x H x W`).
    pub fn input_len(&self) -> usize {
        let [h, w] = self.preprocess.crop;
        3 * h as usize * w as usize
    }

    /// Decodes and preprocesses one encoded image into the model's input. CPU work.
    pub fn prepare(&self, index: usize, bytes: &[u8], limits: &ImageLimits) -> std::result::Result<Vec<f32>, ImageError> {
        let img = imageproc::decode(index, bytes, limits)?;
        Ok(imageproc::preprocess(&img, &self.preprocess))
    }

    /// The last feature map `[B, C, h, w]` (f32) of prepared images: what the fusion block
    /// attends to.
    pub fn features(&self, images: &[&[f32]]) -> Result<Tensor> {
        let len = self.input_len();
        if images.is_empty() || images.iter().any(|i| i.len() != len) {
            return Err(ModelError::Unsupported(format!("features take prepared images of {len} floats each")));
        }
        let [h, w] = self.preprocess.crop;
        let x = Tensor::from_vec(images.concat(), (images.len(), 3, h as usize, w as usize), &self.device)?.to_dtype(self.dtype)?;
        Ok(self.net.forward(&x)?.features.to_dtype(DType::F32)?)
    }

    /// Runs prepared images (each [`Self::input_len`] floats) as one batch.
    pub fn embed(&self, images: &[&[f32]], normalize: &[bool]) -> Result<Vec<ImageEmbedding>> {
        let n = images.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let len = self.input_len();
        if let Some(bad) = images.iter().position(|i| i.len() != len) {
            return Err(ModelError::Unsupported(format!(
                "prepared image {bad} has {} floats; this model takes {len}",
                images[bad].len()
            )));
        }
        let [h, w] = self.preprocess.crop;
        let flat: Vec<f32> = images.concat();
        let x = Tensor::from_vec(flat, (n, 3, h as usize, w as usize), &self.device)?.to_dtype(self.dtype)?;
        let out = self.net.forward(&x)?;
        let pooled: Vec<Vec<f32>> = out.pooled.to_dtype(DType::F32)?.to_vec2()?;
        let scores: Option<Vec<f32>> = match (self.unsafe_class, &out.logits) {
            (Some(c), Some(logits)) => {
                let p = candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
                Some(p.narrow(1, c, 1)?.flatten_all()?.to_vec1()?)
            }
            _ => None,
        };
        Ok(pooled
            .into_iter()
            .enumerate()
            .map(|(i, mut vector)| {
                if normalize.get(i).copied().unwrap_or(false) {
                    let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
                    if norm > 0.0 {
                        vector.iter_mut().for_each(|v| *v /= norm);
                    }
                }
                ImageEmbedding { vector, unsafe_score: scores.as_ref().map(|s| s[i]) }
            })
            .collect())
    }
}
