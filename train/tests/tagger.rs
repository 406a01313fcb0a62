//! Tiny real training runs: a few hundred ATIS sentences over the default encoder's states, and
//! MSRA sentences over characters. They check that the loss falls, that the dev F1 is well
//! above nothing, that the checkpoint loads and scores the same through eval-tagger, and that
//! a seed gives the same run twice. They skip, saying so, where the set-up data is missing.
use std::path::{Path, PathBuf};

use clap::Parser;
use concierge_train::tagger::{average, ensemble, eval, train, AverageTagger, EnsembleTagger, EvalTagger, Format, TrainTagger, Vote};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The ATIS training file and the default encoder, or `None` after saying SKIPPED where the
/// set-up (`scripts/fetch-default-model.sh`) has not fetched them.
fn atis_data() -> Option<(PathBuf, PathBuf)> {
    let data = repo("model-store/data/atis/train_dev");
    let encoder = repo("model-store/all-MiniLM-L6-v2");
    if !data.is_file() || !encoder.is_dir() {
        eprintln!("SKIPPED: {} or {} missing; run scripts/fetch-default-model.sh", data.display(), encoder.display());
        return None;
    }
    Some((data, encoder))
}

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    args: TrainTagger,
}

fn args(extra: &[String]) -> TrainTagger {
    let mut argv = vec!["train-tagger".to_string(), "--quiet".into()];
    argv.extend(extra.iter().cloned());
    Wrap::parse_from(argv).args
}

fn losses(out: &Path) -> (Vec<f64>, Vec<f64>) {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("training.json")).unwrap()).unwrap();
    let epochs = v["epochs"].as_array().unwrap();
    (epochs.iter().map(|e| e["loss"].as_f64().unwrap()).collect(), epochs.iter().map(|e| e["dev_f1"].as_f64().unwrap()).collect())
}

#[test]
fn atis_over_encoder_states_learns_and_repeats_with_a_seed() {
    let Some((data, encoder)) = atis_data() else { return };
    let tmp = std::env::temp_dir().join(format!("concierge-train-atis-{}", std::process::id()));
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.join(name);
        let mut a: Vec<String> = vec![
            "--format=atis".into(), format!("--train={}", data.display()), format!("--encoder-dir={}", encoder.display()),
            format!("--out={}", out.display()), "--limit=300".into(), "--epochs=3".into(), "--hidden=48".into(),
            "--batch=16".into(), "--lr=5e-3".into(), "--seed=5".into(),
        ];
        a.extend(extra.iter().map(|x| x.to_string()));
        train(&args(&a)).unwrap();
        out
    };
    let a = run("a", &[]);
    let constrained = |dir: &Path| concierge_models::TaggerConfig::from_file(&dir.join("config.json")).unwrap().constrained;
    assert!(constrained(&a), "train-tagger writes constrained decoding by default");
    let (loss, f1) = losses(&a);
    assert!(loss[loss.len() - 1] < loss[0] * 0.6, "the loss did not fall: {loss:?}");
    assert!(f1.iter().cloned().fold(0.0, f64::max) > 0.5, "dev F1 stayed low: {f1:?}");
    // The saved best checkpoint scores as the run said, through eval-tagger, on the same dev
    // sentences is not possible (they are held out inside); score it on the real test file.
    let test = repo("model-store/data/atis/test");
    let predictions = tmp.join("predictions.txt");
    let e = eval(&EvalTagger {
        model: a.clone(),
        format: concierge_train::tagger::Format::Atis,
        test: test.clone(),
        encoder_dir: encoder.clone(),
        predictions: Some(predictions.clone()),
    })
    .unwrap();
    assert!(e.f1() > 0.5, "test F1 {}", e.f1());
    // `token gold predicted` per token, a blank line after each sentence; the gold column is the file's.
    let written = std::fs::read_to_string(&predictions).unwrap();
    let sentences = concierge_models::sequence::data::read_atis(&test).unwrap();
    assert_eq!(written.matches("\n\n").count(), sentences.len());
    let first: Vec<&str> = written.lines().take(sentences[0].tokens.len()).collect();
    for ((line, token), gold) in first.iter().zip(&sentences[0].tokens).zip(&sentences[0].tags) {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!((f.len(), f[0], f[1]), (3, token.as_str(), gold.as_str()), "{line}");
    }
    // Same seed, same run.
    let b = run("b", &[]);
    assert_eq!(losses(&a), losses(&b), "two runs with one seed differ");
    // --unconstrained decodes every path; training is the same run.
    let c = run("c", &["--unconstrained"]);
    assert!(!constrained(&c));
    assert_eq!(losses(&a).0, losses(&c).0, "constrained decoding changed training");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `--train-layers`: the encoder's top layer is fine-tuned with the tagger; the checkpoint
/// carries it (f16) and, loaded as the server loads it, scores the dev set as the trained model
/// did (f16 rounding may move a tag: within 1 point of F1).
#[test]
fn atis_with_a_fine_tuned_encoder_layer_learns_and_serves_as_trained() {
    let Some((data, encoder)) = atis_data() else { return };
    let out = std::env::temp_dir().join(format!("concierge-train-atis-ft-{}", std::process::id()));
    train(&args(&[
        "--format=atis".into(), format!("--train={}", data.display()), format!("--encoder-dir={}", encoder.display()),
        format!("--out={}", out.display()), "--limit=250".into(), "--epochs=3".into(), "--hidden=48".into(),
        "--batch=16".into(), "--lr=5e-3".into(), "--seed=5".into(), "--encoder-layers=5,6".into(),
        "--train-layers=1".into(), "--encoder-lr=1e-4".into(),
    ]))
    .unwrap();
    let (loss, f1) = losses(&out);
    assert!(loss[loss.len() - 1] < loss[0] * 0.6, "the loss did not fall: {loss:?}");
    let best = f1.iter().cloned().fold(0.0, f64::max);
    assert!(best > 0.5, "dev F1 stayed low: {f1:?}");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("training.json")).unwrap()).unwrap();
    let served = summary["served_dev_f1"].as_f64().unwrap();
    assert!((served - best).abs() <= 0.01, "the saved checkpoint scores dev F1 {served}, the trained model {best}");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["branch_from"], 5);
    assert!(out.join("encoder_config.json").is_file());
    let test = repo("model-store/data/atis/test");
    let e = eval(&EvalTagger { model: out.clone(), format: concierge_train::tagger::Format::Atis, test, encoder_dir: encoder.clone(), predictions: None })
        .unwrap();
    assert!(e.f1() > 0.5, "test F1 {}", e.f1());
    // A fine-tuned layer needs encoder input and a layer above the branch point to feed.
    let err = train(&args(&[
        "--format=atis".into(), format!("--train={}", data.display()), format!("--out={}", out.display()),
        format!("--encoder-dir={}", encoder.display()), "--encoder-layers=3,4".into(), "--train-layers=1".into(), "--limit=10".into(),
    ]))
    .unwrap_err()
    .to_string();
    assert!(err.contains("reads no layer above 5"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}

/// `--joint-intent` with `--train-layers`: the intent term trains through the fine-tuned layer
/// too, and the checkpoint (its layer, its intents) serves as it was trained.
#[test]
fn atis_with_joint_intents_and_a_fine_tuned_layer_serves_as_trained() {
    let Some((data, encoder)) = atis_data() else { return };
    let out = std::env::temp_dir().join(format!("concierge-train-atis-joint-ft-{}", std::process::id()));
    let test = repo("model-store/data/atis/test");
    train(&args(&[
        "--format=atis".into(), format!("--train={}", data.display()), format!("--encoder-dir={}", encoder.display()),
        format!("--out={}", out.display()), format!("--test={}", test.display()), "--limit=200".into(), "--epochs=3".into(),
        "--hidden=32".into(), "--batch=16".into(), "--lr=5e-3".into(), "--seed=5".into(), "--encoder-layers=5,6".into(),
        "--train-layers=1".into(), "--encoder-lr=1e-4".into(), "--joint-intent".into(), "--linear-decay".into(),
    ]))
    .unwrap();
    let (loss, f1) = losses(&out);
    assert!(loss[loss.len() - 1] < loss[0] * 0.6, "the loss did not fall: {loss:?}");
    let best = f1.iter().cloned().fold(0.0, f64::max);
    assert!(best > 0.4, "dev F1 stayed low: {f1:?}");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let intents: Vec<String> = serde_json::from_str(&std::fs::read_to_string(out.join("intents.json")).unwrap()).unwrap();
    assert_eq!((config["branch_from"].as_u64(), config["num_intents"].as_u64()), (Some(5), Some(intents.len() as u64)));
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("training.json")).unwrap()).unwrap();
    let served = summary["served_dev_f1"].as_f64().unwrap();
    assert!((served - best).abs() <= 0.01, "the saved checkpoint scores dev F1 {served}, the trained model {best}");
    assert_eq!(summary["lr_schedule"], "linear");
    // Answering atis_flight always scores 74.4%; the intent layer must have learned more than that.
    let acc = summary["test"]["intent_accuracy"].as_f64().unwrap();
    assert!(acc > 0.76, "the tagger's test intent accuracy {acc}");
    let e = eval(&EvalTagger { model: out.clone(), format: concierge_train::tagger::Format::Atis, test, encoder_dir: encoder.clone(), predictions: None })
        .unwrap();
    assert_eq!(e.f1(), summary["test"]["f1"].as_f64().unwrap(), "eval-tagger and the training run score the checkpoint alike");
    std::fs::remove_dir_all(&out).unwrap();
}

