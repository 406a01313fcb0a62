//! The BiLSTM-CRF sequence tagger (Huang, Xu and Yu, 2015, "Bidirectional LSTM-CRF Models for
//! Sequence Tagging"; Lample et al., 2016, "Neural Architectures for Named Entity Recognition"):
//! token features -> bidirectional LSTM -> linear emission scores per tag -> linear-chain CRF.
//!
//! Features are either the text encoder's token states (`input: "encoder"`) or the tagger's own
//! embedding table over a `vocab.json` (`input: "embeddings"`, e.g. Chinese characters). Weights
//! carry PyTorch's names, so a checkpoint of the usual PyTorch model (`nn.LSTM(bidirectional=True,
//! batch_first=True)` as `lstm`, `nn.Linear` as `hidden2tag`, pytorch-crf's `CRF` as `crf`)
//! loads as saved. A checkpoint folder is `config.json`, `model.safetensors`, `tags.json` (the
//! tag names in id order) and, for embeddings input, `vocab.json`.
pub mod char_bert;
pub mod crf;
pub mod lac;
pub mod lexicon;
pub mod soft_lexicon;
pub mod lstm;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Init, Linear, Module, VarBuilder};
use serde::{Deserialize, Serialize};

pub use char_bert::{CharBert, CharBertConfig, CharBertPass};
pub use crf::{Crf, Reduction, TagPath};
pub use lac::{Lac, LacConfig};
pub use lexicon::Lexicon;
pub use soft_lexicon::{SoftLexicon, SoftLexiconConfig};
pub use lstm::BiLstm;

use crate::bert::{BertLayers, Config as BertConfig};
use crate::error::{ModelError, Result};

/// Where the tagger's token features come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    /// The text encoder's token states, `[B, L, input_dim]` floats.
    Encoder,
    /// Token ids `[B, L]` (u32) into the tagger's own `embedding.weight` `[vocab_size, input_dim]`.
    Embeddings,
}

/// How an ensemble ([`TaggerConfig::ensemble`]) combines its members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnsembleVote {
    /// The mean of the members' path scores: their emissions and CRFs averaged, one Viterbi
    /// (the normalised geometric mean of their path distributions).
    #[default]
    Scores,
    /// Posterior voting: the mean of the members' per-token CRF marginals (each member's own
    /// CRF, constrained as the config says), decoded by Viterbi over their logs with no
    /// learned transitions (only the tag scheme's constraints): the path whose tags the members
    /// together find likeliest, token by token.
    Marginals,
}

impl EnsembleVote {
    fn is_scores(&self) -> bool {
        *self == Self::Scores
    }
}

/// A tagger's `config.json`. Fields it does not name are kept and written back by `save`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaggerConfig {
    pub input: InputKind,
    /// Width of a token's features: the encoder's hidden size, or the embedding width.
    pub input_dim: usize,
    /// Encoder input: the layers whose token states are concatenated, in this order, as a
    /// token's features (`0`: the embeddings; `n` of an `n`-layer encoder: its last layer), so
    /// `input_dim` is the encoder's width times their number. None: the last layer alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_layers: Option<Vec<usize>>,
    /// Encoder input with fine-tuned top layers: the checkpoint carries its own copies of the
    /// encoder's layers after this one (`encoder.layer.N.*` for N from `branch_from` up, in the
    /// encoder's names, with the encoder's `encoder_config.json` beside them). The shared encoder
    /// pass is tapped after layer `branch_from` and the tagger runs its copies from there; the
    /// layers in `encoder_layers` above `branch_from` are read from its copies. None: the
    /// encoder's own states only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch_from: Option<usize>,
    /// Rows of the embedding table (embeddings input only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
    /// Character bigrams (embeddings input; Zhang and Yang 2018's "bichar"): rows of
    /// `bigram_embedding.weight`, keyed by `bigrams.json`. Each character's features are then its
    /// own embedding followed by those of the bigram ending at it and the bigram starting at it
    /// (`<s>` before the first character, `</s>` after the last), so the BiLSTM's input is
    /// `input_dim + 2 * bigram_dim` wide, and the input ids are `[B, L, 3]` (character, left
    /// bigram, right bigram). None: characters alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bigram_vocab_size: Option<usize>,
    /// Width of a bigram embedding (with `bigram_vocab_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bigram_dim: Option<usize>,
    /// Lexicon features (embeddings input; see [`lexicon`]): the word classes of `lexicon.txt`.
    /// Each character then also reads, per class, the embedding (`lexicon_dim` wide) of whether
    /// known words of that class begin, continue or end at it, from `lexicon_embedding.weight`
    /// `[classes * 8, lexicon_dim]`; those ids follow the character's (and bigrams') in the input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lexicon_classes: Option<Vec<String>>,
    /// Width of a lexicon feature embedding (with `lexicon_classes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lexicon_dim: Option<usize>,
    /// Contextual character features from LAC (embeddings input; see [`lac`]): its frozen
    /// network (`lac.*` tensors) and vocabulary (`lac_vocab.json`) ship with the checkpoint. Each
    /// character's LAC id follows its other ids in the input, and the outputs of LAC's `layers`
    /// follow its other features.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lac: Option<LacConfig>,
    /// Word-vector lexicon features (embeddings input; see [`soft_lexicon`]): the word list
    /// (`soft_lexicon.txt`) and its frozen vector table (`soft_lexicon.embedding`) ship with the
    /// checkpoint. Each character's `3 * per_set` word ids follow all its other ids, and its three
    /// set vectors follow all its other features (LAC's too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_lexicon: Option<SoftLexiconConfig>,
    /// Contextual character features from a frozen pretrained Chinese BERT (embeddings input;
    /// see [`char_bert`]): its tensors (`char_bert.*`) and vocabulary (`char_bert_vocab.json`)
    /// ship with the checkpoint. Each character's BERT id follows all its other ids, and the
    /// states of the BERT layers named follow all its other features.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub char_bert: Option<CharBertConfig>,
    /// LSTM hidden size per direction; the emission layer sees twice this.
    pub hidden_size: usize,
    #[serde(default = "one")]
    pub num_layers: usize,
    /// Dropout probability between LSTM layers and before the emission layer; training only.
    #[serde(default)]
    pub dropout: f32,
    pub num_tags: usize,
    /// Prefix of the emission layer's `weight`/`bias`. None: the first of `hidden2tag`,
    /// `emission`, `fc`, `classifier` that the checkpoint has (`hidden2tag` for a fresh model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emission_name: Option<String>,
    /// The `vocab.json` key whose id stands for unknown tokens (embeddings input). None: `<unk>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unk_token: Option<String>,
    /// Joint intent (an intent-aware tagger): the number of utterance intents, named in
    /// `intents.json`. The tagger then classifies the utterance (`intent`, a linear layer over
    /// the mean of the BiLSTM's outputs) and adds `intent_emission` (a bias-free linear layer over
    /// the intent probabilities, `[num_tags, num_intents]`) to every position's emission scores,
    /// so a tag's score can depend on what the whole utterance asks (ATIS labels a city in a
    /// ground-transport question `city_name`, in a flight question `toloc.city_name`). None: no
    /// intent layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_intents: Option<usize>,
    /// An ensemble of this many taggers of this config, trained apart (different seeds) and
    /// assembled by `concierge ensemble-tagger`. Member `k`'s tensors are `members.{k}.*` (a
    /// PyTorch `nn.ModuleList` named `members`), each with its own CRF. With `branch_from`, each
    /// member has its own fine-tuned encoder layers (`members.{k}.encoder.layer.N.*`, one
    /// `encoder_config.json`): the shared encoder pass is tapped once and every member runs its
    /// own layers from there, so the features are the members' side by side
    /// ([`BiLstmCrf::features_width`]). The ensemble scores a path by the mean of the members'
    /// scores: its emissions are the mean of theirs and its CRF the mean of their transitions,
    /// which is the normalised geometric mean of their path distributions (the log-partition
    /// does not depend on the path). Embeddings input: each member has its own tables and LAC network
    /// (`members.{k}.lac.*`); the vocabularies and the frozen parts (`char_bert.*`,
    /// `soft_lexicon.embedding`) are shared, stored once, and their features computed once a
    /// batch. None: one tagger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ensemble: Option<usize>,
    /// How an ensemble combines its members ([`EnsembleVote`]); absent: `scores`.
    #[serde(default, skip_serializing_if = "EnsembleVote::is_scores")]
    pub ensemble_vote: EnsembleVote,
    /// Decode only the tag paths the tag names' scheme allows (BIO, BIOES, BMES: no inside tag
    /// without its chunk's start, and in BIOES/BMES no chunk left open): [`Crf::constrain`].
    /// Viterbi and the marginals (confidences) use it; training's likelihood does not. False
    /// (and absent, as in PyTorch exports): every path, as trained.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub constrained: bool,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn one() -> usize {
    1
}

