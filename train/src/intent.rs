//! `concierge train-intent` and `concierge eval-intent`: an intent classifier over the text
//! encoder, trained here. The encoder's lower layers stay frozen and run once over the data
//! (their states are cached); the top `--train-layers` layers are fine-tuned (a differentiable
//! copy of BERT's layer, padded batches), then mean pooling, dropout and an MLP head; with
//! images, a cross-attention block lets the text tokens attend to the image encoder's spatial
//! features first. AdamW with linear warm-up and decay, seeded, dev-set model selection. The
//! handoff threshold is calibrated on the dev set and stored in the checkpoint.
//!
//! Data: Banking77's CSV (`text,category`), CLINC150's `data_full.json` (its own train / val /
//! test splits with the out-of-scope queries as label `oos`), or JSONL of
//! `{"text", "label", "images": [paths]}` (image paths relative to the file).
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::{Args, ValueEnum};
use concierge_models::bert::Config as BertConfig;
use concierge_models::fusion::{CrossAttentionFusion, FusionConfig};
use concierge_models::imageproc::ImageLimits;
use concierge_models::intent::{is_out_of_scope_name, EncoderRef, IntentConfig, IntentModel, IntentPooling};
use concierge_models::{ImageEncoder, ModelSource, TextEncoder, TokenizedText};
use serde::{Deserialize, Serialize};

use crate::layers::{encoder_weight, pad_rows, Dense, Dropout, RelativeBias, TrainLayer};
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DataFormat {
    /// Banking77's CSV: header `text,category`, quoted fields.
    Banking77,
    /// CLINC150's `data_full.json` (train/val/test + oos_train/oos_val/oos_test, label `oos`).
    Clinc150,
    /// One JSON object per line: `{"text": ..., "label": ..., "images": ["a.jpg", ...]}`.
    Jsonl,
}

#[derive(Debug, Clone, Args)]
pub struct TrainIntent {
    #[arg(long, value_enum)]
    pub format: DataFormat,
    /// Training data (for CLINC150: data_full.json, whose val and test splits are used too).
    #[arg(long)]
    pub train: PathBuf,
    /// Dev data for model selection and calibration; default: CLINC150's val split, else a
    /// seeded, per-label --dev-fraction of --train held out.
    #[arg(long)]
    pub dev: Option<PathBuf>,
    #[arg(long, default_value_t = 0.1)]
    pub dev_fraction: f64,
    /// Test data scored at the end (CLINC150: its test split unless given).
    #[arg(long)]
    pub test: Option<PathBuf>,
    /// Text encoder folder.
    #[arg(long, default_value = "model-store/all-MiniLM-L6-v2")]
    pub encoder_dir: PathBuf,
    /// Image encoder folder (JSONL with images).
    #[arg(long, default_value = "model-store/open-nsfw")]
    pub image_model_dir: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Top encoder layers to fine-tune (0: the head alone over frozen states).
    #[arg(long, default_value_t = 2)]
    pub train_layers: usize,
    /// Hidden widths of the MLP head (repeat or comma-separate; none: linear).
    #[arg(long, value_delimiter = ',')]
    pub hidden: Vec<usize>,
    #[arg(long, default_value_t = 0.1)]
    pub dropout: f32,
    #[arg(long, default_value_t = 5)]
    pub epochs: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Peak learning rate of the fine-tuned encoder layers (and the fusion block).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Peak learning rate of the head.
    #[arg(long, default_value_t = 2e-3)]
    pub head_lr: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Label smoothing: the loss's target gives this much probability spread evenly over all
    /// labels (0: plain cross-entropy).
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Fraction of the steps spent warming the learning rate up from 0 (then linear decay to 0).
    #[arg(long, default_value_t = 0.06)]
    pub warmup: f64,
    #[arg(long, default_value_t = 13)]
    pub seed: u64,
    /// Fusion block: attention heads and feed-forward width (with images).
    #[arg(long, default_value_t = 4)]
    pub fusion_heads: usize,
    #[arg(long, default_value_t = 768)]
    pub fusion_ffn: usize,
    /// Handoff calibration on the dev set.
    #[command(flatten)]
    pub targets: Targets,
    /// Save the fine-tuned encoder layers in f32 instead of f16 (f16 halves the checkpoint;
    /// the model is rounded before it is scored, so every reported figure is of what is saved).
    #[arg(long = "branch-f32", action = clap::ArgAction::SetFalse)]
    pub branch_f16: bool,
    /// Stop after this many minutes (at the end of an epoch), keeping the best so far.
    #[arg(long)]
    pub max_minutes: Option<f64>,
    /// Use only the first N training examples (after the dev hold-out).
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct EvalIntent {
    /// Intent checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum)]
    pub format: DataFormat,
    /// Data to score (CLINC150: data_full.json, see --split).
    #[arg(long)]
    pub data: PathBuf,
    /// CLINC150 split: test or val (with the matching oos split).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Text encoder folder (a Hugging Face classifier folder is its own encoder: pass it here too).
    #[arg(long, default_value = "model-store/all-MiniLM-L6-v2")]
    pub encoder_dir: PathBuf,
    #[arg(long, default_value = "model-store/open-nsfw")]
    pub image_model_dir: PathBuf,
    /// Handoff threshold to score with (default: the checkpoint's).
    #[arg(long)]
    pub threshold: Option<f32>,
    #[arg(long)]
    pub limit: Option<usize>,
    /// Calibrate the handoff threshold on this data (a validation split, never the test split)
    /// and write it into the checkpoint's intent_config.json.
    #[arg(long)]
    pub calibrate: bool,
    #[command(flatten)]
    pub targets: Targets,
}

/// One labelled example.
#[derive(Debug, Clone)]
pub struct Example {
    pub text: String,
    pub label: String,
    pub images: Vec<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Data

/// A CSV file's records (RFC 4180 quoting: `"a, b"`, `""` for a quote inside quotes).
fn parse_csv(text: &str) -> anyhow::Result<Vec<Vec<String>>> {
    let mut rows = Vec::new();
    let (mut row, mut field, mut quoted, mut at_start) = (Vec::new(), String::new(), false, true);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if at_start => quoted = true,
            ',' => {
                row.push(std::mem::take(&mut field));
                at_start = true;
                continue;
            }
            '\r' => {}
            '\n' => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
                at_start = true;
                continue;
            }
            _ => field.push(c),
        }
        at_start = false;
    }
    if quoted {
        bail!("unterminated quoted field");
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    Ok(rows)
}

