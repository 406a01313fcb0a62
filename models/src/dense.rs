//! The sentence-transformers modules that run on the pooled vector, in `modules.json` order:
//! `Dense` (a linear layer and an activation: the optional projection of a dual-encoder tower,
//! Reimers & Gurevych, 2019, "Sentence-BERT") and `Normalize` (L2). Plain candle ops on the
//! pooled f32 `[B, D]`, so the same code runs on every device.
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module};
use serde::Deserialize;

use crate::checkpoint::AfterPooling;
use crate::error::{ModelError, Result};

/// The activations a `Dense` module may name (PyTorch's classes, which take no arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Tanh,
    Relu,
    /// PyTorch's default `nn.GELU()`: the exact erf form, not the tanh approximation.
    Gelu,
    Sigmoid,
}

impl Activation {
    /// From the class path sentence-transformers writes, e.g.
    /// `torch.nn.modules.activation.Tanh` or `torch.nn.modules.linear.Identity`.
    pub fn from_class_path(path: &str) -> Option<Self> {
        let (module, class) = path.rsplit_once('.')?;
        if !(module == "torch.nn" || module.starts_with("torch.nn.modules.")) {
            return None;
        }
        Some(match class {
            "Identity" => Self::Identity,
            "Tanh" => Self::Tanh,
            "ReLU" => Self::Relu,
            "GELU" => Self::Gelu,
            "Sigmoid" => Self::Sigmoid,
            _ => return None,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Identity => x.clone(),
            Self::Tanh => x.tanh()?,
            Self::Relu => x.relu()?,
            Self::Gelu => x.gelu_erf()?,
            Self::Sigmoid => candle_nn::ops::sigmoid(x)?,
        })
    }
}

#[derive(Deserialize)]
struct DenseConfig {
    in_features: usize,
    out_features: usize,
    #[serde(default = "yes")]
    bias: bool,
    /// sentence-transformers' default when the key is absent.
    #[serde(default = "tanh")]
    activation_function: String,
    /// sentence-transformers 6 names what a module reads and writes; a Dense after pooling
    /// must map the sentence embedding to itself.
    module_input_name: Option<String>,
    module_output_name: Option<String>,
}

fn yes() -> bool {
    true
}

fn tanh() -> String {
    "torch.nn.modules.activation.Tanh".into()
}

/// `activation(x W^T + b)`, weights named as sentence-transformers saves them
/// (`linear.weight` `[out, in]`, `linear.bias` `[out]`).
#[derive(Debug, Clone)]
pub struct Dense {
    linear: Linear,
    activation: Activation,
    in_features: usize,
    out_features: usize,
}

impl Dense {
    /// Reads a Dense module's `config.json` and its `model.safetensors` (always as f32: it runs
    /// on the pooled vector, which is f32 whatever the encoder's dtype).
    pub fn load(config: &Path, weights: &Path, device: &Device) -> Result<Self> {
        let text = std::fs::read_to_string(config)
            .map_err(|e| ModelError::BadFile { path: config.to_owned(), reason: e.to_string() })?;
        let cfg: DenseConfig = serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
            path: config.to_owned(),
            reason: format!("expected a sentence-transformers Dense config (in_features, out_features, ...): {e}"),
        })?;
        let activation = Activation::from_class_path(&cfg.activation_function).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "{}: activation_function \"{}\"; supported: torch.nn Identity, Tanh, ReLU, GELU, Sigmoid",
                config.display(),
                cfg.activation_function
            ))
        })?;
        for (key, name) in [("module_input_name", &cfg.module_input_name), ("module_output_name", &cfg.module_output_name)] {
            if let Some(name) = name.as_deref().filter(|n| *n != "sentence_embedding") {
                return Err(ModelError::Unsupported(format!(
                    "{}: {key} \"{name}\"; only a Dense on the pooled sentence_embedding is supported",
                    config.display()
                )));
            }
        }
        let bad = |reason: String| ModelError::BadFile { path: weights.to_owned(), reason };
        let mut tensors = candle_core::safetensors::load(weights, device).map_err(|e| bad(e.to_string()))?;
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = tensors.remove(name).ok_or_else(|| {
                bad(format!("has no tensor \"{name}\" (a Dense module's weights are linear.weight and linear.bias)"))
            })?;
            if t.dims() != shape {
                return Err(bad(format!(
                    "\"{name}\" has shape {:?}; {} asks for {shape:?}",
                    t.dims(),
                    config.display()
                )));
            }
            Ok(t.to_dtype(DType::F32)?)
        };
        let weight = take("linear.weight", &[cfg.out_features, cfg.in_features])?;
        let bias = if cfg.bias { Some(take("linear.bias", &[cfg.out_features])?) } else { None };
        Ok(Self {
            linear: Linear::new(weight, bias),
            activation,
            in_features: cfg.in_features,
            out_features: cfg.out_features,
        })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// `[B, in]` -> `[B, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.activation.forward(&self.linear.forward(x)?)
    }
}

#[derive(Debug, Clone)]
enum Stage {
    Dense(Dense),
    Normalize,
}

