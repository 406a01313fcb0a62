//! Contextual character features from a pretrained Chinese BERT, frozen (Chinese BERTs read
//! one token per Han character, so their states line up with a character tagger's positions).
//! For a Chinese tagger this is what the text encoder is for the English one: each character's
//! features come from a transformer pretrained on far more text than a tagging set has. The
//! tagger reads the states after the BERT layers it names (`layers`), side by side, after all
//! its other features; the BERT's weights are never trained with it.
//!
//! Each character is one BERT token: its vocabulary entry as written, else lower-cased, else
//! with full-width ASCII folded to half-width (what BERT's Chinese tokenizer would meet), else
//! `[UNK]`. A sequence runs as `[CLS] characters [SEP]`; one longer than the BERT's positions
//! allow runs in consecutive windows, each with its own `[CLS]` and `[SEP]`.
//!
//! Checkpoint: the BERT's tensors under `char_bert.` in `transformers.BertModel`'s names
//! (`char_bert.embeddings.word_embeddings.weight`, `char_bert.encoder.layer.N...`), its
//! vocabulary in `char_bert_vocab.json` (token -> row), its shape in the config's `char_bert`
//! entry. The vocabulary may be a subset of the pretrained one, rows gathered to match.
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::lac::half_width;
use super::Vocab;
use crate::bert::{BertEncoder, Config as BertConfig, PackedBatch};
use crate::error::{ModelError, Result};

/// The vocabulary's unknown token, sequence start and separator (BERT's).
pub const CHAR_BERT_UNK: &str = "[UNK]";
const CLS: &str = "[CLS]";
const SEP: &str = "[SEP]";

/// A tagger's `char_bert` config entry: the BERT's shape and the layers read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CharBertConfig {
    /// Rows of `char_bert.embeddings.word_embeddings.weight`.
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    /// The layers (1-based; 0 is the embeddings) whose states are the features, in this order.
    pub layers: Vec<usize>,
}

impl CharBertConfig {
    /// Width of a character's features.
    pub fn feature_dim(&self) -> usize {
        self.hidden_size * self.layers.len()
    }

    /// The shape of a BERT `config.json` (GELU activation, absolute positions only), with
    /// `vocab_size` rows kept and `layers` read.
    pub fn from_bert(bert: &BertConfig, vocab_size: usize, layers: Vec<usize>) -> Result<Self> {
        if bert.hidden_act != crate::bert::HiddenAct::Gelu || crate::bert::is_mpnet(bert) {
            return Err(ModelError::Unsupported("char_bert: only BERT checkpoints with GELU activations".into()));
        }
        let cfg = Self {
            vocab_size,
            hidden_size: bert.hidden_size,
            num_hidden_layers: bert.num_hidden_layers,
            num_attention_heads: bert.num_attention_heads,
            intermediate_size: bert.intermediate_size,
            max_position_embeddings: bert.max_position_embeddings,
            type_vocab_size: bert.type_vocab_size,
            layer_norm_eps: bert.layer_norm_eps,
            layers,
        };
        cfg.validate().map_err(ModelError::Unsupported)?;
        Ok(cfg)
    }

    /// The candle BERT config this shape describes.
    pub fn bert(&self) -> Result<BertConfig> {
        let v = serde_json::json!({
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "initializer_range": 0.02,
            "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": 0,
            "model_type": "bert",
        });
        serde_json::from_value(v).map_err(|e| ModelError::Unsupported(format!("char_bert: {e}")))
    }

    pub(super) fn validate(&self) -> std::result::Result<(), String> {
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.num_hidden_layers == 0
            || self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
            || self.intermediate_size == 0
            || self.max_position_embeddings < 3
            || self.type_vocab_size == 0
        {
            return Err("char_bert: sizes must be positive, hidden_size a multiple of num_attention_heads, at least 3 positions".into());
        }
        if self.layers.is_empty() || self.layers.iter().any(|&l| l > self.num_hidden_layers) {
            return Err(format!("char_bert: layers must name at least one of layers 0..={}", self.num_hidden_layers));
        }
        Ok(())
    }