pub fn read_banking77(path: &Path) -> anyhow::Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let rows = parse_csv(&text).with_context(|| format!("parsing {}", path.display()))?;
    let (header, rows) = rows.split_first().context("empty CSV")?;
    let col = |name: &str| header.iter().position(|h| h.trim() == name).with_context(|| format!("no `{name}` column in {}", path.display()));
    let (t, c) = (col("text")?, col("category")?);
    rows.iter()
        .filter(|r| r.len() > 1 || r.first().is_some_and(|f| !f.is_empty()))
        .enumerate()
        .map(|(i, r)| {
            let (Some(text), Some(label)) = (r.get(t), r.get(c)) else {
                bail!("{} row {}: expected {} fields", path.display(), i + 2, header.len());
            };
            Ok(Example { text: text.trim().to_string(), label: label.trim().to_string(), images: Vec::new() })
        })
        .collect()
}

/// CLINC150's split `name` (`train`, `val`, `test`) with its out-of-scope queries (`oos_*`).
pub fn read_clinc150(path: &Path, name: &str) -> anyhow::Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let all: HashMap<String, Vec<(String, String)>> =
        serde_json::from_str(&text).with_context(|| format!("{} is not CLINC150's data_full.json", path.display()))?;
    let mut out = Vec::new();
    for split in [name.to_string(), format!("oos_{name}")] {
        let items = all.get(&split).with_context(|| format!("{} has no `{split}` split", path.display()))?;
        out.extend(items.iter().map(|(t, l)| Example { text: t.clone(), label: l.clone(), images: Vec::new() }));
    }
    Ok(out)
}

#[derive(Deserialize)]
struct JsonlRow {
    text: String,
    label: String,
    #[serde(default)]
    images: Vec<PathBuf>,
}

pub fn read_jsonl(path: &Path) -> anyhow::Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let r: JsonlRow = serde_json::from_str(line)
                .with_context(|| format!("{} line {}: expected {{\"text\", \"label\", \"images\"}}", path.display(), i + 1))?;
            let images = r.images.into_iter().map(|p| if p.is_absolute() { p } else { base.join(p) }).collect();
            Ok(Example { text: r.text, label: r.label, images })
        })
        .collect()
}

fn read(format: DataFormat, path: &Path, clinc_split: &str) -> anyhow::Result<Vec<Example>> {
    match format {
        DataFormat::Banking77 => read_banking77(path),
        DataFormat::Clinc150 => read_clinc150(path, clinc_split),
        DataFormat::Jsonl => read_jsonl(path),
    }
}

/// A seeded hold-out of `fraction` of each label's examples.
pub fn stratified_split(examples: Vec<Example>, fraction: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
    let mut by_label: BTreeMap<String, Vec<Example>> = BTreeMap::new();
    for e in examples {
        by_label.entry(e.label.clone()).or_default().push(e);
    }
    let mut rng = Rng::new(seed ^ 0x5EED_0D57);
    let (mut train, mut dev) = (Vec::new(), Vec::new());
    for (_, mut items) in by_label {
        rng.shuffle(&mut items);
        let n_dev = ((items.len() as f64) * fraction).round() as usize;
        let n_dev = n_dev.min(items.len().saturating_sub(1));
        dev.extend(items.drain(..n_dev));
        train.extend(items);
    }
    rng.shuffle(&mut train);
    (train, dev)
}

// ---------------------------------------------------------------------------------------------
// Features: the frozen encoder runs once; image features once per distinct file.

struct Featurized {
    /// Per example: the encoder's states after the frozen layers, `[len, H]`.
    states: Vec<Tensor>,
    /// Per example: image positions `[N, C]` (all its images), if any.
    images: Vec<Option<Tensor>>,
    labels: Vec<u32>,
}

struct Featurizer {
    encoder: TextEncoder,
    images: Option<ImageEncoder>,
    tap: usize,
    cache: HashMap<PathBuf, Tensor>,
}

impl Featurizer {
    fn tokenize(&self, examples: &[Example]) -> anyhow::Result<Vec<TokenizedText>> {
        examples.iter().enumerate().map(|(i, e)| Ok(self.encoder.tokenize(i, &e.text, true)?)).collect()
    }