const EMISSION_NAMES: [&str; 4] = ["hidden2tag", "emission", "fc", "classifier"];
const DEFAULT_UNK: &str = "<unk>";
/// Stand-ins for the character before the first and after the last, in bigram keys.
const BIGRAM_START: &str = "<s>";
const BIGRAM_END: &str = "</s>";

/// The `n + 1` bigram keys of `n` characters: key `k` joins characters `k - 1` and `k`, with
/// `<s>` before the first and `</s>` after the last. Character `i`'s bigrams are keys `i` (ending
/// at it) and `i + 1` (starting at it). The one definition training and serving share.
pub fn bigram_keys<S: AsRef<str>>(chars: &[S]) -> Vec<String> {
    let at = |k: usize, edge: &'static str| if k == 0 || k > chars.len() { edge } else { chars[k - 1].as_ref() };
    (1..=chars.len() + 1).map(|k| format!("{}{}", at(k - 1, BIGRAM_START), at(k, BIGRAM_END))).collect()
}

/// How an embeddings-input tagger turns a sequence of tokens (characters) into ids: per token,
/// its vocabulary id, then (with bigrams) the ids of the bigrams ending and starting at it, then
/// (with a lexicon) one id per lexicon class, then (with LAC features) its LAC id, then (with a
/// soft lexicon) its B, M and E sets' word ids. The one rule
/// training and serving share.
#[derive(Debug, Clone, Copy)]
pub struct IdColumns<'a> {
    pub vocab: &'a Vocab,
    pub bigrams: Option<&'a Vocab>,
    pub lexicon: Option<&'a Lexicon>,
    /// LAC's vocabulary.
    pub lac: Option<&'a Vocab>,
    pub soft_lexicon: Option<&'a SoftLexicon>,
    /// The char BERT's vocabulary.
    pub char_bert: Option<&'a Vocab>,
}

impl IdColumns<'_> {
    /// Ids a token.
    pub fn width(&self) -> usize {
        1 + if self.bigrams.is_some() { 2 } else { 0 }
            + self.lexicon.map_or(0, |l| l.classes().len())
            + usize::from(self.lac.is_some())
            + self.soft_lexicon.map_or(0, |s| s.config().id_columns())
            + usize::from(self.char_bert.is_some())
    }

    /// The ids of `seq`, token-major (`seq.len() * width()`).
    pub fn encode<S: AsRef<str>>(&self, seq: &[S]) -> Vec<u32> {
        let w = self.width();
        let bigrams = self.bigrams.map(|b| b.encode_bigrams(seq));
        let lexicon = self.lexicon.map(|l| (l.classes().len(), l.ids(seq)));
        let soft = self.soft_lexicon.map(|s| (s.config().id_columns(), s.ids(seq)));
        let mut out = Vec::with_capacity(seq.len() * w);
        for (i, tok) in seq.iter().enumerate() {
            out.push(self.vocab.id(tok.as_ref()));
            if let Some(b) = &bigrams {
                out.extend([b[i].0, b[i].1]);
            }
            if let Some((c, ids)) = &lexicon {
                out.extend_from_slice(&ids[i * c..(i + 1) * c]);
            }
            if let Some(lac) = self.lac {
                out.push(lac::lac_id(lac, tok.as_ref()));
            }
            if let Some((c, ids)) = &soft {
                out.extend_from_slice(&ids[i * c..(i + 1) * c]);
            }
            if let Some(v) = self.char_bert {
                out.push(char_bert::char_bert_id(v, tok.as_ref()));
            }
        }
        out
    }

    /// The ids of a padding position.
    pub fn padding(&self) -> Vec<u32> {
        let mut out = vec![self.vocab.unk_id()];
        if let Some(b) = self.bigrams {
            out.extend([b.unk_id(), b.unk_id()]);
        }
        if let Some(l) = self.lexicon {
            out.extend(l.none_ids());
        }
        if let Some(lac) = self.lac {
            out.push(lac.unk_id());
        }
        if let Some(s) = self.soft_lexicon {
            out.extend(s.none_ids());
        }
        if let Some(v) = self.char_bert {
            out.push(v.unk_id());
        }
        out
    }
}

impl TaggerConfig {
    /// A config for encoder features with the defaults (one layer, no dropout).
    pub fn encoder(input_dim: usize, hidden_size: usize, num_tags: usize) -> Self {
        Self {
            input: InputKind::Encoder,
            input_dim,
            encoder_layers: None,
            branch_from: None,
            vocab_size: None,
            bigram_vocab_size: None,
            bigram_dim: None,
            lexicon_classes: None,
            lexicon_dim: None,
            lac: None,
            soft_lexicon: None,
            char_bert: None,
            hidden_size,
            num_layers: 1,
            dropout: 0.0,
            num_tags,
            emission_name: None,
            unk_token: None,
            num_intents: None,
            ensemble: None,
            ensemble_vote: EnsembleVote::Scores,
            constrained: false,
            extra: BTreeMap::new(),
        }
    }