/// Everything a checkpoint does after pooling. A *trailing* Normalize is not run here: it is
/// reported by [`Head::normalizes`] and left to the caller (`TextEncoder::embed`'s per-input
/// flag), so that the vector before it stays reachable. A Normalize between Dense layers
/// changes what the next layer sees, so it is run in place.
#[derive(Debug, Clone)]
pub struct Head {
    stages: Vec<Stage>,
    normalizes: bool,
    dimension: usize,
}

impl Head {
    /// Loads the modules after pooling; `pooled_dim` is the pooling output's width, which the
    /// first Dense's `in_features` must match (and each next one the previous `out_features`).
    pub fn load(modules: &[AfterPooling], pooled_dim: usize, device: &Device) -> Result<Self> {
        let mut stages = Vec::with_capacity(modules.len());
        let mut dimension = pooled_dim;
        for m in modules {
            match m {
                AfterPooling::Dense { config, weights } => {
                    let dense = Dense::load(config, weights, device)?;
                    if dense.in_features != dimension {
                        return Err(ModelError::BadFile {
                            path: config.clone(),
                            reason: format!(
                                "in_features is {} but the module before it gives vectors of {dimension}",
                                dense.in_features
                            ),
                        });
                    }
                    dimension = dense.out_features;
                    stages.push(Stage::Dense(dense));
                }
                AfterPooling::Normalize => stages.push(Stage::Normalize),
            }
        }
        let mut normalizes = false;
        while matches!(stages.last(), Some(Stage::Normalize)) {
            stages.pop();
            normalizes = true;
        }
        Ok(Self { stages, normalizes, dimension })
    }

    /// The width of the vectors it gives.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Whether the checkpoint ends with a Normalize module.
    pub fn normalizes(&self) -> bool {
        self.normalizes
    }

    /// Whether there is anything to run (a Dense, or a Normalize before one).
    pub fn is_identity(&self) -> bool {
        self.stages.is_empty()
    }

    /// Pooled `[B, D]` (f32) -> `[B, dimension]`, up to (not including) a trailing Normalize.
    pub fn forward(&self, pooled: &Tensor) -> Result<Tensor> {
        let mut x = pooled.clone();
        for stage in &self.stages {
            x = match stage {
                Stage::Dense(d) => d.forward(&x)?,
                Stage::Normalize => l2_normalize_rows(&x)?,
            };
        }
        Ok(x)
    }
}

/// Row-wise, as torch.nn.functional.normalize: `x / max(||x||, 1e-12)`.
pub fn l2_normalize_rows(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?;
    Ok(x.broadcast_div(&norm)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_are_read_from_torch_class_paths() {
        for (path, want) in [
            ("torch.nn.modules.activation.Tanh", Some(Activation::Tanh)),
            ("torch.nn.modules.linear.Identity", Some(Activation::Identity)),
            ("torch.nn.modules.activation.ReLU", Some(Activation::Relu)),
            ("torch.nn.modules.activation.GELU", Some(Activation::Gelu)),
            ("torch.nn.modules.activation.Sigmoid", Some(Activation::Sigmoid)),
            ("torch.nn.Tanh", Some(Activation::Tanh)),
            ("torch.nn.modules.activation.SiLU", None),
            ("mypackage.Tanh", None),
            ("Tanh", None),
        ] {
            assert_eq!(Activation::from_class_path(path), want, "{path}");
        }
    }

    #[test]
    fn activations_match_their_definitions() {
        let xs = [-3.0f32, -0.5, 0.0, 0.7, 2.5];
        let x = Tensor::new(&xs[..], &Device::Cpu).unwrap();
        // GELU from Python's math.erf: 0.5 * x * (1 + erf(x / sqrt(2))).
        let gelu = [-0.00404969409489031, -0.15426876936299344, 0.0, 0.5306254434438489, 2.4844758366855597];
        let cases: [(Activation, Vec<f64>); 5] = [
            (Activation::Identity, xs.iter().map(|&v| v as f64).collect()),
            (Activation::Tanh, xs.iter().map(|&v| (v as f64).tanh()).collect()),
            (Activation::Relu, xs.iter().map(|&v| (v as f64).max(0.0)).collect()),
            (Activation::Gelu, gelu.to_vec()),
            (Activation::Sigmoid, xs.iter().map(|&v| 1.0 / (1.0 + (-(v as f64)).exp())).collect()),
        ];
        for (act, wants) in cases {
            let got: Vec<f32> = act.forward(&x).unwrap().to_vec1().unwrap();
            for ((&v, g), want) in xs.iter().zip(got).zip(wants) {
                assert!((g as f64 - want).abs() < 1e-5, "{act:?}({v}) = {g}, want {want}");
            }
        }
    }

    #[test]
    fn rows_are_normalised_and_zero_rows_stay_zero() {
        let x = Tensor::new(&[[3.0f32, 4.0], [0.0, 0.0]], &Device::Cpu).unwrap();
        let y: Vec<Vec<f32>> = l2_normalize_rows(&x).unwrap().to_vec2().unwrap();
        assert_eq!(y, vec![vec![0.6, 0.8], vec![0.0, 0.0]]);
    }
}
