//! `concierge average-tagger`: the element-wise mean of the weights of checkpoints taken along
//! one training run (the stages `scripts/train-msra.sh` chains with `--init`, or the epochs
//! `train-tagger --keep-epochs` writes), with the dev split choosing what is kept: each
//! checkpoint alone, or the mean of the last k of them (k = 2 … n). Averaging weights along a
//! trajectory (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima") lands nearer the
//! centre of the basin the run ends in; checkpoints from different seeds sit in different basins
//! and are ensembled instead (`ensemble-tagger`).
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::Args;

use super::{hold_out, read, read_record, score, write_record, Format};

#[derive(Debug, Clone, Args)]
pub struct AverageTagger {
    /// A checkpoint folder, oldest first (give two or more): checkpoints of one training run,
    /// with the same config, tag set and vocabularies (byte for byte) and the same tensors.
    #[arg(long = "checkpoint", required = true)]
    pub checkpoints: Vec<PathBuf>,
    /// Where the chosen checkpoint goes.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum)]
    pub format: Format,
    /// The training file the checkpoints were trained on: its dev split is held out again as
    /// train-tagger held it out (the same --dev-fraction and --seed, checked against the last
    /// checkpoint's training.json), and the candidate with the best dev F1 is kept.
    #[arg(long, conflicts_with = "dev")]
    pub train: Option<PathBuf>,
    /// Development sentences that choose (instead of --train's held-out split).
    #[arg(long)]
    pub dev: Option<PathBuf>,
    #[arg(long, default_value_t = 0.1)]
    pub dev_fraction: f64,
    #[arg(long, default_value_t = 13)]
    pub seed: u64,
    /// Score the kept checkpoint on this file (e.g. the official test split) and record it;
    /// it plays no part in the choice.
    #[arg(long)]
    pub test: Option<PathBuf>,
    /// Text encoder folder (encoder-input taggers).
    #[arg(long, default_value = "model-store/all-MiniLM-L6-v2")]
    pub encoder_dir: PathBuf,
}

/// The files of a checkpoint folder that must agree between the checkpoints (all but the
/// weights and the training record), by name.
fn side_files(dir: &Path) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading the checkpoint folder {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && name != "model.safetensors" && name != "training.json" {
            files.insert(name, std::fs::read(entry.path())?);
        }
    }
    if !files.contains_key("config.json") {
        bail!("{} is not a tagger checkpoint (no config.json)", dir.display());
    }
    Ok(files)
}