    /// A config for the tagger's own embedding table of `vocab_size` rows of `dim`.
    pub fn embeddings(vocab_size: usize, dim: usize, hidden_size: usize, num_tags: usize) -> Self {
        Self { input: InputKind::Embeddings, vocab_size: Some(vocab_size), ..Self::encoder(dim, hidden_size, num_tags) }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let bad = |reason: String| ModelError::BadFile { path: path.to_owned(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| bad(format!("expected a tagger config (input, input_dim, hidden_size, num_tags, ...): {e}")))?;
        cfg.validate().map_err(|e| bad(e.to_string()))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |s: &str| Err(ModelError::Unsupported(format!("tagger config: {s}")));
        if self.input_dim == 0 || self.hidden_size == 0 || self.num_layers == 0 || self.num_tags == 0 {
            return bad("input_dim, hidden_size, num_layers and num_tags must be positive");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout must be in [0, 1)");
        }
        if self.encoder_layers.as_ref().is_some_and(|l| l.is_empty() || self.input != InputKind::Encoder) {
            return bad("encoder_layers must name at least one layer, and only for encoder input");
        }
        match (self.bigram_vocab_size, self.bigram_dim) {
            (None, None) => {}
            (Some(rows), Some(dim)) if rows > 0 && dim > 0 && self.input == InputKind::Embeddings => {}
            _ => return bad("bigram_vocab_size and bigram_dim go together, both positive, and only with embeddings input"),
        }
        match (&self.lexicon_classes, self.lexicon_dim) {
            (None, None) => {}
            (Some(c), Some(dim)) if (1..=16).contains(&c.len()) && dim > 0 && self.input == InputKind::Embeddings => {}
            _ => return bad("lexicon_classes (1 to 16) and lexicon_dim go together, dim positive, and only with embeddings input"),
        }
        if let Some(lac) = &self.lac {
            if self.input != InputKind::Embeddings {
                return bad("lac (LAC character features) is only for embeddings input");
            }
            lac.validate().map_err(ModelError::Unsupported)?;
        }
        if let Some(soft) = &self.soft_lexicon {
            if self.input != InputKind::Embeddings {
                return bad("soft_lexicon (word-vector lexicon features) is only for embeddings input");
            }
            soft.validate().map_err(ModelError::Unsupported)?;
        }
        if let Some(cb) = &self.char_bert {
            if self.input != InputKind::Embeddings {
                return bad("char_bert (pretrained BERT character features) is only for embeddings input");
            }
            cb.validate().map_err(ModelError::Unsupported)?;
        }
        if self.num_intents == Some(0) {
            return bad("num_intents must be positive (or absent: no intent layers)");
        }
        if let Some(n) = self.ensemble {
            if !(2..=64).contains(&n) {
                return bad("ensemble must have 2 to 64 members");
            }
        }
        if self.ensemble.is_none() && !self.ensemble_vote.is_scores() {
            return bad("ensemble_vote is for an ensemble (set ensemble to its number of members)");
        }
        if self.branch_from.is_some() && self.input != InputKind::Encoder {
            return bad("branch_from (fine-tuned encoder layers) is only for encoder input");
        }
        if let (Some(from), Some(layers)) = (self.branch_from, &self.encoder_layers) {
            if !layers.iter().any(|&l| l > from) {
                return bad("with branch_from, encoder_layers must read at least one layer above it (its fine-tuned layers)");
            }
        }
        match (self.input, self.vocab_size) {
            (InputKind::Embeddings, None | Some(0)) => bad("embeddings input needs a positive vocab_size"),
            _ => Ok(()),
        }
    }

    /// Width of the BiLSTM's input: `input_dim`, plus two bigram embeddings, one lexicon
    /// embedding per class and LAC's features if it has them.
    pub fn lstm_input_dim(&self) -> usize {
        self.input_dim
            + 2 * self.bigram_dim.unwrap_or(0)
            + self.lexicon_classes().len() * self.lexicon_dim.unwrap_or(0)
            + self.lac.as_ref().map_or(0, LacConfig::feature_dim)
            + self.soft_lexicon.as_ref().map_or(0, SoftLexiconConfig::feature_dim)
            + self.char_bert.as_ref().map_or(0, CharBertConfig::feature_dim)
    }

    fn lexicon_classes(&self) -> &[String] {
        self.lexicon_classes.as_deref().unwrap_or(&[])
    }

    /// Embeddings input: ids a position (character; left and right bigram; one per lexicon
    /// class; LAC's).
    pub fn id_columns(&self) -> usize {
        1 + if self.bigram_dim.is_some() { 2 } else { 0 }
            + self.lexicon_classes().len()
            + usize::from(self.lac.is_some())
            + self.soft_lexicon.as_ref().map_or(0, SoftLexiconConfig::id_columns)
            + usize::from(self.char_bert.is_some())
    }

    /// Encoder input: the layers it reads from an encoder of `num_layers` layers (its config's
    /// `encoder_layers`, or the last layer).
    pub fn reads_layers(&self, num_layers: usize) -> Vec<usize> {
        self.encoder_layers.clone().unwrap_or_else(|| vec![num_layers])
    }

    /// The unknown token's `vocab.json` key.
    pub fn unk_token(&self) -> &str {
        self.unk_token.as_deref().unwrap_or(DEFAULT_UNK)
    }
}

/// Token (or character) -> id for embeddings input, with an id for unknown tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    ids: HashMap<String, u32>,
    unk: u32,
}

impl Vocab {
    /// `unk_token` must be one of the keys.
    pub fn new(ids: HashMap<String, u32>, unk_token: &str) -> Result<Self> {
        let unk = *ids
            .get(unk_token)
            .ok_or_else(|| ModelError::Unsupported(format!("the vocabulary has no unknown token {unk_token:?}")))?;
        Ok(Self { ids, unk })
    }

