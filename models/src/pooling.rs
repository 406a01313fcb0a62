//! sentence-transformers pooling (`1_Pooling/config.json`), over packed sequences so that
//! padding never takes part: every sequence is a `[start, start + len)` row range of `[T, H]`.
//! Reads both config forms: the `pooling_mode_*` booleans and, from sentence-transformers 6,
//! `"pooling_mode": "mean"` (or a list of modes, concatenated in the listed order).
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::path::Path;

use crate::error::{ModelError, Result};

/// The pooling modes sentence-transformers knows; several may be on, concatenated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    Cls,
    Mean,
    Max,
    MeanSqrtLen,
    LastToken,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pooling {
    pub modes: Vec<PoolingMode>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ModeNames {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct RawPooling {
    /// sentence-transformers 6 and later; wins over the booleans when both are there.
    pooling_mode: Option<ModeNames>,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
}

impl Pooling {
    pub fn mean() -> Self {
        Self { modes: vec![PoolingMode::Mean] }
    }

    /// Reads a sentence-transformers pooling config.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::BadFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let raw: RawPooling = serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
            path: path.to_owned(),
            reason: format!("expected a sentence-transformers pooling config: {e}"),
        })?;
        let weighted = |p: &Path| {
            ModelError::Unsupported(format!("{}: weighted-mean pooling is not supported", p.display()))
        };
        let mut modes = Vec::new();
        if let Some(names) = raw.pooling_mode {
            let names = match names {
                ModeNames::One(n) => vec![n],
                ModeNames::Many(ns) => ns,
            };
            for name in names {
                modes.push(match name.as_str() {
                    "cls" => PoolingMode::Cls,
                    "max" => PoolingMode::Max,
                    "mean" => PoolingMode::Mean,
                    "mean_sqrt_len_tokens" => PoolingMode::MeanSqrtLen,
                    "lasttoken" => PoolingMode::LastToken,
                    "weightedmean" => return Err(weighted(path)),
                    other => {
                        return Err(ModelError::Unsupported(format!(
                            "{}: pooling_mode \"{other}\" is not one sentence-transformers defines",
                            path.display()
                        )))
                    }
                });
            }
        } else {
            if raw.pooling_mode_weightedmean_tokens {
                return Err(weighted(path));
            }
            // sentence-transformers concatenates the booleans' modes in this fixed order.
            for (on, mode) in [
                (raw.pooling_mode_cls_token, PoolingMode::Cls),
                (raw.pooling_mode_max_tokens, PoolingMode::Max),
                (raw.pooling_mode_mean_tokens, PoolingMode::Mean),
                (raw.pooling_mode_mean_sqrt_len_tokens, PoolingMode::MeanSqrtLen),
                (raw.pooling_mode_lasttoken, PoolingMode::LastToken),
            ] {
                if on {
                    modes.push(mode);
                }
            }
        }
        if modes.is_empty() {
            return Err(ModelError::BadFile {
                path: path.to_owned(),
                reason: "no pooling mode is switched on".into(),
            });
        }
        Ok(Self { modes })
    }

    /// Pools packed hidden states `[T, H]` into `[B, H * modes]`.
    pub fn pool(&self, hidden: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let device = hidden.device();
        let mut parts = Vec::with_capacity(self.modes.len());
        for mode in &self.modes {
            let t = match mode {
                PoolingMode::Cls => hidden.index_select(&starts(lens, 0, device)?, 0)?,
                PoolingMode::LastToken => hidden.index_select(&starts(lens, 1, device)?, 0)?,
                // The fused kernel on the CPU (one pass, f32 sums, no [B, T] weight matrix); its
                // CUDA version waits for a GPU run (scripts/device-check.sh), so other devices
                // keep the matmul.
                PoolingMode::Mean if device.is_cpu() => concierge_kernels::pool::masked_mean_l2(hidden, lens, false)?,
                PoolingMode::Mean => segment_weights(lens, false, device)?.matmul(hidden)?,
                PoolingMode::MeanSqrtLen => segment_weights(lens, true, device)?.matmul(hidden)?,
                PoolingMode::Max => {
                    let mut rows = Vec::with_capacity(lens.len());
                    let mut start = 0;
                    for &len in lens {
                        rows.push(hidden.narrow(0, start, len)?.max_keepdim(0)?);
                        start += len;
                    }
                    Tensor::cat(&rows, 0)?
                }
            };
            parts.push(t);
        }
        Ok(if parts.len() == 1 { parts.pop().unwrap() } else { Tensor::cat(&parts, 1)? })
    }
}