    fn image_positions(&mut self, path: &Path) -> anyhow::Result<Tensor> {
        if let Some(t) = self.cache.get(path) {
            return Ok(t.clone());
        }
        let enc = self.images.as_ref().context("examples have images but no image encoder is loaded")?;
        let bytes = std::fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
        let input = enc.prepare(0, &bytes, &ImageLimits::default()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let features = enc.features(&[&input])?;
        let pos = CrossAttentionFusion::positions(&features.get(0)?)?;
        self.cache.insert(path.to_owned(), pos.clone());
        Ok(pos)
    }

    fn run(&mut self, examples: &[Example], label_ids: &HashMap<String, u32>, what: &str, quiet: bool) -> anyhow::Result<Featurized> {
        let tokens = self.tokenize(examples)?;
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.sort_by_key(|&i| tokens[i].len());
        let mut states = vec![None; examples.len()];
        let bar = crate::progress(examples.len() as u64, &format!("encoding {what}"));
        if quiet {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        for chunk in order.chunks(64) {
            let batch: Vec<&TokenizedText> = chunk.iter().map(|&i| &tokens[i]).collect();
            let (last, tapped) = self.encoder.token_states_tapped(&batch, Some(self.tap))?;
            let hidden = tapped.unwrap_or(last.hidden).to_dtype(DType::F32)?;
            let mut start = 0;
            for &i in chunk {
                let len = tokens[i].len();
                states[i] = Some(hidden.narrow(0, start, len)?.contiguous()?);
                start += len;
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        let mut images = Vec::with_capacity(examples.len());
        for e in examples {
            images.push(match e.images.is_empty() {
                true => None,
                false => {
                    let parts = e.images.iter().map(|p| self.image_positions(p)).collect::<anyhow::Result<Vec<_>>>()?;
                    Some(Tensor::cat(&parts, 0)?)
                }
            });
        }
        let labels = examples
            .iter()
            .map(|e| label_ids.get(&e.label).copied().with_context(|| format!("{what}: label {:?} is not in the training set", e.label)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Featurized { states: states.into_iter().map(|s| s.expect("every example encoded")).collect(), images, labels })
    }
}

// ---------------------------------------------------------------------------------------------
// The trainable model (autograd): BERT layers on padded batches, fusion, pooling, MLP.

struct Trainable {
    layers: Vec<TrainLayer>,
    relative: Option<RelativeBias>,
    fusion: Option<CrossAttentionFusion>,
    hidden: Vec<Dense>,
    out: Dense,
}

/// A padded batch: states `[B, L, H]`, token mask `[B, L]`, optional image positions
/// `[B, N, C]` with their mask `[B, N]` and which rows have images `[B]`.
struct Batch {
    x: Tensor,
    mask: Tensor,
    images: Option<(Tensor, Tensor, Tensor)>,
    labels: Tensor,
}

fn make_batch(data: &Featurized, idx: &[usize], device: &Device) -> anyhow::Result<Batch> {
    let rows: Vec<&Tensor> = idx.iter().map(|&i| &data.states[i]).collect();
    let (x, mask) = pad_rows(&rows, device)?;
    let images = if idx.iter().any(|&i| data.images[i].is_some()) {
        let c = idx.iter().find_map(|&i| data.images[i].as_ref()).expect("some row has images").dim(1)?;
        let empty = Tensor::zeros((1, c), DType::F32, device)?;
        let rows: Vec<&Tensor> = idx.iter().map(|&i| data.images[i].as_ref().unwrap_or(&empty)).collect();
        let (img, mut img_mask) = pad_rows(&rows, device)?;
        let has: Vec<f32> = idx.iter().map(|&i| if data.images[i].is_some() { 1.0 } else { 0.0 }).collect();
        let has = Tensor::from_vec(has, idx.len(), device)?;
        img_mask = img_mask.broadcast_mul(&has.unsqueeze(1)?)?;
        Some((img, img_mask, has))
    } else {
        None
    };
    let labels = Tensor::from_vec(idx.iter().map(|&i| data.labels[i]).collect::<Vec<u32>>(), idx.len(), device)?;
    Ok(Batch { x, mask, images, labels })
}

impl Trainable {
    fn forward(&self, batch: &Batch, drop: &mut Dropout) -> candle_core::Result<Tensor> {
        let mut key_mask = ((batch.mask.clone() - 1.0)? * 1e9)?.unsqueeze(1)?.unsqueeze(1)?;
        if let (Some(r), false) = (&self.relative, self.layers.is_empty()) {
            key_mask = r.add_to(&key_mask)?;
        }
        let mut x = batch.x.clone();
        for layer in &self.layers {
            x = layer.forward(&x, &key_mask, drop)?;
        }
        if let (Some(fusion), Some((img, img_mask, has))) = (&self.fusion, &batch.images) {
            let fused = fusion.forward(&x, img, Some(img_mask)).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let has = has.reshape((has.dim(0)?, 1, 1))?;
            x = (fused.broadcast_mul(&has)? + x.broadcast_mul(&(1.0 - has)?)?)?;
        }
        let m = batch.mask.unsqueeze(2)?;
        let pooled = x.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?)?;
        let mut h = drop.apply(&pooled)?;
        for layer in &self.hidden {
            h = drop.apply(&layer.forward(&h)?.gelu_erf()?)?;
        }
        self.out.forward(&h)
    }
}

fn predict(model: &Trainable, data: &Featurized, device: &Device) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut order: Vec<usize> = (0..data.labels.len()).collect();
    order.sort_by_key(|&i| data.states[i].dim(0).unwrap_or(0));
    let mut probs = vec![Vec::new(); order.len()];
    for chunk in order.chunks(64) {
        let batch = make_batch(data, chunk, device)?;
        let logits = model.forward(&batch, &mut Dropout(None))?.detach();
        let p = candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
        for (&i, row) in chunk.iter().zip(p) {
            probs[i] = row;
        }
    }
    Ok(probs)
}

// ---------------------------------------------------------------------------------------------
// Scores and calibration

/// Accuracy, macro-F1 and, with out-of-scope labels, the CLINC150 figures.
#[derive(Debug, Clone, Serialize)]
pub struct IntentScores {
    pub examples: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    /// In-scope examples, and the share answered with their label and not handed off.
    pub in_scope: usize,
    pub in_scope_accuracy: f64,
    /// The same without the threshold (the classifier's argmax alone).
    pub in_scope_accuracy_argmax: f64,
    pub out_of_scope: usize,
    /// Share of out-of-scope examples handed off (predicted out-of-scope or under the threshold).
    pub oos_recall: f64,
    /// Share of all examples handed off.
    pub handoff_rate: f64,
    /// Accuracy of the answers not handed off.
    pub answered_precision: f64,
    pub threshold: f32,
}

impl std::fmt::Display for IntentScores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "examples {}: accuracy {:.2}%, macro-F1 {:.2}%", self.examples, self.accuracy * 100.0, self.macro_f1 * 100.0)?;
        writeln!(
            f,
            "handoff threshold {:.3}: {:.2}% handed off; answers kept are right {:.2}% of the time",
            self.threshold, self.handoff_rate * 100.0, self.answered_precision * 100.0
        )?;
        if self.out_of_scope > 0 {
            writeln!(
                f,
                "in-scope {}: accuracy {:.2}% (argmax alone {:.2}%); out-of-scope {}: recall {:.2}%",
                self.in_scope, self.in_scope_accuracy * 100.0, self.in_scope_accuracy_argmax * 100.0,
                self.out_of_scope, self.oos_recall * 100.0
            )?;
        }
        Ok(())
    }
}