    /// Every tensor name of the BERT (without `char_bert.`) and its shape.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let mut out = vec![
            ("embeddings.word_embeddings.weight".to_string(), vec![self.vocab_size, h]),
            ("embeddings.position_embeddings.weight".to_string(), vec![self.max_position_embeddings, h]),
            ("embeddings.token_type_embeddings.weight".to_string(), vec![self.type_vocab_size, h]),
            ("embeddings.LayerNorm.weight".to_string(), vec![h]),
            ("embeddings.LayerNorm.bias".to_string(), vec![h]),
        ];
        for n in 0..self.num_hidden_layers {
            let p = format!("encoder.layer.{n}");
            for (name, shape) in [
                ("attention.self.query.weight", vec![h, h]),
                ("attention.self.query.bias", vec![h]),
                ("attention.self.key.weight", vec![h, h]),
                ("attention.self.key.bias", vec![h]),
                ("attention.self.value.weight", vec![h, h]),
                ("attention.self.value.bias", vec![h]),
                ("attention.output.dense.weight", vec![h, h]),
                ("attention.output.dense.bias", vec![h]),
                ("attention.output.LayerNorm.weight", vec![h]),
                ("attention.output.LayerNorm.bias", vec![h]),
                ("intermediate.dense.weight", vec![i, h]),
                ("intermediate.dense.bias", vec![i]),
                ("output.dense.weight", vec![h, i]),
                ("output.dense.bias", vec![h]),
                ("output.LayerNorm.weight", vec![h]),
                ("output.LayerNorm.bias", vec![h]),
            ] {
                out.push((format!("{p}.{name}"), shape));
            }
        }
        out
    }
}

/// The BERT vocabulary row of one character (see the module header).
pub fn char_bert_id(vocab: &Vocab, token: &str) -> u32 {
    if let Some(id) = vocab.get(token) {
        return id;
    }
    let lower = token.to_lowercase();
    vocab.get(&lower).unwrap_or_else(|| vocab.id(&half_width(&lower)))
}

/// A differentiable BERT pass standing in for the frozen one while the BERT is fine-tuned with
/// the tagger (the train crate's): for windows `ids` `[W, Lw]` (u32, `[CLS] chars [SEP]`, then
/// `[PAD]`) of lengths `lens`, the states after each layer in `taps` (0: the embeddings), in
/// that order, `[W, Lw, H]` each.
pub trait CharBertPass: Send + Sync {
    fn taps(&self, ids: &Tensor, lens: &[usize], taps: &[usize]) -> Result<Vec<Tensor>>;
}

/// The BERT, its vocabulary and the layers read.
#[derive(Clone)]
pub struct CharBert {
    cfg: CharBertConfig,
    vocab: Vocab,
    bert: Arc<BertEncoder>,
    cls: u32,
    sep: u32,
    /// Every tensor under its name without `char_bert.`, for saving.
    named: Vec<(String, Tensor)>,
    /// Fine-tuning: the pass features run through instead of `bert`.
    pass: Option<Arc<dyn CharBertPass>>,
}

impl std::fmt::Debug for CharBert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CharBert").field("cfg", &self.cfg).field("vocab", &self.vocab.len()).finish()
    }
}

impl CharBert {
    /// From `vb` (the `char_bert.` prefix of a tagger checkpoint, or a BERT's own tensors) and
    /// its vocabulary, which must hold `[UNK]`, `[CLS]` and `[SEP]` and fit the table. A missing
    /// or mis-shaped tensor is an error naming it.
    pub fn load(vb: &VarBuilder, cfg: &CharBertConfig, vocab: Vocab) -> Result<Self> {
        cfg.validate().map_err(ModelError::Unsupported)?;
        if vocab.id_bound() > cfg.vocab_size {
            return Err(ModelError::Unsupported(format!(
                "a char_bert vocabulary with ids up to {} for {} embedding rows",
                vocab.id_bound() - 1,
                cfg.vocab_size
            )));
        }
        let special = |t: &str| vocab.get(t).ok_or_else(|| ModelError::Unsupported(format!("the char_bert vocabulary has no {t}")));
        let (cls, sep) = (special(CLS)?, special(SEP)?);
        let mut named = Vec::new();
        let mut map = HashMap::new();
        for (name, shape) in cfg.tensor_shapes() {
            let t = vb.get(shape, &name)?;
            named.push((name.clone(), t.clone()));
            map.insert(name, t);
        }
        let bert = BertEncoder::load(VarBuilder::from_tensors(map, vb.dtype(), vb.device()), &cfg.bert()?)?;
        Ok(Self { cfg: cfg.clone(), vocab, bert: Arc::new(bert), cls, sep, named, pass: None })
    }