/// Index of each sequence's first token (`from_end == 0`) or last token (`from_end == 1`).
fn starts(lens: &[usize], from_end: usize, device: &Device) -> Result<Tensor> {
    let mut idx = Vec::with_capacity(lens.len());
    let mut start = 0u32;
    for &len in lens {
        idx.push(start + if from_end == 1 { len as u32 - 1 } else { 0 });
        start += len as u32;
    }
    Ok(Tensor::new(idx, device)?)
}

/// A `[B, T]` matrix whose row b averages sequence b's tokens: pooling becomes one matmul.
fn segment_weights(lens: &[usize], sqrt_len: bool, device: &Device) -> Result<Tensor> {
    let total: usize = lens.iter().sum();
    let mut w = vec![0f32; lens.len() * total];
    let mut start = 0;
    for (b, &len) in lens.iter().enumerate() {
        let v = if sqrt_len { 1.0 / (len as f32).sqrt() } else { 1.0 / len as f32 };
        w[b * total + start..b * total + start + len].fill(v);
        start += len;
    }
    Ok(Tensor::from_vec(w, (lens.len(), total), device)?.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Result<Pooling> {
        let path = std::env::temp_dir().join(format!("concierge-pooling-{}-{:x}.json", std::process::id(), {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            json.hash(&mut h);
            h.finish()
        }));
        std::fs::write(&path, json).unwrap();
        let got = Pooling::from_file(&path);
        std::fs::remove_file(&path).unwrap();
        got
    }

    #[test]
    fn mean_pooling_on_the_cpu_kernel_equals_the_weighted_matmul() {
        let lens = [1usize, 7, 3, 16];
        let t: usize = lens.iter().sum();
        let values: Vec<f32> = (0..t * 24).map(|i| ((i * 7919 % 1000) as f32 / 250.0) - 2.0).collect();
        let hidden = Tensor::from_vec(values, (t, 24), &Device::Cpu).unwrap();
        let got = Pooling::mean().pool(&hidden, &lens).unwrap();
        let want = segment_weights(&lens, false, &Device::Cpu).unwrap().matmul(&hidden).unwrap();
        let diff: f32 = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(diff <= 1e-6, "max diff {diff}");
    }

    #[test]
    fn both_config_forms_are_read_in_sentence_transformers_order() {
        use PoolingMode::*;
        let legacy = r#"{"word_embedding_dimension": 8, "pooling_mode_cls_token": true,
            "pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": true}"#;
        assert_eq!(read(legacy).unwrap().modes, vec![Cls, Max, Mean]);
        let v6 = r#"{"embedding_dimension": 8, "pooling_mode": "mean", "include_prompt": true}"#;
        assert_eq!(read(v6).unwrap().modes, vec![Mean]);
        let v6_many = r#"{"embedding_dimension": 8, "pooling_mode": ["mean", "cls"]}"#;
        assert_eq!(read(v6_many).unwrap().modes, vec![Mean, Cls]);
        let err = read(r#"{"pooling_mode": "weightedmean"}"#).unwrap_err().to_string();
        assert!(err.contains("weighted-mean"), "{err}");
        let err = read(r#"{"pooling_mode": "median"}"#).unwrap_err().to_string();
        assert!(err.contains("\"median\""), "{err}");
    }
}