pub fn score(probs: &[Vec<f32>], gold: &[u32], labels: &[String], threshold: f32) -> IntentScores {
    let oos: Vec<bool> = labels.iter().map(|l| is_out_of_scope_name(l)).collect();
    let k = labels.len();
    let (mut tp, mut fp, mut fnn) = (vec![0usize; k], vec![0usize; k], vec![0usize; k]);
    let (mut correct, mut in_scope, mut in_ok, mut in_ok_argmax, mut n_oos, mut oos_caught) = (0, 0, 0, 0, 0, 0);
    let (mut handed, mut kept, mut kept_ok) = (0, 0, 0);
    for (p, &g) in probs.iter().zip(gold) {
        let (best, top) = p.iter().enumerate().fold((0, f32::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a });
        let g = g as usize;
        let handoff = top < threshold || oos[best];
        if best == g {
            correct += 1;
            tp[g] += 1;
        } else {
            fp[best] += 1;
            fnn[g] += 1;
        }
        if handoff {
            handed += 1;
        } else {
            kept += 1;
            kept_ok += usize::from(best == g);
        }
        if oos[g] {
            n_oos += 1;
            oos_caught += usize::from(handoff);
        } else {
            in_scope += 1;
            in_ok_argmax += usize::from(best == g);
            in_ok += usize::from(best == g && !handoff);
        }
    }
    let present: Vec<usize> = (0..k).filter(|&i| tp[i] + fnn[i] > 0).collect();
    let macro_f1 = present
        .iter()
        .map(|&i| {
            let (t, p, n) = (tp[i] as f64, fp[i] as f64, fnn[i] as f64);
            if t == 0.0 { 0.0 } else { 2.0 * t / (2.0 * t + p + n) }
        })
        .sum::<f64>()
        / present.len().max(1) as f64;
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    IntentScores {
        examples: gold.len(),
        accuracy: ratio(correct, gold.len()),
        macro_f1,
        in_scope,
        in_scope_accuracy: ratio(in_ok, in_scope),
        in_scope_accuracy_argmax: ratio(in_ok_argmax, in_scope),
        out_of_scope: n_oos,
        oos_recall: ratio(oos_caught, n_oos),
        handoff_rate: ratio(handed, gold.len()),
        answered_precision: ratio(kept_ok, kept),
        threshold,
    }
}

/// What the handoff threshold is calibrated for.
#[derive(Debug, Clone, Copy, PartialEq, Args)]
pub struct Targets {
    /// Without out-of-scope examples in the calibration data: the lowest threshold at which the
    /// answers not handed off are right this often.
    #[arg(long = "target-precision", default_value_t = 0.97)]
    pub precision: f64,
    /// With out-of-scope examples: the lowest threshold at which this share of them is handed
    /// off (in-scope accuracy only falls as the threshold rises, so the lowest is the best).
    #[arg(long = "target-oos-recall", default_value_t = 0.8)]
    pub oos_recall: f64,
}

/// The handoff threshold from predictions on calibration data (see [`Targets`]); when no
/// threshold reaches the target, the one with the best mean of in-scope accuracy and
/// out-of-scope recall (with out-of-scope data) or 0.99 (without).
pub fn calibrate(probs: &[Vec<f32>], gold: &[u32], labels: &[String], targets: Targets) -> f32 {
    let candidates: Vec<f32> = (0..=99).map(|i| i as f32 / 100.0).collect();
    let has_oos = gold.iter().any(|&g| is_out_of_scope_name(&labels[g as usize]));
    if has_oos {
        if let Some(t) = candidates.iter().copied().find(|&t| score(probs, gold, labels, t).oos_recall >= targets.oos_recall) {
            return t;
        }
        let mut best = (f64::MIN, 0.0f32);
        for &t in &candidates {
            let s = score(probs, gold, labels, t);
            let v = (s.in_scope_accuracy + s.oos_recall) / 2.0;
            if v > best.0 + 1e-12 {
                best = (v, t);
            }
        }
        best.1
    } else {
        candidates
            .iter()
            .copied()
            .find(|&t| score(probs, gold, labels, t).answered_precision >= targets.precision)
            .unwrap_or(0.99)
    }
}

// ---------------------------------------------------------------------------------------------
// Training

fn lr_factor(step: usize, total: usize, warmup: f64) -> f64 {
    let w = ((total as f64) * warmup).round().max(1.0);
    let s = step as f64;
    if s < w { (s + 1.0) / w } else { ((total as f64 - s) / (total as f64 - w).max(1.0)).max(0.0) }
}

#[derive(Serialize)]
struct EpochLog {
    epoch: usize,
    loss: f64,
    dev_accuracy: f64,
    seconds: f64,
}

/// What a training run gives back: the dev scores (calibrated threshold), the test scores when
/// there was test data, and how closely the saved checkpoint reproduces the trained model.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub dev: IntentScores,
    pub test: Option<IntentScores>,
    pub served_vs_trained_max_diff: f32,
}

/// Cross-entropy against targets smoothed by `eps`: `(1 - eps) * nll(label) + eps * mean over
/// labels of -log p`, averaged over the batch (Szegedy et al. 2016); `eps` 0 is the plain loss.
pub fn smoothed_cross_entropy(logits: &Tensor, labels: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if eps <= 0.0 {
        return candle_nn::loss::cross_entropy(logits, labels);
    }
    let logp = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)?;
    let nll = logp.gather(&labels.unsqueeze(1)?, 1)?.neg()?.mean_all()?;
    let spread = logp.mean(1)?.neg()?.mean_all()?;
    (nll * (1.0 - eps))? + (spread * eps)?
}