    /// A `vocab.json`: one JSON object mapping each token to its id.
    pub fn from_file(path: &Path, unk_token: &str) -> Result<Self> {
        let bad = |reason: String| ModelError::BadFile { path: path.to_owned(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let ids: HashMap<String, u32> =
            serde_json::from_str(&text).map_err(|e| bad(format!("expected an object of token -> id: {e}")))?;
        Self::new(ids, unk_token).map_err(|e| bad(e.to_string()))
    }

    pub fn id(&self, token: &str) -> u32 {
        self.get(token).unwrap_or(self.unk)
    }

    /// The id of `token` if the vocabulary has it (no unknown-token fallback).
    pub fn get(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// Every (token, id), in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, u32)> {
        self.ids.iter().map(|(k, &v)| (k.as_str(), v))
    }

    pub fn unk_id(&self) -> u32 {
        self.unk
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The largest id plus one: the embedding rows the vocabulary needs.
    pub fn id_bound(&self) -> usize {
        self.ids.values().map(|&i| i as usize + 1).max().unwrap_or(0)
    }

    /// The ids of the bigrams ending at and starting at each character of `chars` (see
    /// [`bigram_keys`]): `(left, right)` per character.
    pub fn encode_bigrams<S: AsRef<str>>(&self, chars: &[S]) -> Vec<(u32, u32)> {
        let ids: Vec<u32> = bigram_keys(chars).iter().map(|k| self.id(k)).collect();
        ids.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// Writes the token -> id object (keys sorted, so the file is reproducible).
    pub fn save(&self, path: &Path) -> Result<()> {
        let sorted: BTreeMap<&str, u32> = self.ids.iter().map(|(k, &v)| (k.as_str(), v)).collect();
        write_json(path, &sorted)
    }
}

/// Every weight fetched while building a model, under its full checkpoint name, for `save`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Params {
    named: Vec<(String, Tensor)>,
}

impl Params {
    /// `vb`'s tensor `name` of `shape` (created with `init` when `vb` is a fresh `VarMap`).
    pub(crate) fn get(&mut self, vb: &VarBuilder, shape: &[usize], name: &str, init: Init) -> Result<Tensor> {
        self.record(vb, name, vb.get_with_hints(shape, name, init)?)
    }

    fn record(&mut self, vb: &VarBuilder, name: &str, t: Tensor) -> Result<Tensor> {
        let prefix = vb.prefix();
        let full = if prefix.is_empty() { name.to_owned() } else { format!("{prefix}.{name}") };
        self.named.push((full, t.clone()));
        Ok(t)
    }
}

/// A tagger's own copies of the encoder's top layers (see [`TaggerConfig::branch_from`]).
#[derive(Clone)]
pub struct Branch(std::sync::Arc<BertLayers>);

impl std::fmt::Debug for Branch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Branch(layers {}..{})", self.0.first(), self.0.first() + self.0.len())
    }
}

impl Branch {
    pub fn layers(&self) -> &BertLayers {
        &self.0
    }
}

/// An intent-aware tagger's intent layers (see [`TaggerConfig::num_intents`]).
#[derive(Debug, Clone)]
struct IntentLayers {
    /// `[num_intents, 2 * hidden]` + bias, over the mean BiLSTM output.
    classify: Linear,
    /// `[num_tags, num_intents]`, no bias, over the intent probabilities.
    emission: Linear,
}

/// Emission scores and, for an intent-aware tagger, the utterance's intent logits `[B, I]`.
#[derive(Debug, Clone)]
pub struct TaggerOutput {
    pub emissions: Tensor,
    pub intent_logits: Option<Tensor>,
}

/// The BiLSTM-CRF tagger. See the module header for the layout.
#[derive(Debug, Clone)]
pub struct BiLstmCrf {
    cfg: TaggerConfig,
    /// Fine-tuned encoder layers (`branch_from`), attached by [`Self::load`].
    branch: Option<Branch>,
    tags: Vec<String>,
    vocab: Option<Vocab>,
    /// Character bigrams: their `bigrams.json` and table.
    bigrams: Option<Vocab>,
    /// Lexicon features: the word list and its table.
    lexicon: Option<Lexicon>,
    /// LAC's frozen network and vocabulary ([`TaggerConfig::lac`]).
    lac: Option<Lac>,
    /// Word-vector lexicon features ([`TaggerConfig::soft_lexicon`]).
    soft_lexicon: Option<SoftLexicon>,
    /// The frozen char BERT ([`TaggerConfig::char_bert`]).
    char_bert: Option<CharBert>,
    embedding: Option<Embedding>,
    bigram_embedding: Option<Embedding>,
    lexicon_embedding: Option<Embedding>,
    lstm: BiLstm,
    emission: Linear,
    /// The prefix the emission layer was found under.
    emission_name: String,
    /// Joint intent ([`TaggerConfig::num_intents`]): `intent` and `intent_emission`.
    intent: Option<IntentLayers>,
    /// The intent names in id order (`intents.json`); empty without intent layers.
    intents: Vec<String>,
    crf: Crf,
    params: Params,
    /// An ensemble's other members ([`TaggerConfig::ensemble`]); this one is member 0, and its
    /// `crf` is the members' mean (voting by scores) or the constraints alone (by marginals).
    members: Vec<BiLstmCrf>,
    /// Member 0's own CRF in an ensemble voting by marginals (`crf` is then the decoder's).
    own_crf: Option<Crf>,
}

impl BiLstmCrf {
    /// Builds the tagger from `vb`: a checkpoint's tensors (names as in the module header; a
    /// missing or mis-shaped one is an error naming it) or a `VarMap` builder, which creates
    /// every parameter with PyTorch's initialisation for training. `tags` are the tag names in
    /// id order. The CRF is always f32; the rest is in `vb`'s dtype.
    pub fn new(vb: VarBuilder, cfg: &TaggerConfig, tags: Vec<String>) -> Result<Self> {
        cfg.validate()?;
        if tags.len() != cfg.num_tags {
            return Err(ModelError::Unsupported(format!("{} tag names for num_tags {}", tags.len(), cfg.num_tags)));
        }
        let mut seen = HashSet::new();
        if let Some(dup) = tags.iter().find(|t| !seen.insert(t.as_str())) {
            return Err(ModelError::Unsupported(format!("tag {dup:?} appears twice in the tag set")));
        }
        if let Some(n) = cfg.ensemble {
            return Self::new_ensemble(vb, cfg, tags, n);
        }
        let mut params = Params::default();
        let embedding = match cfg.input {
            InputKind::Encoder => None,
            InputKind::Embeddings => {
                let rows = cfg.vocab_size.expect("validated");
                let init = Init::Randn { mean: 0.0, stdev: 1.0 };
                let w = params.get(&vb.pp("embedding"), &[rows, cfg.input_dim], "weight", init)?;
                Some(Embedding::new(w, cfg.input_dim))
            }
        };
        let bigram_embedding = match (cfg.bigram_vocab_size, cfg.bigram_dim) {
            (Some(rows), Some(dim)) => {
                let init = Init::Randn { mean: 0.0, stdev: 1.0 };
                Some(Embedding::new(params.get(&vb.pp("bigram_embedding"), &[rows, dim], "weight", init)?, dim))
            }
            _ => None,
        };
        let lexicon_embedding = match (cfg.lexicon_classes.as_ref(), cfg.lexicon_dim) {
            (Some(classes), Some(dim)) => {
                let init = Init::Randn { mean: 0.0, stdev: 1.0 };
                Some(Embedding::new(params.get(&vb.pp("lexicon_embedding"), &[classes.len() * 8, dim], "weight", init)?, dim))
            }
            _ => None,
        };
        let lstm =
            BiLstm::new(&mut params, &vb.pp("lstm"), cfg.lstm_input_dim(), cfg.hidden_size, cfg.num_layers, cfg.dropout)?;
        let emission_name = match &cfg.emission_name {
            Some(name) => name.clone(),
            None => EMISSION_NAMES
                .into_iter()
                .find(|n| vb.contains_tensor(&format!("{n}.weight")))
                .unwrap_or(EMISSION_NAMES[0])
                .to_owned(),
        };
        let in_dim = lstm.output_dim();
        let bound = 1.0 / (in_dim as f64).sqrt();
        let init = Init::Uniform { lo: -bound, up: bound };
        let evb = vb.pp(&emission_name);
        let w = params.get(&evb, &[cfg.num_tags, in_dim], "weight", init)?;
        let b = params.get(&evb, &[cfg.num_tags], "bias", init)?;
        let emission = Linear::new(w, Some(b));
        let intent = match cfg.num_intents {
            None => None,
            Some(n) => {
                let ivb = vb.pp("intent");
                let w = params.get(&ivb, &[n, in_dim], "weight", init)?;
                let b = params.get(&ivb, &[n], "bias", init)?;
                let ebound = 1.0 / (n as f64).sqrt();
                let einit = Init::Uniform { lo: -ebound, up: ebound };
                let e = params.get(&vb.pp("intent_emission"), &[cfg.num_tags, n], "weight", einit)?;
                Some(IntentLayers { classify: Linear::new(w, Some(b)), emission: Linear::new(e, None) })
            }
        };
        let cvb = vb.pp("crf");
        let mut crf = Crf::load(&cvb, cfg.num_tags)?;
        for (name, t) in [
            ("transitions", crf.transitions()),
            ("start_transitions", crf.start_transitions()),
            ("end_transitions", crf.end_transitions()),
        ] {
            params.record(&cvb, name, t.clone())?;
        }
        if cfg.constrained {
            crf.constrain(&tags)?;
        }
        Ok(Self {
            cfg: cfg.clone(),
            branch: None,
            tags,
            vocab: None,
            bigrams: None,
            lexicon: None,
            lac: None,
            soft_lexicon: None,
            char_bert: None,
            embedding,
            bigram_embedding,
            lexicon_embedding,
            lstm,
            emission,
            emission_name,
            intent,
            intents: Vec::new(),
            crf,
            params,
            members: Vec::new(),
            own_crf: None,
        })
    }

    /// `n` members under `members.{k}`, each of `cfg` without `ensemble`; the CRF used is the
    /// mean of theirs.
    fn new_ensemble(vb: VarBuilder, cfg: &TaggerConfig, tags: Vec<String>, n: usize) -> Result<Self> {
        let one = TaggerConfig { ensemble: None, ensemble_vote: EnsembleVote::Scores, ..cfg.clone() };
        let mut members = (0..n)
            .map(|k| Self::new(vb.pp(format!("members.{k}")), &one, tags.clone()))
            .collect::<Result<Vec<_>>>()?;
        let mean = |get: fn(&Crf) -> &Tensor| -> Result<Tensor> {
            let all = members.iter().map(|m| get(&m.crf)).collect::<Vec<_>>();
            Ok((Tensor::stack(&all, 0)?.sum(0)? / n as f64)?)
        };
        let mut crf = match cfg.ensemble_vote {
            EnsembleVote::Scores => Crf::new(mean(Crf::transitions)?, mean(Crf::start_transitions)?, mean(Crf::end_transitions)?)?,
            EnsembleVote::Marginals => {
                let like = members[0].crf.transitions();
                let t = cfg.num_tags;
                Crf::new(like.zeros_like()?, Tensor::zeros(t, DType::F32, like.device())?, Tensor::zeros(t, DType::F32, like.device())?)?
            }
        };
        if cfg.constrained {
            crf.constrain(&tags)?;
        }
        let mut first = members.remove(0);
        if cfg.ensemble_vote == EnsembleVote::Marginals {
            first.own_crf = Some(first.crf.clone());
        }
        for m in &members {
            first.params.named.extend(m.params.named.iter().cloned());
        }
        first.cfg = cfg.clone();
        first.crf = crf;
        first.members = members;
        Ok(first)
    }