/// The element-wise mean of `maps` (same names, shapes and dtypes), summed in f64 and stored
/// in each tensor's own dtype. Integer tensors must be equal and are kept.
fn mean(maps: &[&HashMap<String, Tensor>]) -> anyhow::Result<HashMap<String, Tensor>> {
    let n = maps.len() as f64;
    let mut out = HashMap::new();
    for (name, first) in maps[0] {
        let dtype = first.dtype();
        let t = if dtype.is_float() {
            let mut sum = first.to_dtype(DType::F64)?;
            for m in &maps[1..] {
                sum = (sum + m[name].to_dtype(DType::F64)?)?;
            }
            (sum / n)?.to_dtype(dtype)?
        } else {
            for m in &maps[1..] {
                let differs = m[name].ne(first)?.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? > 0;
                if differs {
                    bail!("the integer tensor {name} differs between the checkpoints");
                }
            }
            first.clone()
        };
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// One candidate: which checkpoints (indices into --checkpoint) it averages.
struct Candidate {
    name: String,
    members: Vec<usize>,
    dir: PathBuf,
    dev_f1: Option<f64>,
}

pub fn average(args: &AverageTagger) -> anyhow::Result<()> {
    let n = args.checkpoints.len();
    if n < 2 {
        bail!("averaging needs two or more --checkpoint folders; got {n}");
    }
    if let Ok(out) = args.out.canonicalize() {
        if let Some(d) = args.checkpoints.iter().find(|d| d.canonicalize().is_ok_and(|d| d == out)) {
            bail!("--out {} is one of the --checkpoint folders ({}); write the result elsewhere", args.out.display(), d.display());
        }
    }
    // Everything but the weights must agree byte for byte: then any mean of them is a
    // checkpoint of the same model.
    let first_files = side_files(&args.checkpoints[0])?;
    for dir in &args.checkpoints[1..] {
        let files = side_files(dir)?;
        if files.keys().ne(first_files.keys()) {
            bail!("{} and {} hold different files; average checkpoints of one training run", dir.display(), args.checkpoints[0].display());
        }
        if let Some(name) = files.iter().find(|(k, v)| first_files[*k] != **v).map(|(k, _)| k) {
            bail!("{name} differs between {} and {}; average checkpoints of one training run (same config, tags and vocabularies)", args.checkpoints[0].display(), dir.display());
        }
    }
    let maps = args
        .checkpoints
        .iter()
        .map(|d| {
            let path = d.join("model.safetensors");
            candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| format!("reading {}", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for (m, dir) in maps.iter().zip(&args.checkpoints).skip(1) {
        if m.len() != maps[0].len() {
            bail!("{} has {} tensors, {} has {}", dir.display(), m.len(), args.checkpoints[0].display(), maps[0].len());
        }
        for (name, t) in &maps[0] {
            let other = m.get(name).with_context(|| format!("{} has no tensor {name}", dir.display()))?;
            if other.dims() != t.dims() || other.dtype() != t.dtype() {
                bail!(
                    "tensor {name} is {:?} {:?} in {} but {:?} {:?} in {}",
                    t.dtype(),
                    t.dims(),
                    args.checkpoints[0].display(),
                    other.dtype(),
                    other.dims(),
                    dir.display()
                );
            }
        }
    }

    // The run that made the last checkpoint, with its --init history.
    let last_run = read_record(&args.checkpoints[n - 1]);
    // The dev sentences that choose, if any.
    let dev = match (&args.dev, &args.train) {
        (Some(path), _) => Some((read(args.format, path).with_context(|| format!("reading {}", path.display()))?, path.display().to_string())),
        (None, Some(train)) => {
            if !(args.dev_fraction > 0.0 && args.dev_fraction < 1.0) {
                bail!("--dev-fraction must be above 0 and below 1 to hold out a dev split; got {}", args.dev_fraction);
            }
            let sentences = read(args.format, train).with_context(|| format!("reading {}", train.display()))?;
            let (_, dev) = hold_out(sentences, args.dev_fraction, args.seed);
            // The last checkpoint's record says which split it was chosen on: the same one, or refuse.
            if last_run.is_none() {
                eprintln!("warning: {} has no training.json to check the dev split against", args.checkpoints[n - 1].display());
            }
            if let Some(r) = &last_run {
                let (seed, held) = (r["seed"].as_u64(), r["dev_sentences"].as_u64());
                let fraction = r["dev_fraction"].as_f64();
                if seed.is_some_and(|s| s != args.seed) || held.is_some_and(|h| h as usize != dev.len()) || fraction.is_some_and(|f| f != args.dev_fraction) {
                    bail!(
                        "this dev split ({} sentences, seed {}) is not the one {} was trained with ({} sentences, seed {}): give the --dev-fraction and --seed of its train-tagger run",
                        dev.len(),
                        args.seed,
                        args.checkpoints[n - 1].display(),
                        held.map_or("?".into(), |h| h.to_string()),
                        seed.map_or("?".into(), |s| s.to_string())
                    );
                }
            }
            Some((dev, format!("{} (held out: fraction {}, seed {})", train.display(), args.dev_fraction, args.seed)))
        }
        (None, None) => None,
    };

    // The candidates: without dev sentences only the mean of all; with them, each checkpoint
    // alone and the mean of the last k for every k ≥ 2, written beside --out while scored.
    let work = {
        let mut name = args.out.file_name().map(|s| s.to_os_string()).unwrap_or_else(|| "average".into());
        name.push(".candidates");
        args.out.with_file_name(name)
    };
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    let mut candidates = Vec::new();
    if dev.is_some() {
        for (i, dir) in args.checkpoints.iter().enumerate() {
            candidates.push(Candidate { name: format!("checkpoint {} ({})", i + 1, dir.display()), members: vec![i], dir: dir.clone(), dev_f1: None });
        }
    }
    let smallest = if dev.is_some() { 2 } else { n };
    for k in smallest..=n {
        candidates.push(Candidate { name: format!("mean of the last {k}"), members: (n - k..n).collect(), dir: work.join(format!("last-{k}")), dev_f1: None });
    }
    let write_mean = |c: &Candidate| -> anyhow::Result<()> {
        std::fs::create_dir_all(&c.dir).with_context(|| format!("creating {}", c.dir.display()))?;
        for (name, bytes) in &first_files {
            std::fs::write(c.dir.join(name), bytes)?;
        }
        let picked: Vec<&HashMap<String, Tensor>> = c.members.iter().map(|&i| &maps[i]).collect();
        candle_core::safetensors::save(&mean(&picked)?, c.dir.join("model.safetensors"))?;
        Ok(())
    };
    let mut best: Option<usize> = None;
    for i in 0..candidates.len() {
        if candidates[i].members.len() > 1 {
            write_mean(&candidates[i])?;
        }
        if let Some((sentences, _)) = &dev {
            let (e, _) = score(&candidates[i].dir, sentences, &args.encoder_dir, "dev", true)?;
            eprintln!("{}: dev F1 {:.2}", candidates[i].name, e.f1() * 100.0);
            candidates[i].dev_f1 = Some(e.f1());
            // Ties go to the earlier candidate: a single checkpoint before a mean, fewer before more.
            if best.is_none_or(|b| e.f1() > candidates[b].dev_f1.unwrap_or(f64::NEG_INFINITY)) {
                best = Some(i);
            }
        } else {
            best = Some(i);
        }
    }
    let kept = &candidates[best.expect("at least one candidate")];
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    for (name, bytes) in &first_files {
        std::fs::write(args.out.join(name), bytes)?;
    }
    std::fs::copy(kept.dir.join("model.safetensors"), args.out.join("model.safetensors"))?;
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    match kept.dev_f1 {
        Some(f) => eprintln!("kept {}: dev F1 {:.2}, in {}", kept.name, f * 100.0, args.out.display()),
        None => eprintln!("kept {} (no dev sentences to choose by), in {}", kept.name, args.out.display()),
    }

    let mut summary = serde_json::json!({
        "average_of": args.checkpoints.iter().map(|d| d.display().to_string()).collect::<Vec<_>>(),
        "chosen_on": dev.as_ref().map(|(s, what)| serde_json::json!({"dev": what, "sentences": s.len()})),
        "candidates": candidates.iter().map(|c| serde_json::json!({
            "name": c.name,
            "checkpoints": c.members.iter().map(|&i| args.checkpoints[i].display().to_string()).collect::<Vec<_>>(),
            "dev_f1": c.dev_f1,
        })).collect::<Vec<_>>(),
        "kept": kept.name,
        "kept_checkpoints": kept.members.iter().map(|&i| args.checkpoints[i].display().to_string()).collect::<Vec<_>>(),
        "last_run": last_run,
    });
    if let Some(test) = &args.test {
        let sentences = read(args.format, test).with_context(|| format!("reading {}", test.display()))?;
        let (e, _) = score(&args.out, &sentences, &args.encoder_dir, "test", true)?;
        println!("test ({}), {}: {} sentences\n{e}", test.display(), kept.name, sentences.len());
        summary["test"] = serde_json::json!({"path": test.display().to_string(), "f1": e.f1(), "precision": e.precision(), "recall": e.recall()});
    }
    write_record(&args.out, &summary)?;
    Ok(())
}