/// `--joint-intent`: the tagger learns ATIS's utterance intents with the slots; the checkpoint
/// names them (`intents.json`, `num_intents`), scores the test file through eval-tagger as the
/// run did, and reports the tagger's own intent accuracy. Data without intents is refused.
#[test]
fn atis_with_joint_intents_learns_both() {
    let msra = repo("model-store/data/msra/msra_train.txt");
    let Some((data, encoder)) = atis_data() else { return };
    let out = std::env::temp_dir().join(format!("concierge-train-atis-joint-{}", std::process::id()));
    let test = repo("model-store/data/atis/test");
    train(&args(&[
        "--format=atis".into(), format!("--train={}", data.display()), format!("--encoder-dir={}", encoder.display()),
        format!("--out={}", out.display()), format!("--test={}", test.display()), "--limit=300".into(), "--epochs=6".into(),
        "--hidden=48".into(), "--batch=16".into(), "--lr=5e-3".into(), "--seed=5".into(), "--joint-intent".into(),
    ]))
    .unwrap();
    let (loss, f1) = losses(&out);
    assert!(loss[loss.len() - 1] < loss[0] * 0.6, "the loss did not fall: {loss:?}");
    assert!(f1.iter().cloned().fold(0.0, f64::max) > 0.5, "dev F1 stayed low: {f1:?}");
    let intents: Vec<String> = serde_json::from_str(&std::fs::read_to_string(out.join("intents.json")).unwrap()).unwrap();
    assert!(intents.contains(&"atis_flight".to_string()) && intents.len() > 3, "{intents:?}");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_intents"].as_u64(), Some(intents.len() as u64));
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("training.json")).unwrap()).unwrap();
    // Answering atis_flight always scores 74.4% (632 of the 849 test utterances whose intent the
    // training set has); 300 sentences and 6 epochs reach about 85%.
    let acc = summary["test"]["intent_accuracy"].as_f64().unwrap();
    assert!(acc > 0.8, "the tagger's test intent accuracy {acc}");
    let e = eval(&EvalTagger { model: out.clone(), format: concierge_train::tagger::Format::Atis, test, encoder_dir: encoder.clone(), predictions: None })
        .unwrap();
    assert_eq!(e.f1(), summary["test"]["f1"].as_f64().unwrap(), "eval-tagger and the training run score the checkpoint alike");
    if msra.is_file() {
        let err = train(&args(&[
            "--format=msra".into(), format!("--train={}", msra.display()), format!("--out={}", out.display()),
            "--limit=20".into(), "--joint-intent".into(),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("needs an intent for every training sentence"), "{err}");
    }
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn msra_over_characters_learns() {
    let data = repo("model-store/data/msra/msra_train.txt");
    if !data.is_file() {
        eprintln!("SKIPPED: {} missing; run scripts/fetch-default-model.sh", data.display());
        return;
    }
    let out = std::env::temp_dir().join(format!("concierge-train-msra-{}", std::process::id()));
    train(&args(&[
        "--format=msra".into(), format!("--train={}", data.display()), format!("--out={}", out.display()),
        "--limit=400".into(), "--epochs=2".into(), "--hidden=32".into(), "--char-dim=32".into(), "--batch=32".into(),
        "--lr=1e-2".into(), "--dev-fraction=0.004".into(),
    ]))
    .unwrap();
    let (loss, _) = losses(&out);
    assert!(loss[1] < loss[0], "the loss did not fall: {loss:?}");
    let m = concierge_models::BiLstmCrf::load(&out, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    assert!(m.vocab().is_some() && m.tags().iter().any(|t| t == "S-PER" || t == "B-PER"));
    // --init trains a checkpoint further: it starts where that run ended, not from scratch.
    let more = out.with_extension("more");
    let again = |init: &std::path::Path, limit: usize| {
        train(&args(&[
            "--format=msra".into(), format!("--train={}", data.display()), format!("--out={}", more.display()),
            format!("--limit={limit}"), "--epochs=1".into(), "--hidden=32".into(), "--char-dim=32".into(), "--batch=32".into(),
            "--lr=1e-2".into(), "--dev-fraction=0.004".into(), format!("--init={}", init.display()),
        ]))
    };
    again(&out, 400).unwrap();
    let (continued, _) = losses(&more);
    assert!(continued[0] < loss[0] * 0.9, "a continued run's first epoch ({continued:?}) is no better than a fresh one's ({loss:?})");
    // Its training.json carries the run it started from, as that run wrote it.
    let record = |d: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(d.join("training.json")).unwrap()).unwrap() };
    assert_eq!(record(&more)["previous_runs"], serde_json::json!([record(&out)]));
    // Another training set (a smaller one, with fewer characters): the checkpoint's vocabulary
    // is kept, so the run continues it.
    again(&out, 200).unwrap();
    let continued = concierge_models::BiLstmCrf::load(&more, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    assert_eq!(continued.vocab(), m.vocab(), "--init keeps its checkpoint's vocabulary");
    // --extra-train adds its sentences to the training set only: the dev split held out from
    // --train is the same as without it.
    let base = record(&more);
    let extra = out.with_extension("extra.txt");
    std::fs::write(&extra, first_sentences(&data, 30)).unwrap();
    train(&args(&[
        "--format=msra".into(), format!("--train={}", data.display()), format!("--out={}", more.display()),
        "--limit=200".into(), "--epochs=1".into(), "--hidden=32".into(), "--char-dim=32".into(), "--batch=32".into(),
        "--lr=1e-2".into(), "--dev-fraction=0.004".into(), format!("--init={}", out.display()),
        format!("--extra-train={}", extra.display()),
    ]))
    .unwrap();
    let with_extra = record(&more);
    assert_eq!(with_extra["dev_sentences"], base["dev_sentences"], "the dev split does not change");
    assert_eq!(with_extra["train_sentences"].as_u64().unwrap(), base["train_sentences"].as_u64().unwrap() + 30);
    assert_eq!(with_extra["extra_train"], serde_json::json!([extra.display().to_string()]));
    // ... and the vocabularies are --train's alone: a fresh run with the extra sentences has the
    // same characters as one without them.
    let fresh = |with: bool| {
        let mut a = vec![
            "--format=msra".into(), format!("--train={}", data.display()), format!("--out={}", more.display()),
            "--limit=100".into(), "--epochs=1".into(), "--hidden=8".into(), "--char-dim=8".into(), "--batch=32".into(),
            "--dev-fraction=0.004".into(),
        ];
        if with {
            a.push(format!("--extra-train={}", extra.display()));
        }
        train(&args(&a)).unwrap();
        concierge_models::BiLstmCrf::load(&more, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap().vocab().cloned()
    };
    assert_eq!(fresh(true), fresh(false), "--extra-train's sentences are not counted into the vocabulary");
    std::fs::remove_file(&extra).unwrap();
    // Another tag set is refused, saying so.
    let atis = repo("model-store/data/atis/train_dev");
    if atis.is_file() {
        let err = train(&args(&[
            "--format=atis".into(), format!("--train={}", atis.display()), format!("--out={}", more.display()),
            "--input=chars".into(), "--limit=200".into(), "--epochs=1".into(), "--hidden=32".into(), "--char-dim=32".into(),
            format!("--init={}", out.display()),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("tag set differs"), "{err}");
    }
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::remove_dir_all(&more).unwrap();
}

/// MSRA's training file, and its first 100 test sentences (blank-line separated) written beside
/// `out` as `<out>.test.txt`; None, saying so, when the data is not fetched.
fn msra_small(out: &Path) -> Option<(PathBuf, PathBuf)> {
    let data = repo("model-store/data/msra/msra_train.txt");
    let test = repo("model-store/data/msra/msra_test.txt");
    if !data.is_file() || !test.is_file() {
        eprintln!("SKIPPED: {} or {} missing; run scripts/fetch-default-model.sh", data.display(), test.display());
        return None;
    }
    let small_test = out.with_extension("test.txt");
    std::fs::write(&small_test, first_sentences(&test, 100)).unwrap();
    Some((data, small_test))
}

/// The first `n` sentences of an MSRA file (blank-line separated; the files have CRLF line
/// ends), with LF line ends.
fn first_sentences(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = String::new();
    let mut seen = 0;
    for line in text.lines() {
        if line.trim().is_empty() {
            seen += 1;
            if seen == n {
                break;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// eval-tagger (the serving code's ids) scores the checkpoint in `out` on `test` as its
/// training run did (`training.json`).
fn eval_agrees_with_training(out: &Path, test: &Path) {
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("training.json")).unwrap()).unwrap();
    let e = eval(&EvalTagger {
        model: out.to_path_buf(),
        format: concierge_train::tagger::Format::Msra,
        test: test.to_path_buf(),
        encoder_dir: repo("model-store/all-MiniLM-L6-v2"),
        predictions: None,
    })
    .unwrap();
    assert_eq!(e.f1(), summary["test"]["f1"].as_f64().unwrap(), "eval-tagger and the training run score the checkpoint alike");
}

/// `--bigram-dim` (and `--embeddings-f16`): the character tagger also embeds the bigrams around each character; the
/// checkpoint carries `bigrams.json` (with `<s>` / `</s>` bigrams from sentence ends), the loss
/// falls, and eval-tagger scores the checkpoint as the run did.
#[test]
fn msra_with_character_bigrams_learns() {
    let out = std::env::temp_dir().join(format!("concierge-train-msra-bigram-{}", std::process::id()));
    let Some((data, small_test)) = msra_small(&out) else { return };
    train(&args(&[
        "--format=msra".into(), format!("--train={}", data.display()), format!("--out={}", out.display()),
        format!("--test={}", small_test.display()), "--limit=400".into(), "--epochs=2".into(), "--hidden=32".into(),
        "--char-dim=32".into(), "--bigram-dim=16".into(), "--bigram-min-count=2".into(), "--batch=32".into(),
        "--lr=1e-2".into(), "--dev-fraction=0.004".into(), "--embeddings-f16".into(),
    ]))
    .unwrap();
    let (loss, _) = losses(&out);
    assert!(loss[1] < loss[0], "the loss did not fall: {loss:?}");
    let m = concierge_models::BiLstmCrf::load(&out, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let bigrams = m.bigrams().expect("bigrams.json");
    assert!(bigrams.len() > 100, "{} bigrams", bigrams.len());
    assert_eq!(m.config().bigram_dim, Some(16));
    // --embeddings-f16: the tables are stored in f16, the rest in f32.
    let saved = candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(saved["embedding.weight"].dtype(), candle_core::DType::F16);
    assert_eq!(saved["bigram_embedding.weight"].dtype(), candle_core::DType::F16);
    assert_eq!(saved["lstm.weight_ih_l0"].dtype(), candle_core::DType::F32);
    // Most of MSRA's sentences end in "。", and "我" starts 32 of the first 420.
    assert_ne!(bigrams.id("。</s>"), bigrams.unk_id(), "a sentence-end bigram is in the vocabulary");
    assert_ne!(bigrams.id("<s>我"), bigrams.unk_id(), "a sentence-start bigram is in the vocabulary");
    eval_agrees_with_training(&out, &small_test);
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::remove_file(&small_test).unwrap();
}

/// MSRA with pretrained character vectors (a word2vec text file) and lexicon features (a word
/// list in jieba's format): characters the vectors cover join the vocabulary even when training
/// never saw them, and keep their vectors; the checkpoint carries `lexicon.txt`; eval-tagger
/// (the serving code's ids) scores it as the run did.
#[test]
fn msra_with_pretrained_vectors_and_a_lexicon_learns() {
    let out = std::env::temp_dir().join(format!("concierge-train-msra-lexicon-{}", std::process::id()));
    let Some((data, small_test)) = msra_small(&out) else { return };
    let vectors = out.with_extension("vec");
    let lexicon = out.with_extension("dict.txt");
    // 8-wide vectors for a common character and for one MSRA never uses.
    let v_zhong: Vec<f32> = (0..8).map(|i| i as f32 * 0.25 - 1.0).collect();
    let v_rare: Vec<f32> = (0..8).map(|i| 0.5 - i as f32 * 0.125).collect();
    let line = |c: &str, v: &[f32]| format!("{c} {}\n", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(" "));
    std::fs::write(&vectors, format!("2 8\n{}{}", line("中", &v_zhong), line("龘", &v_rare))).unwrap();
    std::fs::write(&lexicon, "中国 100 ns\n新华社 50 nt\n邓小平 40 nr\n我们 500 r\n的 9000 uj\n").unwrap();
    train(&args(&[
        "--format=msra".into(), format!("--train={}", data.display()), format!("--out={}", out.display()),
        format!("--test={}", small_test.display()), "--limit=400".into(), "--epochs=2".into(), "--hidden=32".into(),
        "--char-dim=8".into(), format!("--char-vectors={}", vectors.display()), format!("--lexicon={}", lexicon.display()),
        "--lexicon-dim=4".into(), "--batch=32".into(), "--lr=1e-2".into(), "--dev-fraction=0.004".into(),
    ]))
    .unwrap();
    let (loss, _) = losses(&out);
    assert!(loss[1] < loss[0], "the loss did not fall: {loss:?}");
    let m = concierge_models::BiLstmCrf::load(&out, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let vocab = m.vocab().unwrap();
    let rare = vocab.id("龘");
    assert_ne!(rare, vocab.unk_id(), "a character the vectors cover joins the vocabulary");
    let saved = candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let row: Vec<f32> = saved["embedding.weight"].get(rare as usize).unwrap().to_vec1().unwrap();
    for (got, want) in row.iter().zip(&v_rare) {
        assert!((got - want).abs() < 1e-4, "an unseen character keeps its vector (weight decay aside): {row:?} vs {v_rare:?}");
    }
    let lex = m.lexicon().expect("lexicon.txt");
    assert_eq!(lex.classes(), ["word", "person", "place", "org"]);
    assert_eq!(lex.len(), 4, "one-character words are left out");
    assert_eq!(std::fs::read_to_string(out.join("lexicon.txt")).unwrap(), "中国\tword,place\n我们\tword\n新华社\tword,org\n邓小平\tword,person\n");
    assert_eq!(m.config().lstm_input_dim(), 8 + 4 * 4);
    eval_agrees_with_training(&out, &small_test);
    // Vectors of the wrong width are refused, naming the flag to change.
    let err = train(&args(&[
        "--format=msra".into(), format!("--train={}", data.display()), format!("--out={}", out.display()),
        "--limit=50".into(), "--epochs=1".into(), format!("--char-vectors={}", vectors.display()),
    ]))
    .unwrap_err();
    assert!(format!("{err:#}").contains("--char-dim 8"), "{err:#}");
    std::fs::remove_dir_all(&out).unwrap();
    for f in [&small_test, &vectors, &lexicon] {
        std::fs::remove_file(f).unwrap();
    }
}

/// MSRA with a word-vector lexicon (`--word-vectors`, a word2vec text file) added to a
/// checkpoint without one (`--init`): the run starts from it (its first LSTM layer widened), the
/// checkpoint carries `soft_lexicon.txt` (words of 2+ characters, weighted by 1 + their count in
/// the training text) and the vectors unchanged, and eval-tagger (the serving code's ids) scores
/// it as the run did. Continuing it without the vectors is refused.
#[test]
fn msra_with_a_soft_lexicon_continues_a_checkpoint() {
    let out = std::env::temp_dir().join(format!("concierge-train-msra-soft-{}", std::process::id()));
    let Some((data, small_test)) = msra_small(&out) else { return };
    let base = out.with_extension("base");
    let common = |out: &Path| -> Vec<String> {
        vec![
            "--format=msra".into(), format!("--train={}", data.display()), format!("--out={}", out.display()),
            format!("--test={}", small_test.display()), "--limit=400".into(), "--hidden=16".into(), "--char-dim=16".into(),
            "--batch=32".into(), "--lr=1e-2".into(), "--dev-fraction=0.004".into(),
        ]
    };
    train(&args(&[common(&base), vec!["--epochs=2".into()]].concat())).unwrap();
    let vectors = out.with_extension("vec");
    let vec_of = |k: usize| -> Vec<f32> { (0..6).map(|i| (k * 6 + i) as f32 * 0.125 - 2.0).collect() };
    let words = ["中国", "新华社", "邓小平", "我们", "的", "龘龘"];
    let text: String = words
        .iter()
        .enumerate()
        .map(|(k, w)| format!("{w} {}\n", vec_of(k).iter().map(|x| x.to_string()).collect::<Vec<_>>().join(" ")))
        .collect();
    std::fs::write(&vectors, format!("{} 6\n{text}", words.len())).unwrap();
    let soft = |init: &Path| {
        train(&args(&[
            common(&out),
            vec!["--epochs=1".into(), format!("--init={}", init.display()), format!("--word-vectors={}", vectors.display()),
                "--soft-lexicon-per-set=2".into(), "--embeddings-f16".into()],
        ]
        .concat()))
    };
    soft(&base).unwrap();
    let (before, _) = losses(&base);
    let (after, _) = losses(&out);
    assert!(after[0] < before[0] * 0.9, "the widened run starts from its --init ({after:?} vs {before:?})");
    let m = concierge_models::BiLstmCrf::load(&out, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let lex = m.soft_lexicon().expect("soft_lexicon.txt");
    assert_eq!(lex.len(), 5, "one-character words are left out");
    assert_eq!(m.config().lstm_input_dim(), 16 + 3 * 6);
    // Sorted; each weighted by 1 + its count in the 400 training sentences (龘龘: none).
    let listed = std::fs::read_to_string(out.join("soft_lexicon.txt")).unwrap();
    let rows: Vec<(&str, f32)> = listed.lines().map(|l| l.split_once('\t').map(|(w, c)| (w, c.parse().unwrap())).unwrap()).collect();
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), ["中国", "我们", "新华社", "邓小平", "龘龘"]);
    // The characters, with a | where a sentence ends.
    let train_text: String =
        first_sentences(&data, 400).lines().map(|l| l.split_whitespace().next().unwrap_or("|")).collect();
    // (The dev split takes a sentence or two of the 400.)
    for (w, c) in &rows {
        let n = train_text.matches(w).count() as f32;
        assert!(*c <= 1.0 + n && *c >= n - 3.0, "{w}: weight {c}, {n} times in the 400 sentences");
    }
    assert_eq!(rows[4].1, 1.0, "a word the text never has weighs 1");
    assert!(rows[0].1 > 10.0, "中国 occurs in MSRA's first sentences");
    // The vectors are frozen and kept (in f16 with --embeddings-f16).
    let saved = candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let table = &saved["soft_lexicon.embedding"];
    assert_eq!(table.dtype(), candle_core::DType::F16);
    let row: Vec<f32> = table.get(3).unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap();
    for (got, want) in row.iter().zip(vec_of(1)) {
        assert!((got - want).abs() < 1e-3, "新华社's vector: {row:?}");
    }
    eval_agrees_with_training(&out, &small_test);
    // Going on from it without the vectors: refused.
    let err = train(&args(&[common(&base), vec!["--epochs=1".into(), format!("--init={}", out.display())]].concat())).unwrap_err();
    assert!(format!("{err:#}").contains("soft lexicon differs"), "{err:#}");
    for d in [&out, &base] {
        std::fs::remove_dir_all(d).unwrap();
    }
    for f in [&small_test, &vectors] {
        std::fs::remove_file(f).unwrap();
    }
}

/// MSRA with LAC features (`--lac`, here the tiny random LAC folder of the tagger-lac-tiny
/// fixture): the loss falls, LAC stays frozen (the checkpoint's `lac.*` equal the folder's
/// weights; its embedding in f16 with `--embeddings-f16`), the checkpoint carries
/// `lac_vocab.json`, and eval-tagger (the serving code's ids) scores it as the run did.
#[test]
fn msra_with_lac_features_learns_frozen_or_fine_tuned() {
    let out = std::env::temp_dir().join(format!("concierge-train-msra-lac-{}", std::process::id()));
    let Some((data, small_test)) = msra_small(&out) else { return };
    let lac_dir = repo("models/tests/fixtures/tagger-lac-tiny/lac");
    train(&args(&[
        "--format=msra".into(), format!("--train={}", data.display()), format!("--out={}", out.display()),
        format!("--test={}", small_test.display()), "--limit=400".into(), "--epochs=2".into(), "--hidden=32".into(),
        "--char-dim=16".into(), format!("--lac={}", lac_dir.display()), "--lac-layers=2".into(), "--batch=32".into(),
        "--lr=1e-2".into(), "--dev-fraction=0.004".into(), "--embeddings-f16".into(),
    ]))
    .unwrap();
    let (loss, _) = losses(&out);
    assert!(loss[1] < loss[0], "the loss did not fall: {loss:?}");
    let m = concierge_models::BiLstmCrf::load(&out, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let lac = m.lac().expect("the LAC network");
    assert_eq!((lac.config().layers.clone(), lac.config().feature_dim()), (vec![2], 8));
    assert_eq!(m.config().lstm_input_dim(), 16 + 8);
    assert_eq!(lac.vocab().len(), 14);
    let saved = candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let fixture = candle_core::safetensors::load(repo("models/tests/fixtures/tagger-lac-tiny/model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(saved["lac.word_emb"].dtype(), candle_core::DType::F16);
    for name in ["lac.gru_2.w_0", "lac.fc_3.b_0", "lac.word_emb"] {
        let got: Vec<f32> = saved[name].to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = fixture[name].flatten_all().unwrap().to_vec1().unwrap();
        let tol = if name == "lac.word_emb" { 1e-3 } else { 0.0 };
        assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() <= tol), "{name} changed in training: LAC must stay frozen");
    }
    eval_agrees_with_training(&out, &small_test);
    // --lac-train, continuing that run (--init): LAC's weights now move, and the checkpoint as
    // served scores as the run did.
    let tuned = out.with_extension("tuned");
    train(&args(&[
        "--format=msra".into(), format!("--train={}", data.display()), format!("--out={}", tuned.display()),
        format!("--test={}", small_test.display()), "--limit=400".into(), "--epochs=1".into(), "--hidden=32".into(),
        "--char-dim=16".into(), format!("--lac={}", lac_dir.display()), "--lac-layers=2".into(), "--batch=32".into(),
        "--lr=1e-2".into(), "--dev-fraction=0.004".into(), format!("--init={}", out.display()), "--lac-train".into(),
        "--lac-lr=1e-2".into(),
    ]))
    .unwrap();
    let saved = candle_core::safetensors::load(tuned.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let moved = (saved["lac.gru_2.w_0"].clone() - &fixture["lac.gru_2.w_0"]).unwrap().abs().unwrap().max_all().unwrap();
    assert!(moved.to_scalar::<f32>().unwrap() > 1e-4, "--lac-train left LAC's weights where they were");
    eval_agrees_with_training(&tuned, &small_test);
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::remove_dir_all(&tuned).unwrap();
    std::fs::remove_file(&small_test).unwrap();
}

/// `ensemble-tagger` of ATIS taggers into `out`, scoring `test` and recording it.
fn atis_ensemble(members: Vec<PathBuf>, out: &Path, f16: bool, test: &Path, encoder: &Path) -> anyhow::Result<()> {
    ensemble(&EnsembleTagger {
        members,
        out: out.into(),
        f16,
        vote: Vote::Scores,
        test: Some(test.into()),
        train: None,
        format: Some(Format::Atis),
        encoder_dir: encoder.into(),
    })
}

/// `--dev-fraction 0` trains on every sentence for exactly --epochs and keeps the last epoch;
/// `ensemble-tagger` assembles two such runs (own seeds) into one checkpoint that eval-tagger
/// scores as it recorded, f16 weights and all; a member of another shape is refused by name.
#[test]
fn atis_runs_without_a_dev_set_assemble_into_an_ensemble() {
    let test = repo("model-store/data/atis/test");
    let Some((data, encoder)) = atis_data() else { return };
    let tmp = std::env::temp_dir().join(format!("concierge-train-ens-{}", std::process::id()));
    let run = |name: &str, seed: u64, hidden: usize| {
        let out = tmp.join(name);
        train(&args(&[
            "--format=atis".into(), format!("--train={}", data.display()), format!("--encoder-dir={}", encoder.display()),
            format!("--out={}", out.display()), "--limit=300".into(), "--epochs=3".into(), format!("--hidden={hidden}"),
            "--batch=16".into(), "--lr=5e-3".into(), format!("--seed={seed}"), "--dev-fraction=0".into(), format!("--test={}", test.display()),
        ]))
        .unwrap();
        out
    };
    let (a, b) = (run("a", 5, 48), run("b", 6, 48));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(a.join("training.json")).unwrap()).unwrap();
    // Every epoch ran (no dev set, so no early stop), and the checkpoint is the last one's.
    assert_eq!((v["dev_sentences"].as_u64(), v["best_epoch"].as_u64(), v["best_dev_f1"].is_null()), (Some(0), Some(3), true), "{v}");
    assert!(v["epochs"].as_array().unwrap().iter().all(|e| e["dev_f1"].is_null()), "{v}");
    let score = |model: &Path| {
        eval(&EvalTagger { model: model.into(), format: Format::Atis, test: test.clone(), encoder_dir: encoder.clone(), predictions: None })
            .unwrap()
            .f1()
    };
    let fa = score(&a);
    assert!(fa > 0.5, "a member trained on 300 sentences scored {fa}");
    assert!((v["test"]["f1"].as_f64().unwrap() - fa).abs() < 1e-9, "the run recorded {} and eval-tagger gives {fa}", v["test"]["f1"]);

    let ens = tmp.join("ens");
    let assemble = |members: Vec<PathBuf>| atis_ensemble(members, &ens, true, &test, &encoder);
    assemble(vec![a.clone(), b.clone()]).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ens.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["ensemble"], 2);
    let member: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(a.join("config.json")).unwrap()).unwrap();
    assert!(cfg["encoder"]["version"].is_string() && cfg["encoder"] == member["encoder"], "{cfg}");
    let rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ens.join("training.json")).unwrap()).unwrap();
    assert_eq!(rec["members"].as_array().unwrap().len(), 2);
    assert_eq!(rec["members"][1]["training"]["seed"], 6);
    let fe = score(&ens);
    assert!(fe > 0.5 && (rec["test"]["f1"].as_f64().unwrap() - fe).abs() < 1e-9, "ensemble {fe}, recorded {}", rec["test"]["f1"]);
    let ts = candle_core::safetensors::load(ens.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(ts["members.1.lstm.weight_ih_l0"].dtype(), candle_core::DType::F16);
    assert_eq!(ts["members.1.crf.transitions"].dtype(), candle_core::DType::F32);

    // An ensemble cannot be trained further as one.
    let mut more = args(&[
        "--format=atis".into(), format!("--train={}", data.display()), format!("--encoder-dir={}", encoder.display()),
        format!("--out={}", tmp.join("more").display()), "--limit=50".into(), "--epochs=1".into(), "--hidden=48".into(),
    ]);
    more.init = Some(ens.clone());
    let err = format!("{:#}", train(&more).unwrap_err());
    assert!(err.contains("an ensemble of 2 taggers"), "{err}");
    let c = run("c", 7, 32);
    let err = format!("{:#}", assemble(vec![a.clone(), c.clone()]).unwrap_err());
    assert!(err.contains(&c.display().to_string()) && err.contains("another config"), "{err}");
    let err = format!("{:#}", assemble(vec![a.clone()]).unwrap_err());
    assert!(err.contains("two or more"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `ensemble-tagger` on taggers with a fine-tuned encoder layer (`--train-layers`): each
/// member keeps its own layer under `members.{k}.encoder.layer.*` and runs it on the shared
/// pass's states, so the ensemble's emissions are the mean of what each member gives through
/// its own layer; one `encoder_config.json` is kept, eval-tagger scores the ensemble as
/// recorded, and members of another branch point or another encoder config are refused.
#[test]
fn atis_fine_tuned_taggers_assemble_into_an_ensemble() {
    use candle_core::{DType, Device, Tensor};
    use concierge_models::entities::{pad_batch, tagger_states, word_features, words_of};
    use concierge_models::tagger::BiLstmCrf;
    use concierge_models::{ModelSource, TextEncoder};
    let test = repo("model-store/data/atis/test");
    let Some((data, encoder)) = atis_data() else { return };
    let tmp = std::env::temp_dir().join(format!("concierge-train-ens-ft-{}", std::process::id()));
    let run = |name: &str, seed: u64, train_layers: usize| {
        let out = tmp.join(name);
        train(&args(&[
            "--format=atis".into(), format!("--train={}", data.display()), format!("--encoder-dir={}", encoder.display()),
            format!("--out={}", out.display()), "--limit=150".into(), "--epochs=2".into(), "--hidden=32".into(),
            "--batch=16".into(), "--lr=5e-3".into(), format!("--seed={seed}"), "--dev-fraction=0".into(),
            "--encoder-layers=5,6".into(), format!("--train-layers={train_layers}"), "--encoder-lr=1e-4".into(),
        ]))
        .unwrap();
        out
    };
    let (a, b) = (run("a", 5, 1), run("b", 6, 1));
    let ens = tmp.join("ens");
    let assemble = |members: Vec<PathBuf>| atis_ensemble(members, &ens, false, &test, &encoder);
    assemble(vec![a.clone(), b.clone()]).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ens.join("config.json")).unwrap()).unwrap();
    assert_eq!((cfg["ensemble"].as_u64(), cfg["branch_from"].as_u64()), (Some(2), Some(5)), "{cfg}");
    assert_eq!(std::fs::read(ens.join("encoder_config.json")).unwrap(), std::fs::read(a.join("encoder_config.json")).unwrap());
    let dev = Device::Cpu;
    let stored = candle_core::safetensors::load(ens.join("model.safetensors"), &dev).unwrap();
    assert!(stored.keys().all(|k| k.starts_with("members.")), "every tensor is a member's");
    let layer = "encoder.layer.5.attention.self.query.weight";
    let diff = |x: &Tensor, y: &Tensor| {
        let d = (x.to_dtype(DType::F32).unwrap() - y.to_dtype(DType::F32).unwrap()).unwrap();
        d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    };
    assert!(diff(&stored[&format!("members.0.{layer}")], &stored[&format!("members.1.{layer}")]) > 1e-5, "each member's own layer");

    // The ensemble's emissions through the shared feature path against each member's own.
    let enc = TextEncoder::load(&ModelSource::Dir(encoder.clone()), &dev, DType::F32, None).unwrap();
    let texts = ["show me flights from boston to denver on friday", "what is the cheapest fare to dallas", "list airports in arizona"];
    let toks: Vec<_> = texts.iter().map(|t| enc.tokenize(0, t, true).unwrap()).collect();
    let refs: Vec<_> = toks.iter().collect();
    let lens: Vec<usize> = toks.iter().map(|t| words_of(t).len()).collect();
    let emissions = |m: &BiLstmCrf| {
        let states = tagger_states(&enc, &refs, m).unwrap();
        let feats: Vec<Tensor> = (0..refs.len()).map(|i| word_features(&states.of(i).unwrap(), &words_of(&toks[i])).unwrap()).collect();
        assert_eq!(feats[0].dim(1).unwrap(), m.features_width());
        m.forward_emissions(&pad_batch(&feats, m.features_width(), &dev).unwrap(), &lens).unwrap()
    };
    let (ma, mb) = (BiLstmCrf::load(&a, &dev, DType::F32).unwrap(), BiLstmCrf::load(&b, &dev, DType::F32).unwrap());
    let model = BiLstmCrf::load(&ens, &dev, DType::F32).unwrap();
    assert_eq!((model.num_members(), model.features_width()), (2, 2 * ma.features_width()));
    let (ea, eb) = (emissions(&ma), emissions(&mb));
    assert!(diff(&ea, &eb) > 1e-3, "the members differ");
    let mean = ((ea + eb).unwrap() / 2.0).unwrap();
    assert!(diff(&emissions(&model), &mean) < 1e-4, "the ensemble's emissions are the mean of its members'");
    // Features of one member's width are refused, saying the width it takes.
    let one = Tensor::zeros((1, 3, ma.features_width()), DType::F32, &dev).unwrap();
    let err = model.forward_emissions(&one, &[3]).unwrap_err().to_string();
    assert!(err.contains(&format!("[batch, length, {}]", 2 * ma.features_width())), "{err}");
    let rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ens.join("training.json")).unwrap()).unwrap();
    let fe = eval(&EvalTagger { model: ens.clone(), format: Format::Atis, test: test.clone(), encoder_dir: encoder.clone(), predictions: None })
        .unwrap()
        .f1();
    // 150 sentences, 2 epochs: well above an untrained tagger's 0, far from a real one.
    assert!(fe > 0.15 && (rec["test"]["f1"].as_f64().unwrap() - fe).abs() < 1e-9, "ensemble {fe}, recorded {}", rec["test"]["f1"]);

    // Another branch point (two fine-tuned layers) is another config; another encoder config is refused by name.
    let c = run("c", 7, 2);
    let err = format!("{:#}", assemble(vec![a.clone(), c.clone()]).unwrap_err());
    assert!(err.contains(&c.display().to_string()) && err.contains("another config"), "{err}");
    let d = tmp.join("d");
    std::fs::create_dir_all(&d).unwrap();
    for f in std::fs::read_dir(&b).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
    }
    let mut moved = std::fs::read_to_string(d.join("encoder_config.json")).unwrap();
    moved.push(' ');
    std::fs::write(d.join("encoder_config.json"), moved).unwrap();
    let err = format!("{:#}", assemble(vec![a.clone(), d.clone()]).unwrap_err());
    assert!(err.contains("another encoder_config.json"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[derive(Parser)]
struct WrapAverage {
    #[command(flatten)]
    args: AverageTagger,
}

/// `train-tagger --keep-epochs` writes every epoch as a checkpoint (the best one byte for byte
/// as --out holds it); `average-tagger` averages them: without dev sentences the mean of all
/// (checked tensor by tensor, f16 tables kept f16), with --train the dev split held out again
/// (each epoch scores as its run recorded) choosing between each epoch and the means of the
/// last k. Checkpoints of another model, a dev split other than the run's, --out on a
/// checkpoint and a single checkpoint are refused, saying why. `--run-seed` reseeds a run but
/// not its dev split.
#[test]
fn msra_epochs_average_along_one_run_the_dev_split_choosing() {
    let out = std::env::temp_dir().join(format!("concierge-train-avg-{}", std::process::id()));
    let Some((data, test)) = msra_small(&out) else { return };
    let epochs = out.with_extension("epochs");
    train(&args(&[
        "--format=msra".into(), format!("--train={}", data.display()), format!("--out={}", out.display()),
        "--limit=400".into(), "--epochs=3".into(), "--patience=9".into(), "--hidden=32".into(), "--char-dim=32".into(), "--bigram-dim=8".into(),
        "--batch=32".into(), "--lr=1e-2".into(), "--dev-fraction=0.01".into(), "--embeddings-f16".into(),
        format!("--keep-epochs={}", epochs.display()),
    ]))
    .unwrap();
    let record = |d: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(d.join("training.json")).unwrap()).unwrap() };
    let run = record(&out);
    let dirs: Vec<PathBuf> = (1..=3).map(|e| epochs.join(format!("epoch-{e}"))).collect();
    let best = run["best_epoch"].as_u64().unwrap() as usize;
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(weights(&out), weights(&dirs[best - 1]), "--out and epoch-{best} differ");
    assert_ne!(weights(&dirs[0]), weights(&dirs[2]));

    let avg = |extra: &[String]| {
        let mut argv = vec!["average-tagger".to_string(), "--format=msra".into()];
        argv.extend(dirs.iter().map(|d| format!("--checkpoint={}", d.display())));
        argv.extend(extra.iter().cloned());
        average(&WrapAverage::parse_from(argv).args)
    };
    // No dev sentences: the mean of all three, each tensor in its own dtype.
    let mean = out.with_extension("mean");
    avg(&[format!("--out={}", mean.display())]).unwrap();
    let load = |d: &Path| candle_core::safetensors::load(d.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let (m, parts) = (load(&mean), dirs.iter().map(|d| load(d)).collect::<Vec<_>>());
    assert_eq!(m.len(), parts[0].len());
    assert_eq!(m["embedding.weight"].dtype(), candle_core::DType::F16);
    for name in ["embedding.weight", "lstm.weight_hh_l0_reverse", "crf.transitions"] {
        let f = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (got, p) = (f(&m[name]), parts.iter().map(|t| f(&t[name])).collect::<Vec<_>>());
        let tol = if m[name].dtype() == candle_core::DType::F16 { 2e-3 } else { 1e-6 };
        for i in 0..got.len() {
            let want = (p[0][i] + p[1][i] + p[2][i]) / 3.0;
            assert!((got[i] - want).abs() <= tol * (1.0 + want.abs()), "{name}[{i}]: {} against {want}", got[i]);
        }
    }
    assert_eq!(record(&mean)["kept"], "mean of the last 3");
    for f in ["config.json", "tags.json", "vocab.json", "bigrams.json"] {
        assert_eq!(std::fs::read(mean.join(f)).unwrap(), std::fs::read(dirs[0].join(f)).unwrap(), "{f}");
    }

    // With the run's dev split: five candidates, the best kept, the test split scored on it.
    let chosen = out.with_extension("chosen");
    let dev_args = |o: &Path, fraction: &str| vec![format!("--out={}", o.display()), format!("--train={}", data.display()), format!("--dev-fraction={fraction}"), format!("--test={}", test.display())];
    avg(&dev_args(&chosen, "0.01")).unwrap();
    let rec = record(&chosen);
    let cands = rec["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 5, "{rec}");
    let f1s: Vec<f64> = cands.iter().map(|c| c["dev_f1"].as_f64().unwrap()).collect();
    for (e, f) in run["epochs"].as_array().unwrap().iter().zip(&f1s) {
        // Scored as saved (f16 tables) against the run's own scores before rounding.
        assert!((e["dev_f1"].as_f64().unwrap() - f).abs() < 0.02, "{e} against {f}");
    }
    let top = f1s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let k = f1s.iter().position(|&f| f == top).unwrap();
    assert_eq!(rec["kept"], cands[k]["name"], "{rec}");
    assert_eq!(rec["chosen_on"]["sentences"], run["dev_sentences"]);
    let e = eval(&EvalTagger { model: chosen.clone(), format: Format::Msra, test: test.clone(), encoder_dir: repo("model-store/all-MiniLM-L6-v2"), predictions: None }).unwrap();
    assert_eq!(e.f1(), rec["test"]["f1"].as_f64().unwrap());
    if k < 3 {
        assert_eq!(weights(&chosen), weights(&dirs[k]));
    }
    assert!(!chosen.with_extension("chosen.candidates").exists(), "the candidates' folder is left behind");

    // Refusals.
    let err = |extra: Vec<String>| format!("{:#}", avg(&extra).unwrap_err());
    let e = err(dev_args(&out.with_extension("x"), "0.02"));
    assert!(e.contains("is not the one") && e.contains("--dev-fraction"), "{e}");
    let e = err(vec![format!("--out={}", dirs[1].display())]);
    assert!(e.contains("is one of the --checkpoint folders"), "{e}");
    let odd = out.with_extension("odd");
    std::fs::create_dir_all(&odd).unwrap();
    for entry in std::fs::read_dir(&dirs[0]).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), odd.join(entry.file_name())).unwrap();
    }
    std::fs::write(odd.join("tags.json"), "[\"O\"]").unwrap();
    let mut argv = vec!["average-tagger".to_string(), "--format=msra".into(), format!("--out={}", out.with_extension("y").display())];
    argv.push(format!("--checkpoint={}", dirs[0].display()));
    argv.push(format!("--checkpoint={}", odd.display()));
    let e = format!("{:#}", average(&WrapAverage::parse_from(argv.clone()).args).unwrap_err());
    assert!(e.contains("tags.json differs"), "{e}");
    argv.pop();
    let e = format!("{:#}", average(&WrapAverage::parse_from(argv).args).unwrap_err());
    assert!(e.contains("two or more"), "{e}");
    // --run-seed: another run (init, order, dropout) over the same dev split.
    let other = out.with_extension("other");
    train(&args(&[
        "--format=msra".into(), format!("--train={}", data.display()), format!("--out={}", other.display()),
        "--limit=400".into(), "--epochs=1".into(), "--hidden=32".into(), "--char-dim=32".into(), "--bigram-dim=8".into(),
        "--batch=32".into(), "--lr=1e-2".into(), "--dev-fraction=0.01".into(), "--run-seed=14".into(),
    ]))
    .unwrap();
    let o = record(&other);
    assert_eq!((o["seed"].as_u64(), o["run_seed"].as_u64(), &o["dev_sentences"]), (Some(13), Some(14), &run["dev_sentences"]));
    assert_ne!(o["epochs"][0]["loss"], run["epochs"][0]["loss"], "--run-seed changed nothing");
    for d in [&out, &epochs, &mean, &chosen, &odd, &other] {
        std::fs::remove_dir_all(d).unwrap();
    }
    std::fs::remove_file(out.with_extension("test.txt")).unwrap();
}

/// `ensemble-tagger` on character taggers: two MSRA runs with every per-character feature
/// (bigrams, a word-vector soft lexicon, LAC fine-tuned, a tiny frozen char BERT), the same data
/// and dev split but their own --run-seed, assemble into one checkpoint. The frozen char BERT
/// and word vectors are stored once, each member keeps its own tables and LAC network, the
/// ensemble's emissions are the mean of the members' on the same ids, it round-trips through
/// save/load, and eval-tagger scores it as ensemble-tagger recorded; voting by marginals, its
/// emissions are the log of the members' mean marginals. Members with another
/// vocabulary or a BERT that moved are refused, naming the member and what differs.
#[test]
fn msra_character_taggers_assemble_into_an_ensemble() {
    use candle_core::{DType, Device, Tensor};
    use concierge_models::tagger::EnsembleVote;
    use concierge_models::BiLstmCrf;
    let tmp = std::env::temp_dir().join(format!("concierge-train-msra-ens-{}", std::process::id()));
    let Some((data, small_test)) = msra_small(&tmp) else { return };
    std::fs::create_dir_all(&tmp).unwrap();
    let bert_dir = tmp.join("bert");
    tiny_zh_bert(&bert_dir);
    let vectors = tmp.join("words.vector");
    let words = ["中国", "新华社", "北京", "我们"];
    let text: String = words
        .iter()
        .enumerate()
        .map(|(k, w)| format!("{w} {}\n", (0..4).map(|i| ((k * 4 + i) as f32 * 0.25 - 2.0).to_string()).collect::<Vec<_>>().join(" ")))
        .collect();
    std::fs::write(&vectors, format!("{} 4\n{text}", words.len())).unwrap();
    let lac_dir = repo("models/tests/fixtures/tagger-lac-tiny/lac");
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.join(name);
        let mut a: Vec<String> = vec![
            "--format=msra".into(), format!("--train={}", data.display()), format!("--out={}", out.display()),
            "--epochs=2".into(), "--hidden=16".into(), "--char-dim=16".into(), "--bigram-dim=4".into(),
            format!("--lac={}", lac_dir.display()), "--lac-layers=2".into(), "--lac-train".into(), "--lac-lr=1e-2".into(),
            format!("--word-vectors={}", vectors.display()), "--soft-lexicon-per-set=2".into(),
            format!("--char-bert={}", bert_dir.display()), "--batch=32".into(), "--lr=1e-2".into(), "--dev-fraction=0.01".into(),
            "--seed=3".into(), "--embeddings-f16".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        if !extra.iter().any(|e| e.starts_with("--limit")) {
            a.push("--limit=400".into());
        }
        train(&args(&a)).unwrap();
        out
    };
    let (a, b) = (run("a", &["--run-seed=5"]), run("b", &["--run-seed=6"]));
    let ens = tmp.join("ens");
    let assemble = |members: Vec<PathBuf>| {
        ensemble(&EnsembleTagger {
            members,
            out: ens.clone(),
            f16: false,
            vote: Vote::Scores,
            test: Some(small_test.clone()),
            train: Some(data.clone()),
            format: Some(Format::Msra),
            encoder_dir: repo("model-store/all-MiniLM-L6-v2"),
        })
    };
    assemble(vec![a.clone(), b.clone()]).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ens.join("config.json")).unwrap()).unwrap();
    assert_eq!((cfg["ensemble"].as_u64(), cfg["input"].as_str()), (Some(2), Some("embeddings")), "{cfg}");
    for f in ["vocab.json", "bigrams.json", "lac_vocab.json", "soft_lexicon.txt", "char_bert_vocab.json"] {
        assert_eq!(std::fs::read(ens.join(f)).unwrap(), std::fs::read(a.join(f)).unwrap(), "{f}");
    }
    let dev = Device::Cpu;
    let stored = candle_core::safetensors::load(ens.join("model.safetensors"), &dev).unwrap();
    let member = candle_core::safetensors::load(a.join("model.safetensors"), &dev).unwrap();
    // Shared frozen parts once, at the top, as the member stored them; the rest per member.
    assert!(stored.keys().all(|k| k.starts_with("members.") || k.starts_with("char_bert.") || k == "soft_lexicon.embedding"));
    assert!(!stored.keys().any(|k| k.contains(".char_bert.") || k.contains(".soft_lexicon.")));
    let bert_name = "char_bert.encoder.layer.1.output.dense.weight";
    assert_eq!(stored[bert_name].dtype(), member[bert_name].dtype());
    let per_member = member.keys().filter(|k| !k.starts_with("char_bert.") && !k.starts_with("soft_lexicon.")).count();
    assert_eq!(stored.len(), member.len() + per_member, "one copy of the shared tensors, two of the rest");
    let diff = |x: &Tensor, y: &Tensor| {
        let d = (x.to_dtype(DType::F32).unwrap() - y.to_dtype(DType::F32).unwrap()).unwrap();
        d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    };
    let lac = "lac.gru_2.w_0";
    assert!(diff(&stored[&format!("members.0.{lac}")], &stored[&format!("members.1.{lac}")]) > 1e-4, "each member's own fine-tuned LAC");

    let (ma, mb) = (BiLstmCrf::load(&a, &dev, DType::F32).unwrap(), BiLstmCrf::load(&b, &dev, DType::F32).unwrap());
    let model = BiLstmCrf::load(&ens, &dev, DType::F32).unwrap();
    assert_eq!(model.num_members(), 2);
    let texts = ["新华社北京十二月五日电", "我们在上海", "中国人民"];
    let (ids, lens) = model.char_ids(&texts, &dev).unwrap();
    assert_eq!(ids.to_vec3::<u32>().unwrap(), ma.char_ids(&texts, &dev).unwrap().0.to_vec3::<u32>().unwrap());
    let mean = ((ma.forward_emissions(&ids, &lens).unwrap() + mb.forward_emissions(&ids, &lens).unwrap()).unwrap() / 2.0).unwrap();
    let got = model.forward_emissions(&ids, &lens).unwrap();
    assert!(diff(&got, &mean) < 1e-4, "the ensemble's emissions are the mean of its members'");
    assert!(diff(&ma.forward_emissions(&ids, &lens).unwrap(), &mb.forward_emissions(&ids, &lens).unwrap()) > 1e-3, "the members differ");
    // save/load keeps each member's LAC under its own name.
    let again = tmp.join("again");
    model.save(&again).unwrap();
    let reloaded = BiLstmCrf::load(&again, &dev, DType::F32).unwrap();
    assert!(diff(&reloaded.forward_emissions(&ids, &lens).unwrap(), &got) < 1e-6);
    let rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ens.join("training.json")).unwrap()).unwrap();
    let e = eval(&EvalTagger {
        model: ens.clone(),
        format: Format::Msra,
        test: small_test.clone(),
        encoder_dir: repo("model-store/all-MiniLM-L6-v2"),
        predictions: None,
    })
    .unwrap();
    assert_eq!(e.f1(), rec["test"]["f1"].as_f64().unwrap());
    // The dev split the members held out (--dev-fraction 0.01 of the whole file, seed 3).
    let member_rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(a.join("training.json")).unwrap()).unwrap();
    assert_eq!(rec["dev"]["sentences"], member_rec["dev_sentences"], "{rec}");
    assert_eq!((rec["dev"]["seed"].as_u64(), rec["dev"]["dev_fraction"].as_f64()), (Some(3), Some(0.01)));
    assert!(rec["dev"]["f1"].is_f64());
    // Voting by marginals (--vote marginals): the log of the members' mean marginals (each
    // member's own CRF), through the same shared features.
    let voted = tmp.join("voted");
    ensemble(&EnsembleTagger {
        members: vec![a.clone(), b.clone()],
        out: voted.clone(),
        f16: false,
        vote: Vote::Marginals,
        test: None,
        train: None,
        format: Some(Format::Msra),
        encoder_dir: repo("model-store/all-MiniLM-L6-v2"),
    })
    .unwrap();
    let vmodel = BiLstmCrf::load(&voted, &dev, DType::F32).unwrap();
    assert_eq!(vmodel.config().ensemble_vote, EnsembleVote::Marginals);
    let mean_marg = ((ma.marginals(&ids, &lens).unwrap() + mb.marginals(&ids, &lens).unwrap()).unwrap() / 2.0).unwrap();
    let want = mean_marg.maximum(1e-30).unwrap().log().unwrap();
    assert!(diff(&vmodel.forward_emissions(&ids, &lens).unwrap(), &want) < 1e-4, "a marginals vote's emissions are the log mean marginals");
    let vrec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(voted.join("training.json")).unwrap()).unwrap();
    assert_eq!(vrec["vote"], "marginals");
    assert_eq!(rec["vote"], "scores");

    // Other training sentences: another vocabulary size, so another config.
    let c = run("c", &["--run-seed=7", "--limit=200"]);
    let err = format!("{:#}", assemble(vec![a.clone(), c.clone()]).unwrap_err());
    assert!(err.contains(&c.display().to_string()) && err.contains("another config"), "{err}");
    let copy_of_b = |name: &str| {
        let d = tmp.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in std::fs::read_dir(&b).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
        }
        d
    };
    // The same size, but two characters' ids swapped: refused, naming the member and the file.
    let c2 = copy_of_b("c2");
    let mut vocab: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(c2.join("vocab.json")).unwrap()).unwrap();
    let (x, y) = (vocab["中"].clone(), vocab["国"].clone());
    vocab.insert("中".into(), y);
    vocab.insert("国".into(), x);
    std::fs::write(c2.join("vocab.json"), serde_json::to_string(&vocab).unwrap()).unwrap();
    let err = format!("{:#}", assemble(vec![a.clone(), c2.clone()]).unwrap_err());
    assert!(err.contains(&c2.display().to_string()) && err.contains("another vocab.json"), "{err}");
    // A member whose BERT was fine-tuned: the shared BERT would not be its own.
    let mut tuned_bert = member.clone();
    tuned_bert.insert(bert_name.into(), (member[bert_name].to_dtype(DType::F32).unwrap() + 0.5).unwrap().to_dtype(member[bert_name].dtype()).unwrap());
    let d = copy_of_b("d");
    candle_core::safetensors::save(&tuned_bert, d.join("model.safetensors")).unwrap();
    let err = format!("{:#}", assemble(vec![a.clone(), d.clone()]).unwrap_err());
    assert!(err.contains(&d.display().to_string()) && err.contains(bert_name) && err.contains("frozen"), "{err}");
    // A member that held out another dev split (its record says seed 4): no clean dev score.
    let e = copy_of_b("e");
    let mut record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(e.join("training.json")).unwrap()).unwrap();
    record["seed"] = 4.into();
    std::fs::write(e.join("training.json"), record.to_string()).unwrap();
    let err = format!("{:#}", assemble(vec![a.clone(), e.clone()]).unwrap_err());
    assert!(err.contains(&e.display().to_string()) && err.contains("another dev split"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::remove_file(&small_test).unwrap();
}

/// A tiny random Chinese BERT folder as `--char-bert` reads one: `config.json`, a WordPiece
/// `tokenizer.json` (with multi-character and `##` tokens, which a character tagger drops) and
/// `model.safetensors` under `bert.` names. Returns the full vocabulary, token -> id.
fn tiny_zh_bert(dir: &Path) -> std::collections::HashMap<String, u32> {
    std::fs::create_dir_all(dir).unwrap();
    let mut tokens: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "中国", "##国"].map(String::from).to_vec();
    tokens.extend("中国人民的在了是北京上海新华社记者日月年".chars().map(String::from));
    let vocab: std::collections::HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let (h, inter, layers, positions) = (8usize, 16usize, 2usize, 64usize);
    std::fs::write(
        dir.join("config.json"),
        serde_json::json!({"model_type": "bert", "vocab_size": tokens.len(), "hidden_size": h, "num_hidden_layers": layers,
            "num_attention_heads": 2, "intermediate_size": inter, "hidden_act": "gelu", "max_position_embeddings": positions,
            "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0, "hidden_dropout_prob": 0.1, "initializer_range": 0.02})
        .to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), serde_json::json!({"model": {"type": "WordPiece", "vocab": vocab}}).to_string()).unwrap();
    let cfg = concierge_models::tagger::CharBertConfig {
        vocab_size: tokens.len(), hidden_size: h, num_hidden_layers: layers, num_attention_heads: 2, intermediate_size: inter,
        max_position_embeddings: positions, type_vocab_size: 2, layer_norm_eps: 1e-12, layers: vec![layers],
    };
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut tensors = std::collections::HashMap::new();
    for (name, shape) in cfg.tensor_shapes() {
        let n: usize = shape.iter().product();
        let base = if name.ends_with("LayerNorm.weight") { 1.0 } else { 0.0 };
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                base + ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
            })
            .collect();
        tensors.insert(format!("bert.{name}"), candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap());
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    vocab
}