pub fn train(args: &TrainIntent) -> anyhow::Result<TrainOutcome> {
    let t_start = Instant::now();
    let device = Device::Cpu;
    let mut rng = Rng::new(args.seed);
    let clinc = args.format == DataFormat::Clinc150;
    let mut train_set = read(args.format, &args.train, "train")?;
    let dev_set = match (&args.dev, clinc) {
        (Some(p), _) => read(args.format, p, "val")?,
        (None, true) => read_clinc150(&args.train, "val")?,
        (None, false) => {
            let (t, d) = stratified_split(train_set, args.dev_fraction, args.seed);
            train_set = t;
            d
        }
    };
    let test_set = match (&args.test, clinc) {
        (Some(p), _) => Some(read(args.format, p, "test")?),
        (None, true) => Some(read_clinc150(&args.train, "test")?),
        (None, false) => None,
    };
    if let Some(n) = args.limit {
        train_set.truncate(n);
    }
    if train_set.is_empty() || dev_set.is_empty() {
        bail!("need training and dev examples; got {} and {}", train_set.len(), dev_set.len());
    }
    let labels: Vec<String> = train_set.iter().map(|e| e.label.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let label_ids: HashMap<String, u32> = labels.iter().enumerate().map(|(i, l)| (l.clone(), i as u32)).collect();

    let encoder = TextEncoder::load(&ModelSource::Dir(args.encoder_dir.clone()), &device, DType::F32, None)
        .with_context(|| format!("loading the text encoder from {}", args.encoder_dir.display()))?;
    let bert_cfg_path = args.encoder_dir.join("config.json");
    let bert_cfg: BertConfig = concierge_models::bert::read_config(&bert_cfg_path)?;
    let n_layers = encoder.num_layers();
    if args.train_layers > n_layers {
        bail!("--train-layers {} but the encoder has {n_layers} layers", args.train_layers);
    }
    let tap = n_layers - args.train_layers;
    let with_images = train_set.iter().any(|e| !e.images.is_empty());
    let images = match with_images {
        true => Some(
            ImageEncoder::load(&ModelSource::Dir(args.image_model_dir.clone()), &device, DType::F32)
                .with_context(|| format!("loading the image encoder from {}", args.image_model_dir.display()))?,
        ),
        false => None,
    };
    let hidden_size = encoder.hidden_size();
    let image_ref = images.as_ref().map(|i| EncoderRef { id: i.info().id.clone(), version: i.info().version.clone() });
    let encoder_ref = EncoderRef { id: encoder.info().id.clone(), version: encoder.info().version.clone() };
    let mut fz = Featurizer { encoder, images, tap, cache: HashMap::new() };
    let train_data = fz.run(&train_set, &label_ids, "train", args.quiet)?;
    let dev_data = fz.run(&dev_set, &label_ids, "dev", args.quiet)?;
    let image_channels = train_data.images.iter().flatten().next().map(|t| t.dim(1)).transpose()?;
    eprintln!(
        "train-intent: {} train / {} dev examples, {} labels, fine-tuning {} of {n_layers} layers{}; features ready in {:.1} s",
        train_set.len(), dev_set.len(), labels.len(), args.train_layers,
        if with_images { " + image fusion" } else { "" },
        t_start.elapsed().as_secs_f64()
    );

    // Parameters: fine-tuned layers start from the encoder's weights; the rest seeded.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let layers = (tap..n_layers)
        .map(|i| TrainLayer::new(vb.pp(format!("encoder.layer.{i}")), &bert_cfg))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let fusion_cfg = image_channels.map(|c| FusionConfig {
        hidden: hidden_size,
        image_channels: c,
        heads: args.fusion_heads,
        ffn: args.fusion_ffn,
        layer_norm_eps: 1e-5,
    });
    let fusion = fusion_cfg.as_ref().map(|f| CrossAttentionFusion::load(vb.pp("fusion"), f)).transpose()?;
    let mut d = hidden_size;
    let mut hidden = Vec::new();
    for (i, &h) in args.hidden.iter().enumerate() {
        hidden.push(Dense::new(&vb.pp(format!("head.hidden.{i}")), d, h)?);
        d = h;
    }
    let out = Dense::new(&vb.pp("head.out"), d, labels.len())?;
    // Fine-tuned layers start from the encoder's weights (read once, only when there are any);
    // MPNet's keep the encoder's relative bias (frozen; saved with them).
    let weights_path = args.encoder_dir.join("model.safetensors");
    let weights = match args.train_layers {
        0 => HashMap::new(),
        _ => candle_core::safetensors::load(&weights_path, &Device::Cpu).with_context(|| format!("reading {}", weights_path.display()))?,
    };
    let relative = match args.train_layers {
        0 => None,
        _ => RelativeBias::from_encoder(&bert_cfg, &weights, &weights_path)?,
    };
    let model = Trainable { layers, relative, fusion, hidden, out };
    init_parameters(&varmap, &weights, &weights_path, &mut rng)?;

    let (mut body_vars, mut head_vars) = (Vec::new(), Vec::new());
    for (name, var) in varmap.data().lock().expect("varmap lock").iter() {
        if name.starts_with("head.") { head_vars.push(var.clone()) } else { body_vars.push(var.clone()) }
    }
    let adam = |lr: f64| ParamsAdamW { lr, weight_decay: args.weight_decay, ..ParamsAdamW::default() };
    let mut body_opt = (!body_vars.is_empty()).then(|| AdamW::new(body_vars, adam(args.lr))).transpose()?;
    let mut head_opt = AdamW::new(head_vars, adam(args.head_lr))?;

    let mut order: Vec<usize> = (0..train_data.labels.len()).collect();
    let steps_per_epoch = order.len().div_ceil(args.batch);
    let total_steps = steps_per_epoch * args.epochs;
    let (mut best_acc, mut best_epoch, mut best): (f64, usize, Vec<(String, Tensor)>) = (-1.0, 0, Vec::new());
    let mut log = Vec::new();
    let mut step = 0usize;
    for epoch in 1..=args.epochs {
        let t0 = Instant::now();
        // Shuffle, sort pools of 50 batches by length (little padding), shuffle the batches.
        rng.shuffle(&mut order);
        for chunk in order.chunks_mut(args.batch * 50) {
            chunk.sort_by_key(|&i| train_data.states[i].dim(0).unwrap_or(0));
        }
        let mut batches: Vec<&[usize]> = order.chunks(args.batch).collect();
        rng.shuffle(&mut batches);
        let bar = crate::progress(steps_per_epoch as u64, &format!("epoch {epoch}/{}", args.epochs));
        if args.quiet {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let mut total = 0.0f64;
        for (i, idx) in batches.into_iter().enumerate() {
            let f = lr_factor(step, total_steps, args.warmup);
            head_opt.set_learning_rate(args.head_lr * f);
            if let Some(o) = body_opt.as_mut() {
                o.set_learning_rate(args.lr * f);
            }
            let batch = make_batch(&train_data, idx, &device)?;
            let logits = model.forward(&batch, &mut Dropout(Some((args.dropout, &mut rng))))?;
            let loss = smoothed_cross_entropy(&logits, &batch.labels, args.label_smoothing)?;
            let grads = loss.backward()?;
            head_opt.step(&grads)?;
            if let Some(o) = body_opt.as_mut() {
                o.step(&grads)?;
            }
            total += loss.to_scalar::<f32>()? as f64;
            step += 1;
            bar.inc(1);
            if i % 20 == 0 {
                bar.set_message(format!("loss {:.3}", total / (i + 1) as f64));
            }
        }
        bar.finish_and_clear();
        let probs = predict(&model, &dev_data, &device)?;
        let dev = score(&probs, &dev_data.labels, &labels, 0.0);
        let loss = total / steps_per_epoch as f64;
        let secs = t0.elapsed().as_secs_f64();
        eprintln!("epoch {epoch}: loss {loss:.4}, dev accuracy {:.2}% ({secs:.1} s)", dev.accuracy * 100.0);
        log.push(EpochLog { epoch, loss, dev_accuracy: dev.accuracy, seconds: secs });
        if dev.accuracy > best_acc {
            (best_acc, best_epoch) = (dev.accuracy, epoch);
            best = snapshot(&varmap)?;
        }
        if args.max_minutes.is_some_and(|m| t_start.elapsed().as_secs_f64() > m * 60.0) {
            eprintln!("stopping after epoch {epoch} (time limit)");
            break;
        }
    }
    restore(&varmap, &best)?;
    if args.branch_f16 {
        // Round the fine-tuned layers to f16 now, so everything scored below (and the served
        // checkpoint) is the model as saved.
        let data = varmap.data().lock().expect("varmap lock");
        for (name, var) in data.iter().filter(|(n, _)| n.starts_with("encoder.")) {
            var.set(&var.as_tensor().to_dtype(DType::F16)?.to_dtype(DType::F32)?)
                .with_context(|| format!("rounding {name}"))?;
        }
    }
    let train_secs = t_start.elapsed().as_secs_f64();

    let dev_probs = predict(&model, &dev_data, &device)?;
    let threshold = calibrate(&dev_probs, &dev_data.labels, &labels, args.targets);
    let dev_scores = score(&dev_probs, &dev_data.labels, &labels, threshold);
    eprintln!("best dev accuracy {:.2}% at epoch {best_epoch}; handoff threshold {threshold:.2}\ndev: {dev_scores}", best_acc * 100.0);

    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(n, v)| {
            let t = v.as_tensor().detach();
            let t = if args.branch_f16 && n.starts_with("encoder.") { t.to_dtype(DType::F16)? } else { t };
            Ok((n.clone(), t))
        })
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    let mut tensors = tensors;
    if let Some(r) = &model.relative {
        // f32 always (32 x heads values): the branch must add the bias the encoder adds.
        tensors.insert("encoder.relative_attention_bias.weight".into(), r.weight.clone());
    }
    candle_core::safetensors::save(&tensors, args.out.join("model.safetensors"))?;
    if args.train_layers > 0 {
        std::fs::copy(&bert_cfg_path, args.out.join("encoder_config.json"))?;
    }
    let mut summary = serde_json::json!({
        "format": format!("{:?}", args.format).to_lowercase(),
        "train": args.train.display().to_string(),
        "train_examples": train_set.len(), "dev_examples": dev_set.len(),
        "seed": args.seed, "train_layers": args.train_layers, "hidden": args.hidden, "dropout": args.dropout,
        "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "head_lr": args.head_lr,
        "weight_decay": args.weight_decay, "label_smoothing": args.label_smoothing, "warmup": args.warmup, "branch_f16": args.branch_f16,
        "target_precision": args.targets.precision, "target_oos_recall": args.targets.oos_recall,
        "best_epoch": best_epoch, "dev": &dev_scores, "train_seconds": train_secs, "log": log,
    });
    let mut config = IntentConfig {
        labels: labels.clone(),
        pooling: IntentPooling::Mean,
        input_dim: hidden_size,
        hidden: args.hidden.clone(),
        handoff_threshold: threshold,
        out_of_scope_labels: labels.iter().filter(|l| is_out_of_scope_name(l)).cloned().collect(),
        branch_from: (args.train_layers > 0).then_some(tap),
        fusion: fusion_cfg,
        encoder: Some(encoder_ref),
        image_encoder: image_ref,
        training: None,
    };
    write_config(&args.out, &config)?;

    // The checkpoint as served (fused kernels on packed batches) must give the trained
    // model's probabilities: checked on the dev set, recorded in the summary.
    let served = IntentModel::load(&args.out, &device)?;
    let served_dev = served_probs(&served, &mut fz, &dev_set)?;
    let parity = served_dev
        .iter()
        .zip(&dev_probs)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    eprintln!("served checkpoint vs trained model on dev: max probability difference {parity:.2e}");
    if parity > 1e-3 {
        bail!("the saved checkpoint does not reproduce the trained model (max probability difference {parity})");
    }
    summary["served_vs_trained_max_diff"] = serde_json::json!(parity);

    // The test split is scored through the serving path (the saved checkpoint as served).
    let mut outcome = TrainOutcome { dev: dev_scores.clone(), test: None, served_vs_trained_max_diff: parity };
    if let Some(test) = &test_set {
        let test_scores = score_served(&served, &mut fz, test, &label_ids, &labels, None)?;
        println!("test: {test_scores}");
        summary["test"] = serde_json::to_value(&test_scores)?;
        outcome.test = Some(test_scores);
    }
    config.training = Some(summary);
    write_config(&args.out, &config)?;
    eprintln!("checkpoint in {} ({:.1} min)", args.out.display(), t_start.elapsed().as_secs_f64() / 60.0);
    Ok(outcome)
}

fn write_config(dir: &Path, config: &IntentConfig) -> anyhow::Result<()> {
    std::fs::write(dir.join("intent_config.json"), serde_json::to_string_pretty(config)? + "\n")?;
    Ok(())
}

/// Fine-tuned layers copy the encoder's weights; fusion and head weights are seeded
/// (uniform ±1/sqrt(fan_in) for matrices, zero biases, unit LayerNorm gains).
/// `weights`: the encoder checkpoint's tensors (read from `path`), for the fine-tuned layers.
fn init_parameters(varmap: &VarMap, weights: &HashMap<String, Tensor>, path: &Path, rng: &mut Rng) -> anyhow::Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        if name.starts_with("encoder.") {
            var.set(&encoder_weight(weights, name, path)?)?;
            continue;
        }
        let dims = var.dims().to_vec();
        let last = name.rsplit('.').next().unwrap_or("");
        let t = match (last, dims.len()) {
            ("weight", 2) => {
                let bound = 1.0 / (dims[1] as f32).sqrt();
                let v: Vec<f32> = (0..dims[0] * dims[1]).map(|_| (rng.uniform() * 2.0 - 1.0) * bound).collect();
                Tensor::from_vec(v, (dims[0], dims[1]), &Device::Cpu)?
            }
            ("in_proj_weight", 2) => {
                // nn.MultiheadAttention: xavier_uniform over [3H, H].
                let bound = (6.0 / (dims[0] / 3 + dims[1]) as f32).sqrt();
                let v: Vec<f32> = (0..dims[0] * dims[1]).map(|_| (rng.uniform() * 2.0 - 1.0) * bound).collect();
                Tensor::from_vec(v, (dims[0], dims[1]), &Device::Cpu)?
            }
            ("weight", 1) => Tensor::ones(dims[0], DType::F32, &Device::Cpu)?,
            _ => Tensor::zeros(dims.as_slice(), DType::F32, &Device::Cpu)?,
        };
        var.set(&t)?;
    }
    Ok(())
}

