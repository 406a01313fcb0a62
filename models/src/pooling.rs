//! sentence-transformers pooling (`1_Pooling/config.json`), over packed sequences so that
//! padding never takes part: every sequence is a `[start, start + len)` row range of `[T, H]`.
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::path::Path;

use crate::error::{ModelError, Result};

/// The pooling modes sentence-transformers knows; several may be on, concatenated in this order.
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
struct RawPooling {
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
        if raw.pooling_mode_weightedmean_tokens {
            return Err(ModelError::Unsupported(format!(
                "{}: weighted-mean pooling is not supported",
                path.display()
            )));
        }
        let mut modes = Vec::new();
        // sentence-transformers concatenates in this fixed order.
        for (on, mode) in [
            (raw.pooling_mode_cls_token, PoolingMode::Cls),
            (raw.pooling_mode_mean_tokens, PoolingMode::Mean),
            (raw.pooling_mode_max_tokens, PoolingMode::Max),
            (raw.pooling_mode_mean_sqrt_len_tokens, PoolingMode::MeanSqrtLen),
            (raw.pooling_mode_lasttoken, PoolingMode::LastToken),
        ] {
            if on {
                modes.push(mode);
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