/// MSRA with a pretrained Chinese BERT's features (`--char-bert`, here a tiny random one): the
/// loss falls, the checkpoint carries the BERT's single-character rows and special tokens
/// (`char_bert_vocab.json`) and its weights unchanged (frozen; f16 with `--embeddings-f16`),
/// and eval-tagger (the serving code's ids) scores it as the run did.
#[test]
fn msra_with_char_bert_features_learns() {
    let out = std::env::temp_dir().join(format!("concierge-train-msra-char-bert-{}", std::process::id()));
    let Some((data, small_test)) = msra_small(&out) else { return };
    let bert_dir = out.with_extension("bert");
    let full = tiny_zh_bert(&bert_dir);
    train(&args(&[
        "--format=msra".into(), format!("--train={}", data.display()), format!("--out={}", out.display()),
        format!("--test={}", small_test.display()), "--limit=400".into(), "--epochs=2".into(), "--hidden=32".into(),
        "--char-dim=16".into(), format!("--char-bert={}", bert_dir.display()), "--char-bert-layers=1,2".into(), "--batch=32".into(),
        "--lr=1e-2".into(), "--dev-fraction=0.004".into(), "--embeddings-f16".into(),
    ]))
    .unwrap();
    let (loss, _) = losses(&out);
    assert!(loss[1] < loss[0], "the loss did not fall: {loss:?}");
    let m = concierge_models::BiLstmCrf::load(&out, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let cb = m.char_bert().expect("the char BERT");
    assert_eq!((cb.config().layers.clone(), cb.config().feature_dim()), (vec![1, 2], 16));
    assert_eq!(m.config().lstm_input_dim(), 16 + 16);
    // The specials and the 20 single characters, not 中国 / ##国 / [MASK].
    let kept: std::collections::BTreeMap<String, u32> = cb.vocab().entries().map(|(t, i)| (t.to_string(), i)).collect();
    assert_eq!(kept.len(), 4 + 20);
    assert!(!kept.contains_key("中国") && !kept.contains_key("##国") && !kept.contains_key("[MASK]"));
    let saved = candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let folder = candle_core::safetensors::load(bert_dir.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(saved["char_bert.encoder.layer.1.output.dense.weight"].dtype(), candle_core::DType::F16);
    let close = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        let d = (a.to_dtype(candle_core::DType::F32).unwrap() - b).unwrap().abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() <= 1e-3
    };
    assert!(close(&saved["char_bert.encoder.layer.1.output.dense.weight"], &folder["bert.encoder.layer.1.output.dense.weight"]), "the BERT must stay frozen");
    // Each kept token's row is its row in the folder's table.
    let table = &folder["bert.embeddings.word_embeddings.weight"];
    let rows = &saved["char_bert.embeddings.word_embeddings.weight"];
    for t in ["[CLS]", "北", "年"] {
        assert!(close(&rows.get(kept[t] as usize).unwrap(), &table.get(full[t] as usize).unwrap()), "row of {t}");
    }
    eval_agrees_with_training(&out, &small_test);

    // The fine-tuning pass (autograd ops) computes the frozen pass's features: within 1e-5 on
    // sentences padded to different lengths, one longer than the BERT's 64 positions.
    let long: String = "中国人民在北京上海".repeat(9);
    let texts = ["新华社记者", long.as_str(), "日"];
    let (ids, lengths) = m.char_ids(&texts, &candle_core::Device::Cpu).unwrap();
    let col = ids.narrow(2, ids.dim(2).unwrap() - 1, 1).unwrap().squeeze(2).unwrap().contiguous().unwrap();
    let frozen = cb.features(&col, &lengths, candle_core::DType::F32).unwrap();
    let map = candle_nn::VarMap::new();
    let tuned = concierge_train::char_bert::trainable(cb, &map, None).unwrap();
    let through = tuned.features(&col, &lengths, candle_core::DType::F32).unwrap();
    let err = (frozen - through).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(err <= 1e-5, "the fine-tuning pass differs from the frozen one by {err}");
    let map = candle_nn::VarMap::new();
    let top = concierge_train::char_bert::trainable(cb, &map, Some(1)).unwrap();
    let through = top.features(&col, &lengths, candle_core::DType::F32).unwrap();
    let err = (cb.features(&col, &lengths, candle_core::DType::F32).unwrap() - through).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(err <= 1e-5, "the top-layer fine-tuning pass differs from the frozen one by {err}");
    assert!(map.all_vars().len() == 16, "only the top layer's 16 tensors train, not {}", map.all_vars().len());

    // --char-bert-train, continuing that run (--init): the BERT's weights now move, and the
    // checkpoint as served scores as the run did.
    let tuned = out.with_extension("tuned");
    train(&args(&[
        "--format=msra".into(), format!("--train={}", data.display()), format!("--out={}", tuned.display()),
        format!("--test={}", small_test.display()), "--limit=400".into(), "--epochs=1".into(), "--hidden=32".into(),
        "--char-dim=16".into(), format!("--char-bert={}", bert_dir.display()), "--char-bert-layers=1,2".into(), "--batch=32".into(),
        "--lr=1e-2".into(), "--dev-fraction=0.004".into(), format!("--init={}", out.display()), "--char-bert-train".into(),
        "--char-bert-lr=1e-2".into(),
    ]))
    .unwrap();
    let after = candle_core::safetensors::load(tuned.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let name = "char_bert.encoder.layer.1.output.dense.weight";
    let moved = (after[name].to_dtype(candle_core::DType::F32).unwrap() - saved[name].to_dtype(candle_core::DType::F32).unwrap())
        .unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(moved > 1e-4, "--char-bert-train left the BERT's weights where they were");
    eval_agrees_with_training(&tuned, &small_test);
    // --char-bert-train-layers 1: the top layer moves, the layer below does not.
    let top = out.with_extension("top");
    train(&args(&[
        "--format=msra".into(), format!("--train={}", data.display()), format!("--out={}", top.display()),
        format!("--test={}", small_test.display()), "--limit=400".into(), "--epochs=1".into(), "--hidden=32".into(),
        "--char-dim=16".into(), format!("--char-bert={}", bert_dir.display()), "--char-bert-layers=1,2".into(), "--batch=32".into(),
        "--lr=1e-2".into(), "--dev-fraction=0.004".into(), format!("--init={}", out.display()), "--char-bert-train".into(),
        "--char-bert-lr=1e-2".into(), "--char-bert-train-layers=1".into(),
    ]))
    .unwrap();
    let after = candle_core::safetensors::load(top.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let change = |name: &str| {
        (after[name].to_dtype(candle_core::DType::F32).unwrap() - saved[name].to_dtype(candle_core::DType::F32).unwrap())
            .unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    };
    assert!(change(name) > 1e-4, "the top layer did not move");
    assert_eq!(change("char_bert.encoder.layer.0.output.dense.weight"), 0.0, "the layer below the top moved");
    eval_agrees_with_training(&top, &small_test);
    std::fs::remove_dir_all(&top).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::remove_dir_all(&tuned).unwrap();
    std::fs::remove_dir_all(&bert_dir).unwrap();
    std::fs::remove_file(&small_test).unwrap();
}