    /// For fine-tuning: features run through `pass` (gradients flow), and `named` (the tensors
    /// it trains, by the same names) are what the checkpoint saves.
    pub fn with_pass(mut self, pass: Arc<dyn CharBertPass>, named: Vec<(String, Tensor)>) -> Result<Self> {
        let mut want: Vec<&str> = self.named.iter().map(|(n, _)| n.as_str()).collect();
        let mut got: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
        want.sort_unstable();
        got.sort_unstable();
        if want != got {
            return Err(ModelError::Unsupported("char_bert: a fine-tuning pass must carry every tensor of the BERT".into()));
        }
        self.pass = Some(pass);
        self.named = named;
        Ok(self)
    }

    pub fn config(&self) -> &CharBertConfig {
        &self.cfg
    }

    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// Every tensor under its name without the `char_bert.` prefix.
    pub fn tensors(&self) -> &[(String, Tensor)] {
        &self.named
    }

    /// The features the tagger reads, `[B, L, feature_dim]` in `dtype` (zeros at padding), for
    /// BERT ids `[B, L]` (u32, from [`char_bert_id`]).
    pub fn features(&self, ids: &Tensor, lengths: &[usize], dtype: DType) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        super::crf::check_lengths(lengths, b, l)?;
        let rows = ids.to_device(&candle_core::Device::Cpu)?.to_vec2::<u32>()?;
        let window = self.cfg.max_position_embeddings - 2;
        if let Some(pass) = &self.pass {
            return self.features_through(pass.as_ref(), &rows, lengths, l, ids.device(), dtype);
        }
        // Pack every window as [CLS] chars [SEP]; `gather[s * l + i]` is the packed row of
        // character i of sequence s, or the zero row past the end at padding.
        let (mut packed, mut lens, mut gather) = (Vec::new(), Vec::new(), Vec::with_capacity(b * l));
        for (row, &n) in rows.iter().zip(lengths) {
            for chunk in row[..n].chunks(window) {
                let start = packed.len() + 1;
                packed.push(self.cls);
                packed.extend_from_slice(chunk);
                packed.push(self.sep);
                lens.push(chunk.len() + 2);
                gather.extend((start..start + chunk.len()).map(|r| r as u32));
            }
            gather.extend(std::iter::repeat_n(u32::MAX, l - n));
        }
        let total = packed.len() as u32;
        for g in &mut gather {
            if *g == u32::MAX {
                *g = total;
            }
        }
        let dev = ids.device();
        if packed.is_empty() {
            return Ok(Tensor::zeros((b, l, self.cfg.feature_dim()), dtype, dev)?);
        }
        let types = vec![0u32; packed.len()];
        let batch = PackedBatch { ids: &packed, type_ids: &types, lens: &lens };
        let (_, taps) = self.bert.forward_taps_until(&batch, &self.cfg.layers)?;
        Ok(gather_characters(&taps, gather, b, l)?.to_dtype(dtype)?.detach())
    }

    /// The frozen BERT's states after its first `n` layers (0: the embeddings) for padded
    /// windows `ids` `[W, Lw]` (u32) of lengths `lens`: `[W, Lw, H]` f32, zeros past each length.
    /// What a pass fine-tuning only the top layers starts from.
    pub fn frozen_states(&self, ids: &Tensor, lens: &[usize], n: usize) -> Result<Tensor> {
        let (w, lw) = ids.dims2()?;
        super::crf::check_lengths(lens, w, lw)?;
        let rows = ids.to_device(&candle_core::Device::Cpu)?.to_vec2::<u32>()?;
        let packed: Vec<u32> = rows.iter().zip(lens).flat_map(|(r, &k)| r[..k].iter().copied()).collect();
        let types = vec![0u32; packed.len()];
        let h = self.cfg.hidden_size;
        let x = self.bert.forward_until(&PackedBatch { ids: &packed, type_ids: &types, lens }, n)?;
        let zero = packed.len() as u32;
        let mut gather = Vec::with_capacity(w * lw);
        let mut start = 0u32;
        for &k in lens {
            gather.extend((0..lw).map(|i| if i < k { start + i as u32 } else { zero }));
            start += k as u32;
        }
        let x = Tensor::cat(&[&x.to_dtype(DType::F32)?, &Tensor::zeros((1, h), DType::F32, x.device())?], 0)?;
        let gather = Tensor::from_vec(gather, w * lw, x.device())?;
        Ok(x.index_select(&gather, 0)?.reshape((w, lw, h))?.to_device(ids.device())?.detach())
    }

    /// [`Self::features`] through a fine-tuning pass: the windows padded to the longest.
    fn features_through(&self, pass: &dyn CharBertPass, rows: &[Vec<u32>], lengths: &[usize], l: usize, dev: &candle_core::Device, dtype: DType) -> Result<Tensor> {
        let window = self.cfg.max_position_embeddings - 2;
        let windows: Vec<&[u32]> = rows.iter().zip(lengths).flat_map(|(row, &n)| row[..n].chunks(window)).collect();
        let b = rows.len();
        let h = self.cfg.hidden_size;
        if windows.is_empty() {
            return Ok(Tensor::zeros((b, l, self.cfg.feature_dim()), dtype, dev)?);
        }
        let lw = windows.iter().map(|w| w.len()).max().unwrap_or(0) + 2;
        let (mut flat, mut lens) = (Vec::with_capacity(windows.len() * lw), Vec::with_capacity(windows.len()));
        for w in &windows {
            flat.push(self.cls);
            flat.extend_from_slice(w);
            flat.push(self.sep);
            flat.extend(std::iter::repeat_n(0, lw - w.len() - 2));
            lens.push(w.len() + 2);
        }
        // Character i of window k is row k * lw + 1 + i; padding reads the zero row at the end.
        let zero = (windows.len() * lw) as u32;
        let mut gather = Vec::with_capacity(b * l);
        let mut k = 0;
        for &n in lengths {
            let mut i = 0;
            while i < n {
                let take = (n - i).min(window);
                gather.extend((0..take).map(|j| (k * lw + 1 + j) as u32));
                i += take;
                k += 1;
            }
            gather.extend(std::iter::repeat_n(zero, l - n));
        }
        let ids = Tensor::from_vec(flat, (windows.len(), lw), dev)?;
        let taps = pass.taps(&ids, &lens, &self.cfg.layers)?;
        let taps = taps.iter().map(|t| t.reshape((windows.len() * lw, h))).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(gather_characters(&taps, gather, b, l)?.to_dtype(dtype)?)
    }
}

/// Each character's rows of the tapped states (`[N, H]` each), side by side: `[B, L, H * taps]`,
/// where `gather[s * L + i]` is the row of character `i` of sequence `s`, or `N` (a zero row) at
/// padding.
fn gather_characters(taps: &[Tensor], gather: Vec<u32>, b: usize, l: usize) -> Result<Tensor> {
    let Some(first) = taps.first() else {
        return Err(ModelError::Unsupported("char_bert: no layers read".into()));
    };
    let gather = Tensor::from_vec(gather, b * l, first.device())?;
    let parts = taps
        .iter()
        .map(|t| {
            let h = t.dim(1)?;
            let t = Tensor::cat(&[t, &Tensor::zeros((1, h), t.dtype(), t.device())?], 0)?;
            Ok(t.index_select(&gather, 0)?.reshape((b, l, h))?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 2)?)
}