    /// Every weight under its checkpoint name (as `save` writes them, LAC's aside).
    pub fn named_tensors(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params.named.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Members in the ensemble (1: a single tagger).
    pub fn num_members(&self) -> usize {
        1 + self.members.len()
    }

    /// The ensemble's members, this one (member 0) first; a single tagger alone.
    pub fn each_member(&self) -> impl Iterator<Item = &BiLstmCrf> {
        std::iter::once(self).chain(&self.members)
    }

    /// Width of the encoder features [`Self::forward`] takes: `input_dim`, times the members
    /// for an ensemble with fine-tuned encoder layers (each member's features from its own
    /// layers, side by side in member order).
    pub fn features_width(&self) -> usize {
        match (self.cfg.branch_from, self.members.len()) {
            (Some(_), n) if n > 0 => self.cfg.input_dim * (n + 1),
            _ => self.cfg.input_dim,
        }
    }

    /// Loads a checkpoint folder: `config.json`, `model.safetensors`, `tags.json`, and
    /// `vocab.json` for embeddings input. Errors name the file at fault.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let file = |name: &str, expected: &str| {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(ModelError::MissingFile { path: p, expected: expected.into() })
            }
        };
        let config = file("config.json", "a tagger config (input, input_dim, hidden_size, num_tags, ...)")?;
        let weights = file("model.safetensors", "the weights, with PyTorch's names (lstm.*, hidden2tag.*, crf.*)")?;
        let tags_path = file("tags.json", "the tag names in id order, a JSON list")?;
        let cfg = TaggerConfig::from_file(&config)?;
        let tags: Vec<String> = std::fs::read_to_string(&tags_path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| format!("expected a JSON list of tag names: {e}")))
            .map_err(|reason| ModelError::BadFile { path: tags_path.clone(), reason })?;
        if tags.len() != cfg.num_tags {
            let reason = format!("has {} tags; {} says num_tags {}", tags.len(), config.display(), cfg.num_tags);
            return Err(ModelError::BadFile { path: tags_path, reason });
        }
        // SAFETY: memory-mapped read-only; checkpoint folders are replaced, never edited in place.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, device) }
            .map_err(|e| ModelError::BadFile { path: weights.clone(), reason: e.to_string() })?;
        let mismatch = |e: ModelError| match e {
            ModelError::Candle(c) => ModelError::BadFile {
                path: weights.clone(),
                reason: format!("does not match {}: {c}", config.display()),
            },
            ModelError::Unsupported(reason) => ModelError::BadFile { path: tags_path.clone(), reason },
            other => other,
        };
        let mut model = Self::new(vb.clone(), &cfg, tags).map_err(mismatch)?;
        model.lstm.pack_for_cpu()?;
        for m in &mut model.members {
            m.lstm.pack_for_cpu()?;
        }
        if let Some(n) = cfg.num_intents {
            let path = file("intents.json", "the intent names in id order, a JSON list (num_intents in config.json)")?;
            let intents: Vec<String> = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str(&t).map_err(|e| format!("expected a JSON list of intent names: {e}")))
                .map_err(|reason| ModelError::BadFile { path: path.clone(), reason })?;
            model = model.with_intents(intents).map_err(|e| ModelError::BadFile {
                path: path.clone(),
                reason: format!("{e} ({} says num_intents {n})", config.display()),
            })?;
        }
        if let Some(from) = cfg.branch_from {
            let path = file("encoder_config.json", "the config.json of the encoder whose top layers it fine-tuned")?;
            let bert: BertConfig = crate::bert::read_config(&path)?;
            if from >= bert.num_hidden_layers {
                let reason = format!("branch_from {from}, but {} has {} layers", path.display(), bert.num_hidden_layers);
                return Err(ModelError::BadFile { path: config.clone(), reason });
            }
            let layers = |vb: VarBuilder, prefix: &str| {
                BertLayers::load(vb, &bert, from..bert.num_hidden_layers).map_err(|e| match e {
                    ModelError::Candle(c) => ModelError::BadFile {
                        path: weights.clone(),
                        reason: format!("its fine-tuned encoder layers {from}..{} ({prefix}encoder.layer.*, branch_from): {c}", bert.num_hidden_layers),
                    },
                    other => other,
                })
            };
            if model.members.is_empty() {
                model.branch = Some(Branch(std::sync::Arc::new(layers(vb.clone(), "")?)));
            } else {
                // An ensemble: each member's own layers under its prefix (this one is member 0).
                model.branch = Some(Branch(std::sync::Arc::new(layers(vb.pp("members.0"), "members.0.")?)));
                for (k, m) in model.members.iter_mut().enumerate() {
                    let prefix = format!("members.{}", k + 1);
                    m.branch = Some(Branch(std::sync::Arc::new(layers(vb.pp(&prefix), &format!("{prefix}."))?)));
                }
            }
        }
        let model = match cfg.input {
            InputKind::Encoder => model,
            InputKind::Embeddings => {
                let path = file("vocab.json", "the token -> id object of the embedding table")?;
                let vocab = Vocab::from_file(&path, cfg.unk_token())?;
                let mut model = model.with_vocab(vocab).map_err(|e| ModelError::BadFile { path, reason: e.to_string() })?;
                if let Some(lac_cfg) = &cfg.lac {
                    let path = file("lac_vocab.json", "LAC's character -> id object (the lac entry of config.json)")?;
                    let vocab = Vocab::from_file(&path, lac::LAC_UNK)?;
                    // An ensemble's members each have their own (fine-tuned) LAC network.
                    let load_lac = |prefix: String| {
                        Lac::load(&vb.pp(&prefix), lac_cfg, vocab.clone()).map_err(|e| match e {
                            ModelError::Candle(c) => ModelError::BadFile {
                                path: weights.clone(),
                                reason: format!("its LAC network ({prefix}.*, the lac entry of {}): {c}", config.display()),
                            },
                            ModelError::Unsupported(reason) => ModelError::BadFile { path: path.clone(), reason },
                            other => other,
                        })
                    };
                    if model.members.is_empty() {
                        model = model.with_lac(load_lac("lac".into())?)?;
                    } else {
                        model = model.with_lac(load_lac("members.0.lac".into())?)?;
                        let mut members = std::mem::take(&mut model.members);
                        for (k, m) in members.iter_mut().enumerate() {
                            m.lac = Some(load_lac(format!("members.{}.lac", k + 1))?);
                        }
                        model.members = members;
                    }
                }
                if let Some(soft_cfg) = &cfg.soft_lexicon {
                    let path = file("soft_lexicon.txt", "the word list of the soft lexicon (the soft_lexicon entry of config.json), `word<TAB>weight` lines")?;
                    let soft = SoftLexicon::load(&path, &vb.pp("soft_lexicon"), soft_cfg).map_err(|e| match e {
                        ModelError::Candle(c) => ModelError::BadFile {
                            path: weights.clone(),
                            reason: format!("its soft lexicon table (soft_lexicon.embedding, the soft_lexicon entry of {}): {c}", config.display()),
                        },
                        other => other,
                    })?;
                    model = model.with_soft_lexicon(soft)?;
                }
                if let Some(cb_cfg) = &cfg.char_bert {
                    let path = file("char_bert_vocab.json", "the char BERT's token -> row object (the char_bert entry of config.json)")?;
                    let vocab = Vocab::from_file(&path, char_bert::CHAR_BERT_UNK)?;
                    let cb = CharBert::load(&vb.pp("char_bert"), cb_cfg, vocab).map_err(|e| match e {
                        ModelError::Candle(c) => ModelError::BadFile {
                            path: weights.clone(),
                            reason: format!("its char BERT (char_bert.*, the char_bert entry of {}): {c}", config.display()),
                        },
                        ModelError::Unsupported(reason) => ModelError::BadFile { path: path.clone(), reason },
                        other => other,
                    })?;
                    model = model.with_char_bert(cb)?;
                }
                if let Some(classes) = &cfg.lexicon_classes {
                    let path = file("lexicon.txt", "the word list of the lexicon features (lexicon_classes), `word<TAB>class,…` lines")?;
                    let lexicon = Lexicon::from_file(&path, classes)?;
                    model = model.with_lexicon(lexicon).map_err(|e| ModelError::BadFile { path, reason: e.to_string() })?;
                }
                match cfg.bigram_vocab_size {
                    None => model,
                    Some(_) => {
                        let path = file("bigrams.json", "the character bigram -> id object of the bigram table (bigram_vocab_size)")?;
                        let bigrams = Vocab::from_file(&path, cfg.unk_token())?;
                        model.with_bigrams(bigrams).map_err(|e| ModelError::BadFile { path, reason: e.to_string() })?
                    }
                }
            }
        };
        tracing::info!(dir = %dir.display(), input = ?cfg.input, cfg.num_layers, cfg.hidden_size, cfg.num_tags,
            ?device, ?dtype, "tagger loaded");
        Ok(model)
    }

    /// Writes the checkpoint folder `load` reads (creating `dir`): the weights in their dtype
    /// under the names they were loaded by, the config, the tags and the vocabulary if any.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let io = |path: &Path, e: std::io::Error| ModelError::BadFile { path: path.to_owned(), reason: e.to_string() };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        // The config as loaded: without an emission_name the layer was found under one of the
        // fallback names, and is saved (and found again) under the same one.
        write_json(&dir.join("config.json"), &self.cfg)?;
        write_json(&dir.join("tags.json"), &self.tags)?;
        if let Some(vocab) = &self.vocab {
            vocab.save(&dir.join("vocab.json"))?;
        }
        if let Some(bigrams) = &self.bigrams {
            bigrams.save(&dir.join("bigrams.json"))?;
        }
        if let Some(lexicon) = &self.lexicon {
            lexicon.save(&dir.join("lexicon.txt"))?;
        }
        if let Some(lac) = &self.lac {
            lac.vocab().save(&dir.join("lac_vocab.json"))?;
        }
        if let Some(soft) = &self.soft_lexicon {
            soft.save_words(&dir.join("soft_lexicon.txt"))?;
        }
        if let Some(cb) = &self.char_bert {
            cb.vocab().save(&dir.join("char_bert_vocab.json"))?;
        }
        if self.intent.is_some() {
            write_json(&dir.join("intents.json"), &self.intents)?;
        }
        let mut ts: HashMap<String, Tensor> = self.params.named.iter().cloned().collect();
        if self.members.is_empty() {
            for (name, t) in self.lac.iter().flat_map(|l| l.tensors()) {
                ts.insert(format!("lac.{name}"), t.clone());
            }
        } else {
            // An ensemble: each member's LAC under its own prefix (this one is member 0).
            for (k, m) in std::iter::once(self).chain(&self.members).enumerate() {
                for (name, t) in m.lac.iter().flat_map(|l| l.tensors()) {
                    ts.insert(format!("members.{k}.lac.{name}"), t.clone());
                }
            }
        }
        for (name, t) in self.char_bert.iter().flat_map(|c| c.tensors()) {
            ts.insert(format!("char_bert.{name}"), t.clone());
        }
        if let Some(soft) = &self.soft_lexicon {
            ts.insert("soft_lexicon.embedding".into(), soft.table().clone());
        }
        let weights = dir.join("model.safetensors");
        candle_core::safetensors::save(&ts, &weights)
            .map_err(|e| ModelError::BadFile { path: weights.clone(), reason: e.to_string() })
    }

    /// Attaches the vocabulary of an embeddings-input tagger; its ids must fit the table.
    pub fn with_vocab(mut self, vocab: Vocab) -> Result<Self> {
        let rows = self.cfg.vocab_size.unwrap_or(0);
        if self.cfg.input != InputKind::Embeddings || vocab.id_bound() > rows {
            return Err(ModelError::Unsupported(format!(
                "a vocabulary with ids up to {} does not fit this tagger ({:?} input, {rows} embedding rows)",
                vocab.id_bound().saturating_sub(1),
                self.cfg.input
            )));
        }
        self.vocab = Some(vocab);
        Ok(self)
    }

    /// Attaches the bigram vocabulary of a tagger with a bigram table; its ids must fit it.
    pub fn with_bigrams(mut self, bigrams: Vocab) -> Result<Self> {
        let rows = self.cfg.bigram_vocab_size.unwrap_or(0);
        if bigrams.id_bound() > rows {
            return Err(ModelError::Unsupported(format!(
                "a bigram vocabulary with ids up to {} does not fit this tagger's {rows} bigram rows",
                bigrams.id_bound().saturating_sub(1)
            )));
        }
        self.bigrams = Some(bigrams);
        Ok(self)
    }

    /// The bigram vocabulary, if the tagger reads character bigrams.
    pub fn bigrams(&self) -> Option<&Vocab> {
        self.bigrams.as_ref()
    }

    /// Attaches the word list of a tagger with lexicon features; its classes must be the
    /// config's `lexicon_classes`, in order.
    pub fn with_lexicon(mut self, lexicon: Lexicon) -> Result<Self> {
        if self.cfg.lexicon_classes.as_deref() != Some(lexicon.classes()) {
            return Err(ModelError::Unsupported(format!(
                "a lexicon with classes {:?} for a tagger with lexicon_classes {:?}",
                lexicon.classes(),
                self.cfg.lexicon_classes
            )));
        }
        self.lexicon = Some(lexicon);
        Ok(self)
    }

    /// The word list, if the tagger reads lexicon features.
    pub fn lexicon(&self) -> Option<&Lexicon> {
        self.lexicon.as_ref()
    }

    /// Attaches LAC's network to a tagger whose config has `lac`; their configs must agree.
    pub fn with_lac(mut self, lac: Lac) -> Result<Self> {
        if self.cfg.lac.as_ref() != Some(lac.config()) {
            return Err(ModelError::Unsupported(format!(
                "a LAC network {:?} for a tagger whose config has lac {:?}",
                lac.config(),
                self.cfg.lac
            )));
        }
        self.lac = Some(lac);
        Ok(self)
    }

    /// LAC's network, if the tagger reads LAC features.
    pub fn lac(&self) -> Option<&Lac> {
        self.lac.as_ref()
    }

    /// Attaches the word-vector lexicon of a tagger whose config has `soft_lexicon`; its shape
    /// must be the config's.
    pub fn with_soft_lexicon(mut self, soft: SoftLexicon) -> Result<Self> {
        if self.cfg.soft_lexicon.as_ref() != Some(soft.config()) {
            return Err(ModelError::Unsupported(format!(
                "a soft lexicon of {:?} for a tagger whose config has soft_lexicon {:?}",
                soft.config(),
                self.cfg.soft_lexicon
            )));
        }
        self.soft_lexicon = Some(soft);
        Ok(self)
    }

    /// The word-vector lexicon, if the tagger reads one.
    pub fn soft_lexicon(&self) -> Option<&SoftLexicon> {
        self.soft_lexicon.as_ref()
    }

    /// Attaches the frozen char BERT of a tagger whose config has `char_bert`; their configs
    /// must agree.
    pub fn with_char_bert(mut self, cb: CharBert) -> Result<Self> {
        if self.cfg.char_bert.as_ref() != Some(cb.config()) {
            return Err(ModelError::Unsupported(format!(
                "a char BERT {:?} for a tagger whose config has char_bert {:?}",
                cb.config(),
                self.cfg.char_bert
            )));
        }
        self.char_bert = Some(cb);
        Ok(self)
    }

    /// The char BERT, if the tagger reads one.
    pub fn char_bert(&self) -> Option<&CharBert> {
        self.char_bert.as_ref()
    }

    /// How this tagger turns tokens into ids (embeddings input with a vocabulary).
    pub fn id_columns(&self) -> Option<IdColumns<'_>> {
        Some(IdColumns {
            vocab: self.vocab.as_ref()?,
            bigrams: self.bigrams.as_ref(),
            lexicon: self.lexicon.as_ref(),
            lac: self.lac.as_ref().map(Lac::vocab),
            soft_lexicon: self.soft_lexicon.as_ref(),
            char_bert: self.char_bert.as_ref().map(CharBert::vocab),
        })
    }

    /// Names the intents of an intent-aware tagger, in id order (`num_intents` of them).
    pub fn with_intents(mut self, intents: Vec<String>) -> Result<Self> {
        if self.cfg.num_intents != Some(intents.len()) {
            return Err(ModelError::Unsupported(format!(
                "{} intent names for a tagger with {} intents",
                intents.len(),
                self.cfg.num_intents.unwrap_or(0)
            )));
        }
        self.intents = intents;
        Ok(self)
    }

    /// The intent names of an intent-aware tagger (empty otherwise).
    pub fn intents(&self) -> &[String] {
        &self.intents
    }

    pub fn config(&self) -> &TaggerConfig {
        &self.cfg
    }
    /// Its fine-tuned encoder layers, if its config has `branch_from`.
    pub fn branch(&self) -> Option<&Branch> {
        self.branch.as_ref()
    }
    pub fn tags(&self) -> &[String] {
        &self.tags
    }
    pub fn vocab(&self) -> Option<&Vocab> {
        self.vocab.as_ref()
    }
    pub fn crf(&self) -> &Crf {
        &self.crf
    }
    pub fn lstm(&self) -> &BiLstm {
        &self.lstm
    }
    /// The prefix of the emission layer's tensors (`hidden2tag`, or what the checkpoint has).
    pub fn emission_name(&self) -> &str {
        &self.emission_name
    }

    /// A tag path's names.
    pub fn tag_names(&self, path: &[u32]) -> Vec<&str> {
        path.iter().map(|&t| self.tags[t as usize].as_str()).collect()
    }

    /// Character ids of `texts`, padded to the longest: (`[B, L]` u32, or `[B, L, k]` with
    /// character bigrams or lexicon features ([`IdColumns`]), and lengths), ready for
    /// [`Self::forward_emissions`]. Embeddings input with a vocabulary only.
    pub fn char_ids(&self, texts: &[&str], device: &Device) -> Result<(Tensor, Vec<usize>)> {
        // Each character as a slice of its text: no copies.
        let chars: Vec<Vec<&str>> =
            texts.iter().map(|t| t.char_indices().map(|(i, c)| &t[i..i + c.len_utf8()]).collect()).collect();
        let refs: Vec<&[&str]> = chars.iter().map(Vec::as_slice).collect();
        let lengths: Vec<usize> = chars.iter().map(Vec::len).collect();
        Ok((self.token_ids(&refs, device)?, lengths))
    }

    /// Ids for sequences of tokens (characters), padded to the longest as [`Self::char_ids`]
    /// says; with character bigrams and lexicon features, each token's other ids follow its own
    /// ([`IdColumns`]).
    pub fn token_ids<S: AsRef<str>>(&self, seqs: &[&[S]], device: &Device) -> Result<Tensor> {
        let cols = self
            .id_columns()
            .ok_or_else(|| ModelError::InvalidInput("this tagger has no vocabulary: it takes encoder features".into()))?;
        let l = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let pad = cols.padding();
        let mut flat = Vec::with_capacity(seqs.len() * l * pad.len());
        for s in seqs {
            flat.extend(cols.encode(s));
            for _ in s.len()..l {
                flat.extend_from_slice(&pad);
            }
        }
        Ok(match pad.len() {
            1 => Tensor::from_vec(flat, (seqs.len(), l), device)?,
            k => Tensor::from_vec(flat, (seqs.len(), l, k), device)?,
        })
    }

    /// Emission scores `[B, L, num_tags]` (zero LSTM state at padding: the emission bias, plus
    /// the intent term for an intent-aware tagger) for encoder features `[B, L, input_dim]` or
    /// token ids `[B, L]` (u32), as the config says.
    pub fn forward_emissions(&self, input: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        Ok(self.forward(input, lengths, false)?.emissions)
    }

    /// Emission scores and (intent-aware tagger) intent logits, with dropout when `train`
    /// (between LSTM layers and before the emission and intent layers).
    pub fn forward(&self, input: &Tensor, lengths: &[usize], train: bool) -> Result<TaggerOutput> {
        // Embeddings input: the frozen, shared features (soft lexicon, char BERT) once; each
        // member then adds its own (tables, LAC). Encoder input: the same features for all.
        let (x, shared) = match (&self.embedding, self.cfg.input) {
            (Some(_), InputKind::Embeddings) => {
                let cols = self.cfg.id_columns();
                let rank = if cols > 1 { 3 } else { 2 };
                if input.rank() != rank || input.dtype().is_float() || (rank == 3 && input.dim(2)? != cols) {
                    let want = if rank == 3 {
                        format!("[batch, length, {cols}] (character, then the bigram, lexicon class, LAC and word-set ids the tagger reads)")
                    } else {
                        "[batch, length]".to_string()
                    };
                    return Err(ModelError::InvalidInput(format!(
                        "this tagger takes token ids {want}; got {:?} {:?}",
                        input.dtype(),
                        input.dims()
                    )));
                }
                let shared = self.shared_id_features(input, lengths)?;
                (self.own_id_features(input, lengths, &shared)?, Some(shared))
            }
            _ => {
                let width = self.features_width();
                if input.rank() != 3 || input.dim(2)? != width || !input.dtype().is_float() {
                    return Err(ModelError::InvalidInput(format!(
                        "this tagger takes features [batch, length, {width}]; got {:?} {:?}",
                        input.dtype(),
                        input.dims()
                    )));
                }
                (input.to_dtype(self.emission.weight().dtype())?, None)
            }
        };
        // An ensemble with fine-tuned encoder layers: member k's features are the k-th slice.
        let own = |k: usize, x: &Tensor| -> Result<Tensor> {
            match self.features_width() == self.cfg.input_dim {
                true => Ok(x.clone()),
                false => Ok(x.narrow(2, k * self.cfg.input_dim, self.cfg.input_dim)?),
            }
        };
        if self.members.is_empty() {
            return self.forward_features(&x, lengths, train);
        }
        if train {
            return Err(ModelError::InvalidInput(
                "an ensemble is for inference: train its members apart and assemble them (concierge ensemble-tagger)".into(),
            ));
        }
        // The mean of the members' emission scores (or, voting by marginals, of their CRFs'
        // marginals) and of their intent logits.
        let vote = |crf: &Crf, emissions: Tensor| -> Result<Tensor> {
            match self.cfg.ensemble_vote {
                EnsembleVote::Scores => Ok(emissions),
                EnsembleVote::Marginals => crf.marginals(&emissions, lengths),
            }
        };
        let mut out = self.forward_features(&own(0, &x)?, lengths, false)?;
        let dtype = out.emissions.dtype();
        out.emissions = vote(self.own_crf.as_ref().unwrap_or(&self.crf), out.emissions)?;
        for (k, m) in self.members.iter().enumerate() {
            let o = match &shared {
                Some(shared) => m.forward_features(&m.own_id_features(input, lengths, shared)?, lengths, false)?,
                None => m.forward_features(&own(k + 1, &x)?, lengths, false)?,
            };
            out.emissions = (out.emissions + vote(&m.crf, o.emissions)?)?;
            out.intent_logits = match (out.intent_logits, o.intent_logits) {
                (Some(a), Some(b)) => Some((a + b)?),
                _ => None,
            };
        }
        let k = self.num_members() as f64;
        let mut emissions = (out.emissions / k)?;
        if self.cfg.ensemble_vote == EnsembleVote::Marginals {
            // Log mean marginals; a tag no member allows (or padding) gets log(1e-30), not -inf.
            emissions = emissions.maximum(1e-30)?.log()?.to_dtype(dtype)?;
        }
        Ok(TaggerOutput { emissions, intent_logits: out.intent_logits.map(|l| l / k).transpose()? })
    }

    /// Embeddings input, ids as `forward` checked them: the features from frozen parts every
    /// ensemble member shares (soft lexicon, then char BERT), in the tagger's feature order.
    fn shared_id_features(&self, input: &Tensor, lengths: &[usize]) -> Result<Vec<Tensor>> {
        let mut parts = Vec::new();
        if input.rank() != 3 {
            return Ok(parts);
        }
        let dtype = self.embedding.as_ref().map_or(DType::F32, |e| e.embeddings().dtype());
        // The shared features' ids are the last columns.
        let shared_cols = self.cfg.soft_lexicon.as_ref().map_or(0, SoftLexiconConfig::id_columns) + usize::from(self.cfg.char_bert.is_some());
        let mut next = self.cfg.id_columns() - shared_cols;
        if let Some(soft_cfg) = &self.cfg.soft_lexicon {
            let soft = self.soft_lexicon.as_ref().ok_or_else(|| {
                ModelError::InvalidInput("this tagger reads soft lexicon features, but none is attached (with_soft_lexicon)".into())
            })?;
            let ids = input.narrow(2, next, soft_cfg.id_columns())?.contiguous()?;
            parts.push(soft.features(&ids, dtype)?);
            next += soft_cfg.id_columns();
        }
        if self.cfg.char_bert.is_some() {
            let cb = self.char_bert.as_ref().ok_or_else(|| {
                ModelError::InvalidInput("this tagger reads char BERT features, but none is attached (with_char_bert)".into())
            })?;
            let ids = input.narrow(2, next, 1)?.squeeze(2)?.contiguous()?;
            parts.push(cb.features(&ids, lengths, dtype)?);
        }
        Ok(parts)
    }

    /// Embeddings input: this tagger's (member's) own features from its tables and LAC network,
    /// followed by the `shared` ones ([`Self::shared_id_features`]): the BiLSTM's input.
    fn own_id_features(&self, input: &Tensor, lengths: &[usize], shared: &[Tensor]) -> Result<Tensor> {
        let emb = self.embedding.as_ref().ok_or_else(|| ModelError::InvalidInput("this tagger has no embedding table".into()))?;
        if input.rank() == 2 {
            return Ok(emb.forward(input)?);
        }
        let at = |k: usize| input.narrow(2, k, 1).and_then(|t| t.squeeze(2));
        let mut parts = vec![emb.forward(&at(0)?)?];
        let mut next = 1;
        if let Some(bemb) = &self.bigram_embedding {
            parts.push(bemb.forward(&at(1)?)?);
            parts.push(bemb.forward(&at(2)?)?);
            next = 3;
        }
        if let Some(lemb) = &self.lexicon_embedding {
            let (b, l, _) = input.dims3()?;
            let c = self.cfg.lexicon_classes().len();
            let ids = input.narrow(2, next, c)?.contiguous()?;
            parts.push(lemb.forward(&ids)?.reshape((b, l, c * lemb.hidden_size()))?);
            next += c;
        }
        if self.cfg.lac.is_some() {
            let lac = self.lac.as_ref().ok_or_else(|| {
                ModelError::InvalidInput("this tagger reads LAC features, but no LAC network is attached (with_lac)".into())
            })?;
            parts.push(lac.features(&at(next)?.contiguous()?, lengths, parts[0].dtype())?);
        }
        parts.extend(shared.iter().cloned());
        Ok(Tensor::cat(&parts, 2)?)
    }

    /// One member's emission scores (and intent logits) from the BiLSTM's input `x`.
    fn forward_features(&self, x: &Tensor, lengths: &[usize], train: bool) -> Result<TaggerOutput> {
        let mut h = self.lstm.forward(x, lengths, train)?;
        if train && self.cfg.dropout > 0.0 {
            h = candle_nn::ops::dropout(&h, self.cfg.dropout)?;
        }
        let emissions = self.emission.forward(&h)?;
        let Some(intent) = &self.intent else {
            return Ok(TaggerOutput { emissions, intent_logits: None });
        };
        // The mean of each sequence's outputs (zero at padding, so a sum over its length).
        let inv: Vec<f32> = lengths.iter().map(|&n| 1.0 / n.max(1) as f32).collect();
        let inv = Tensor::from_vec(inv, (lengths.len(), 1), h.device())?.to_dtype(h.dtype())?;
        let mean = h.sum(1)?.broadcast_mul(&inv)?;
        let logits = intent.classify.forward(&mean)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        let bias = intent.emission.forward(&probs)?.unsqueeze(1)?;
        Ok(TaggerOutput { emissions: emissions.broadcast_add(&bias)?, intent_logits: Some(logits) })
    }

    /// As [`Self::forward_emissions`], with dropout when `train`.
    pub fn emissions(&self, input: &Tensor, lengths: &[usize], train: bool) -> Result<Tensor> {
        Ok(self.forward(input, lengths, train)?.emissions)
    }

    /// An intent-aware tagger's intent probabilities `[B, num_intents]` (f32); None otherwise.
    pub fn intent_probs(&self, input: &Tensor, lengths: &[usize]) -> Result<Option<Tensor>> {
        match self.forward(input, lengths, false)?.intent_logits {
            Some(l) => Ok(Some(candle_nn::ops::softmax_last_dim(&l.to_dtype(DType::F32)?)?)),
            None => Ok(None),
        }
    }

    /// The best tag path per sequence and its score.
    pub fn decode(&self, input: &Tensor, lengths: &[usize]) -> Result<Vec<TagPath>> {
        self.crf.decode(&self.forward_emissions(input, lengths)?, lengths)
    }

    /// p(tag at t) per position, `[B, L, num_tags]` f32, zero at padding.
    pub fn marginals(&self, input: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        self.crf.marginals(&self.forward_emissions(input, lengths)?, lengths)
    }

    /// Negative log-likelihood of the gold `tags` (each as long as its sequence), reduced as
    /// `reduction` says; no dropout. A differentiable scalar.
    pub fn nll(&self, input: &Tensor, tags: &[Vec<u32>], reduction: Reduction) -> Result<Tensor> {
        let lengths: Vec<usize> = tags.iter().map(Vec::len).collect();
        self.crf.nll(&self.forward_emissions(input, &lengths)?, tags, reduction)
    }

    /// The training loss: [`Self::nll`] with dropout on.
    pub fn training_loss(&self, input: &Tensor, tags: &[Vec<u32>], reduction: Reduction) -> Result<Tensor> {
        let lengths: Vec<usize> = tags.iter().map(Vec::len).collect();
        self.crf.nll(&self.emissions(input, &lengths, true)?, tags, reduction)
    }

    /// The joint loss of an intent-aware tagger: the CRF's mean negative log-likelihood of the
    /// gold `tags` plus `intent_weight` times the mean cross-entropy of the gold `intents` (ids,
    /// one per sequence), with dropout when `train`. A differentiable scalar.
    pub fn joint_loss(&self, input: &Tensor, tags: &[Vec<u32>], intents: &[u32], intent_weight: f64, train: bool) -> Result<Tensor> {
        let lengths: Vec<usize> = tags.iter().map(Vec::len).collect();
        let out = self.forward(input, &lengths, train)?;
        let nll = self.crf.nll(&out.emissions, tags, Reduction::Mean)?;
        let Some(logits) = out.intent_logits else {
            return Err(ModelError::InvalidInput("joint_loss: this tagger has no intent layers (num_intents)".into()));
        };
        let n = self.cfg.num_intents.unwrap_or(0);
        if intents.len() != tags.len() || intents.iter().any(|&i| i as usize >= n) {
            return Err(ModelError::InvalidInput(format!(
                "joint_loss: {} intent ids for {} sequences, each below {n}",
                intents.len(),
                tags.len()
            )));
        }
        let target = Tensor::from_vec(intents.to_vec(), intents.len(), logits.device())?;
        let ce = candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &target)?;
        Ok((nll + (ce * intent_weight)?)?)
    }
}

fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let bad = |reason: String| ModelError::BadFile { path: path.to_owned(), reason };
    let mut text = serde_json::to_string_pretty(value).map_err(|e| bad(e.to_string()))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| bad(e.to_string()))
}