fn snapshot(varmap: &VarMap) -> anyhow::Result<Vec<(String, Tensor)>> {
    let data = varmap.data().lock().expect("varmap lock");
    data.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?))).collect()
}

fn restore(varmap: &VarMap, best: &[(String, Tensor)]) -> anyhow::Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    for (n, t) in best {
        data[n].set(t)?;
    }
    Ok(())
}

/// Scores examples through the serving path: the encoder's (tapped) states, the checkpoint's
/// branch, fusion and head, exactly as the server runs them.
fn score_served(
    model: &IntentModel,
    fz: &mut Featurizer,
    examples: &[Example],
    label_ids: &HashMap<String, u32>,
    labels: &[String],
    threshold: Option<f32>,
) -> anyhow::Result<IntentScores> {
    let probs = served_probs(model, fz, examples)?;
    let gold = examples
        .iter()
        .map(|e| label_ids.get(&e.label).copied().with_context(|| format!("label {:?} is not one the model knows", e.label)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(score(&probs, &gold, labels, threshold.unwrap_or(model.config().handoff_threshold)))
}

fn served_probs(model: &IntentModel, fz: &mut Featurizer, examples: &[Example]) -> anyhow::Result<Vec<Vec<f32>>> {
    let tokens = fz.tokenize(examples)?;
    let mut probs = Vec::with_capacity(examples.len());
    for (chunk_i, chunk) in tokens.chunks(64).enumerate() {
        let batch: Vec<&TokenizedText> = chunk.iter().collect();
        let (last, tapped) = fz.encoder.token_states_tapped(&batch, model.tap())?;
        let states = tapped.unwrap_or(last.hidden);
        let mut images = Vec::with_capacity(chunk.len());
        for e in &examples[chunk_i * 64..chunk_i * 64 + chunk.len()] {
            images.push(match e.images.is_empty() {
                true => None,
                false => {
                    let parts = e.images.iter().map(|p| fz.image_positions(p)).collect::<anyhow::Result<Vec<_>>>()?;
                    Some(Tensor::cat(&parts, 0)?)
                }
            });
        }
        let logits = model.logits(&states, &last.lens, &images)?;
        probs.extend(candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()?);
    }
    Ok(probs)
}

/// Scores a checkpoint on labelled data through the serving path and prints the figures.
pub fn eval(args: &EvalIntent) -> anyhow::Result<IntentScores> {
    let device = Device::Cpu;
    let model = IntentModel::load(&args.model, &device).with_context(|| format!("loading {}", args.model.display()))?;
    let encoder = TextEncoder::load(&ModelSource::Dir(args.encoder_dir.clone()), &device, DType::F32, None)
        .with_context(|| format!("loading the text encoder from {}", args.encoder_dir.display()))?;
    if let Some(e) = &model.config().encoder {
        if e.version != encoder.info().version {
            bail!(
                "{} was trained on text model {} {}, but {} holds version {}",
                args.model.display(), e.id, e.version, args.encoder_dir.display(), encoder.info().version
            );
        }
    }
    let mut examples = read(args.format, &args.data, &args.split)?;
    if let Some(n) = args.limit {
        examples.truncate(n);
    }
    let images = match examples.iter().any(|e| !e.images.is_empty()) {
        true => Some(ImageEncoder::load(&ModelSource::Dir(args.image_model_dir.clone()), &device, DType::F32)?),
        false => None,
    };
    let labels = model.labels().to_vec();
    let label_ids: HashMap<String, u32> = labels.iter().enumerate().map(|(i, l)| (l.clone(), i as u32)).collect();
    let mut fz = Featurizer { encoder, images, tap: 0, cache: HashMap::new() };
    let t0 = Instant::now();
    if args.calibrate {
        let probs = served_probs(&model, &mut fz, &examples)?;
        let gold = examples
            .iter()
            .map(|e| label_ids.get(&e.label).copied().with_context(|| format!("label {:?} is not one the model knows", e.label)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let threshold = calibrate(&probs, &gold, &labels, args.targets);
        let path = args.model.join("intent_config.json");
        let mut config: IntentConfig = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{} is not a concierge intent config (only those store a threshold)", path.display()))?;
        config.handoff_threshold = threshold;
        let note = serde_json::json!({
            "data": args.data.display().to_string(), "split": args.split, "examples": examples.len(),
            "target_precision": args.targets.precision, "target_oos_recall": args.targets.oos_recall, "threshold": threshold,
        });
        match config.training.as_mut().and_then(|t| t.as_object_mut()) {
            Some(t) => {
                // Test figures scored at the old threshold no longer describe the checkpoint.
                if let Some(test) = t.remove("test") {
                    t.insert("test_before_calibration".into(), test);
                }
                t.insert("calibration".into(), note);
            }
            None => config.training = Some(serde_json::json!({ "calibration": note })),
        }
        write_config(&args.model, &config)?;
        let scores = score(&probs, &gold, &labels, threshold);
        println!("calibrated on {} ({}): threshold {threshold:.2} written to {}\n{scores}", args.data.display(), args.split, path.display());
        return Ok(scores);
    }
    let scores = score_served(&model, &mut fz, &examples, &label_ids, &labels, args.threshold)?;
    println!("{} ({}): scored in {:.1} s\n{scores}", args.data.display(), args.split, t0.elapsed().as_secs_f64());
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Label smoothing against the formula worked by hand in f64; 0 is the plain cross-entropy.
    #[test]
    fn smoothed_cross_entropy_follows_the_formula() {
        let rows = [[1.0f64, 2.0, 3.0], [0.5, -1.0, 0.0]];
        let labels = [2u32, 0];
        let logits = Tensor::new(&[[1.0f32, 2.0, 3.0], [0.5, -1.0, 0.0]], &Device::Cpu).unwrap();
        let ids = Tensor::new(&labels, &Device::Cpu).unwrap();
        for eps in [0.0, 0.1, 0.3] {
            let want: f64 = rows
                .iter()
                .zip(labels)
                .map(|(r, y)| {
                    let lse = r.iter().map(|v| v.exp()).sum::<f64>().ln();
                    let nll = lse - r[y as usize];
                    let spread = r.iter().map(|v| lse - v).sum::<f64>() / 3.0;
                    (1.0 - eps) * nll + eps * spread
                })
                .sum::<f64>()
                / 2.0;
            let got = smoothed_cross_entropy(&logits, &ids, eps).unwrap().to_scalar::<f32>().unwrap() as f64;
            assert!((got - want).abs() < 1e-6, "eps {eps}: {got} vs {want}");
        }
    }

    #[test]
    fn csv_quotes_and_commas() {
        let rows = parse_csv("text,category\n\"a, b\",x\n\"say \"\"hi\"\"\",y\nplain,z\n").unwrap();
        assert_eq!(rows[1], vec!["a, b", "x"]);
        assert_eq!(rows[2], vec!["say \"hi\"", "y"]);
        assert_eq!(rows[3], vec!["plain", "z"]);
    }

    #[test]
    fn warmup_then_linear_decay() {
        assert!(lr_factor(0, 100, 0.1) < 0.2);
        assert!((lr_factor(9, 100, 0.1) - 1.0).abs() < 1e-9);
        assert!(lr_factor(55, 100, 0.1) < 0.6 && lr_factor(55, 100, 0.1) > 0.4);
        assert!(lr_factor(99, 100, 0.1) < 0.02);
    }

    #[test]
    fn scores_and_calibration() {
        let labels: Vec<String> = ["a", "b", "oos"].iter().map(|s| s.to_string()).collect();
        let probs = vec![vec![0.9, 0.05, 0.05], vec![0.4, 0.35, 0.25], vec![0.1, 0.8, 0.1], vec![0.45, 0.1, 0.45]];
        let gold = vec![0, 2, 1, 2];
        let s = score(&probs, &gold, &labels, 0.5);
        assert_eq!((s.in_scope, s.out_of_scope), (2, 2));
        assert_eq!(s.in_scope_accuracy, 1.0);
        assert_eq!(s.oos_recall, 1.0);
        let t = calibrate(&probs, &gold, &labels, Targets { precision: 0.9, oos_recall: 0.8 });
        assert!(t > 0.45 && t <= 0.8, "{t}");
        let s0 = score(&probs, &gold, &labels, 0.0);
        assert_eq!(s0.oos_recall, 0.0);
    }

    #[test]
    fn stratified_holdout_keeps_every_label() {
        let ex: Vec<Example> = (0..100)
            .map(|i| Example { text: format!("t{i}"), label: format!("l{}", i % 5), images: vec![] })
            .collect();
        let (t, d) = stratified_split(ex, 0.1, 1);
        assert_eq!((t.len(), d.len()), (90, 10));
        for l in 0..5 {
            assert_eq!(d.iter().filter(|e| e.label == format!("l{l}")).count(), 2);
        }
    }
}
