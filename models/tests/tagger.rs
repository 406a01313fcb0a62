//! The BiLSTM-CRF tagger: against PyTorch (fixtures made by scripts/make_tagger_fixture.py:
//! nn.LSTM over packed sequences and pytorch-crf's CRF, in float64), against brute-force
//! enumeration of every tag path, padded batches against each sequence alone, training through
//! autograd, and the checkpoint round trip.
//!
//! Tolerances: an f32 value v against its reference r passes when |v - r| <= TOL * max(1, |r|),
//! TOL = 1e-5 (emissions reach ~9 and log-partitions ~40 in the fixtures; measured errors are
//! printed, around 1e-6 relative). Viterbi paths must be equal.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use concierge_models::tagger::{Crf, EnsembleVote, InputKind, Reduction, TagPath};
use concierge_models::{BiLstmCrf, ModelError, TaggerConfig};

const TOL: f32 = 1e-5;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// CPU, and the GPU when this build has one: the same test body runs on each.
fn devices() -> Vec<Device> {
    let mut devs = vec![Device::Cpu];
    if candle_core::utils::cuda_is_available() {
        devs.push(Device::new_cuda(0).unwrap());
    }
    devs
}

fn tmp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("concierge-tagger-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn floats(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// The largest |got - want| / max(1, |want|), asserted within TOL.
fn check_close(what: &str, got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{what}");
    let err = floats(got)
        .iter()
        .zip(floats(want))
        .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
        .fold(0f32, f32::max);
    println!("{what}: max error {err:.2e}");
    assert!(err <= TOL, "{what}: max error {err}");
    err
}

struct Reference {
    t: HashMap<String, Tensor>,
    lengths: Vec<usize>,
}

impl Reference {
    fn load(dir: &Path, dev: &Device) -> Self {
        let t = candle_core::safetensors::load(dir.join("reference.safetensors"), dev).unwrap();
        let lengths = t["lengths"].to_vec1::<i64>().unwrap().into_iter().map(|n| n as usize).collect();
        Self { t, lengths }
    }

    /// Rows of an i64 [B, L] tensor, cut at each length.
    fn rows(&self, name: &str) -> Vec<Vec<u32>> {
        let all = self.t[name].to_vec2::<i64>().unwrap();
        all.iter().zip(&self.lengths).map(|(r, &n)| r[..n].iter().map(|&v| v as u32).collect()).collect()
    }

    fn input(&self) -> Tensor {
        match self.t.get("input") {
            Some(x) => x.clone(),
            None => self.t["ids"].to_dtype(DType::U32).unwrap(),
        }
    }
}

/// Every output of the model, and of its CRF on the reference emissions alone, against PyTorch.
fn check_parity(name: &str, dev: &Device) -> BiLstmCrf {
    let dir = fixture_dir(name);
    let model = BiLstmCrf::load(&dir, dev, DType::F32).unwrap();
    let r = Reference::load(&dir, dev);
    let (x, lengths, gold) = (r.input(), r.lengths.clone(), r.rows("gold"));
    let emissions = model.forward_emissions(&x, &lengths).unwrap();
    check_close(&format!("{name} emissions"), &emissions, &r.t["emissions"]);
    // `load` packs the LSTM's input projections for the CPU GEMM; a model built straight from
    // the weights (as training builds it) steps them in candle ops: both match PyTorch.
    let path = dir.join("model.safetensors");
    // SAFETY: a read-only map of a fixture file.
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, dev) }.unwrap();
    let mut built = BiLstmCrf::new(vb, model.config(), model.tags().to_vec()).unwrap();
    if let Some(v) = model.vocab() {
        built = built.with_vocab(v.clone()).unwrap();
    }
    check_close(&format!("{name} emissions, unpacked"), &built.forward_emissions(&x, &lengths).unwrap(), &r.t["emissions"]);

    let want_paths = r.rows("paths");
    let crf = model.crf();
    // Our emissions through the whole model, then the reference emissions through the CRF.
    for (which, em) in [("model", &emissions), ("crf", &r.t["emissions"])] {
        let what = format!("{name} {which}");
        let decoded = crf.decode(em, &lengths).unwrap();
        let paths: Vec<Vec<u32>> = decoded.iter().map(|p| p.tags.clone()).collect();
        assert_eq!(paths, want_paths, "{what} viterbi paths");
        let scores = Tensor::new(decoded.iter().map(|p| p.score).collect::<Vec<_>>(), dev).unwrap();
        check_close(&format!("{what} viterbi scores"), &scores, &r.t["path_scores"]);
        check_close(&format!("{what} log partition"), &crf.log_partition(em, &lengths).unwrap(), &r.t["log_partition"]);
        check_close(&format!("{what} gold scores"), &crf.path_score(em, &gold).unwrap(), &r.t["gold_scores"]);
        check_close(&format!("{what} nll"), &crf.nll_per_sequence(em, &gold).unwrap(), &r.t["nll"]);
        check_close(&format!("{what} nll mean"), &crf.nll(em, &gold, Reduction::Mean).unwrap(), &r.t["nll_mean"]);
        check_close(&format!("{what} marginals"), &crf.marginals(em, &lengths).unwrap(), &r.t["marginals"]);
    }
    // The model's own entry points agree with the CRF's.
    let via_model: Vec<Vec<u32>> = model.decode(&x, &lengths).unwrap().into_iter().map(|p| p.tags).collect();
    assert_eq!(via_model, want_paths);
    check_close(&format!("{name} model nll"), &model.nll(&x, &gold, Reduction::Mean).unwrap(), &r.t["nll_mean"]);
    check_close(&format!("{name} model marginals"), &model.marginals(&x, &lengths).unwrap(), &r.t["marginals"]);
    model
}

#[test]
fn encoder_feature_tagger_matches_pytorch() {
    for dev in devices() {
        let model = check_parity("tagger-tiny", &dev);
        let cfg = model.config();
        assert_eq!((cfg.input, cfg.input_dim, cfg.hidden_size, cfg.num_layers), (InputKind::Encoder, 12, 8, 2));
        assert_eq!(model.tags()[..3], ["O", "B-PER", "I-PER"]);
        assert!(model.vocab().is_none());
    }
}

/// The intent-aware tagger (`num_intents`): its intent logits, emissions with the intent term and
/// Viterbi paths against scripts/make_tagger_intent_fixture.py (NumPy in float64, its BiLSTM
/// first checked against tagger-tiny's PyTorch reference); packed and unpacked LSTM paths; the
/// save/load round trip keeps the intent names; the joint loss is the CRF's plus the weighted
/// cross-entropy and trains both.
#[test]
fn an_intent_aware_tagger_matches_its_reference() {
    for dev in devices() {
        let dir = fixture_dir("tagger-intent-tiny");
        let model = BiLstmCrf::load(&dir, &dev, DType::F32).unwrap();
        assert_eq!(model.config().num_intents, Some(5));
        assert_eq!(model.intents()[2], "ground_service");
        let r = Reference::load(&dir, &dev);
        let (x, lengths) = (r.input(), r.lengths.clone());
        let out = model.forward(&x, &lengths, false).unwrap();
        check_close("intent emissions", &out.emissions, &r.t["emissions"]);
        check_close("intent logits", out.intent_logits.as_ref().unwrap(), &r.t["intent_logits"]);
        let paths: Vec<Vec<u32>> = model.decode(&x, &lengths).unwrap().into_iter().map(|p| p.tags).collect();
        assert_eq!(paths, r.rows("paths"), "intent-aware viterbi paths");
        // The plain tagger with the same BiLSTM decodes differently: the intent term matters.
        let plain = BiLstmCrf::load(&fixture_dir("tagger-tiny"), &dev, DType::F32).unwrap();
        let plain_paths: Vec<Vec<u32>> = plain.decode(&x, &lengths).unwrap().into_iter().map(|p| p.tags).collect();
        assert_ne!(plain_paths, paths);
        let probs = model.intent_probs(&x, &lengths).unwrap().unwrap();
        let want = candle_nn::ops::softmax_last_dim(&r.t["intent_logits"]).unwrap();
        check_close("intent probabilities", &probs, &want);

        // Built straight from the weights (training's unpacked LSTM path).
        let path = dir.join("model.safetensors");
        // SAFETY: a read-only map of a fixture file.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &dev) }.unwrap();
        let built = BiLstmCrf::new(vb, model.config(), model.tags().to_vec()).unwrap();
        check_close("intent emissions, unpacked", &built.forward_emissions(&x, &lengths).unwrap(), &r.t["emissions"]);

        // Save and load: intents.json comes back; without it, loading names the file.
        let out_dir = tmp_dir("intent");
        model.save(&out_dir).unwrap();
        let again = BiLstmCrf::load(&out_dir, &dev, DType::F32).unwrap();
        assert_eq!(again.intents(), model.intents());
        check_close("intent emissions, reloaded", &again.forward_emissions(&x, &lengths).unwrap(), &r.t["emissions"]);
        std::fs::remove_file(out_dir.join("intents.json")).unwrap();
        let err = BiLstmCrf::load(&out_dir, &dev, DType::F32).unwrap_err().to_string();
        assert!(err.contains("intents.json"), "{err}");
        std::fs::write(out_dir.join("intents.json"), "[\"a\", \"b\"]").unwrap();
        let err = BiLstmCrf::load(&out_dir, &dev, DType::F32).unwrap_err().to_string();
        assert!(err.contains("intents.json") && err.contains("num_intents 5"), "{err}");
        let _ = std::fs::remove_dir_all(&out_dir);

        // The joint loss: the CRF's mean NLL plus weight x the mean cross-entropy.
        let gold = r.rows("paths");
        let intents = [0u32, 2, 4, 1];
        let nll = model.nll(&x, &gold, Reduction::Mean).unwrap().to_scalar::<f32>().unwrap();
        let logits = r.t["intent_logits"].to_vec2::<f32>().unwrap();
        let ce: f32 = logits
            .iter()
            .zip(intents)
            .map(|(row, k)| {
                let m = row.iter().copied().fold(f32::MIN, f32::max);
                m + row.iter().map(|v| (v - m).exp()).sum::<f32>().ln() - row[k as usize]
            })
            .sum::<f32>()
            / 4.0;
        let joint = model.joint_loss(&x, &gold, &intents, 0.5, false).unwrap().to_scalar::<f32>().unwrap();
        assert!((joint - (nll + 0.5 * ce)).abs() <= TOL * joint.abs().max(1.0), "joint {joint} vs {nll} + 0.5 x {ce}");
        assert!(model.joint_loss(&x, &gold, &[0, 1, 9, 0], 1.0, false).is_err(), "an intent id past num_intents");
        assert!(plain.joint_loss(&x, &gold, &intents, 1.0, false).is_err(), "a tagger without intent layers");
    }
    // Training: the joint loss falls and the intent layers learn the gold intents.
    let dev = Device::Cpu;
    let dir = fixture_dir("tagger-intent-tiny");
    let r = Reference::load(&dir, &dev);
    let (x, gold) = (r.input(), r.rows("paths"));
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let mut cfg = TaggerConfig::encoder(12, 8, 7);
    cfg.num_intents = Some(3);
    let model = BiLstmCrf::new(vb, &cfg, tag_set(7)).unwrap().with_intents(vec!["a".into(), "b".into(), "c".into()]).unwrap();
    assert!(BiLstmCrf::new(VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev), &cfg, tag_set(7))
        .unwrap()
        .with_intents(vec!["a".into()])
        .is_err());
    let intents = [2u32, 0, 1, 2];
    let mut opt = AdamW::new(varmap.all_vars(), ParamsAdamW { lr: 0.05, ..ParamsAdamW::default() }).unwrap();
    let loss = |m: &BiLstmCrf| m.joint_loss(&x, &gold, &intents, 1.0, false).unwrap().to_scalar::<f32>().unwrap();
    let before = loss(&model);
    for _ in 0..60 {
        opt.backward_step(&model.joint_loss(&x, &gold, &intents, 1.0, true).unwrap()).unwrap();
    }
    let after = loss(&model);
    assert!(after < 0.2 * before, "joint loss {before} -> {after}");
    let best = model.intent_probs(&x, &r.lengths).unwrap().unwrap().argmax(1).unwrap().to_vec1::<u32>().unwrap();
    assert_eq!(best, intents);
}

/// A character tagger fixture whose `reference.json` holds texts and their per-character ids:
/// the reference ids give the reference emissions and Viterbi paths, `char_ids` makes exactly
/// those ids from the texts (`pad` at each padding position), and they decode to the same paths.
fn check_char_fixture(what: &str, model: &BiLstmCrf, dir: &Path, r: &Reference, dev: &Device, pad: &[i64]) {
    let (x, lengths) = (r.input(), r.lengths.clone());
    check_close(&format!("{what} emissions"), &model.forward_emissions(&x, &lengths).unwrap(), &r.t["emissions"]);
    let paths: Vec<Vec<u32>> = model.decode(&x, &lengths).unwrap().into_iter().map(|p| p.tags).collect();
    assert_eq!(paths, r.rows("paths"), "{what} viterbi paths");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let texts: Vec<&str> = json["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let (ids, lens) = model.char_ids(&texts, dev).unwrap();
    assert_eq!(lens, lengths);
    let again: Vec<Vec<u32>> = model.decode(&ids, &lens).unwrap().into_iter().map(|p| p.tags).collect();
    assert_eq!(again, r.rows("paths"), "{what}: the texts through char_ids");
    let ids = ids.to_dtype(DType::I64).unwrap().to_vec3::<i64>().unwrap();
    for (s, want) in json["ids"].as_array().unwrap().iter().enumerate() {
        let want: Vec<Vec<i64>> = serde_json::from_value(want.clone()).unwrap();
        assert_eq!(ids[s][..lens[s]], want[..], "{what}: text {s}");
        assert!(ids[s][lens[s]..].iter().all(|p| p == pad), "{what}: padding of text {s}: {:?}", &ids[s][lens[s]..]);
    }
}

/// Saves `model`, reloads it (`check` sees the reloaded model and the folder) to the reference
/// emissions, then removes `file` from the folder: the load must fail naming it.
fn check_round_trip_needs(file: &str, model: &BiLstmCrf, r: &Reference, dev: &Device, check: impl Fn(&BiLstmCrf, &Path)) {
    let out_dir = tmp_dir(file);
    model.save(&out_dir).unwrap();
    let again = BiLstmCrf::load(&out_dir, dev, DType::F32).unwrap();
    check(&again, &out_dir);
    check_close(&format!("emissions reloaded ({file})"), &again.forward_emissions(&r.input(), &r.lengths).unwrap(), &r.t["emissions"]);
    std::fs::remove_file(out_dir.join(file)).unwrap();
    let err = BiLstmCrf::load(&out_dir, dev, DType::F32).unwrap_err().to_string();
    assert!(err.contains(file), "{err}");
    let _ = std::fs::remove_dir_all(&out_dir);
}

/// Character bigrams (`bigram_vocab_size`, `bigram_dim`): emissions and Viterbi paths against
/// scripts/make_tagger_bigram_fixture.py (NumPy in float64, its BiLSTM first checked against
/// tagger-chars-tiny's PyTorch reference), packed and unpacked; `char_ids` gives the reference's
/// character and bigram ids for its texts; the round trip keeps `bigrams.json`.
#[test]
fn a_character_bigram_tagger_matches_its_reference() {
    for dev in devices() {
        let dir = fixture_dir("tagger-bigram-tiny");
        let model = BiLstmCrf::load(&dir, &dev, DType::F32).unwrap();
        assert_eq!((model.config().bigram_vocab_size, model.config().bigram_dim), (Some(22), Some(4)));
        assert_eq!(model.config().lstm_input_dim(), 18);
        let r = Reference::load(&dir, &dev);
        let (x, lengths) = (r.input(), r.lengths.clone());
        assert_eq!(x.dims(), &[5, 7, 3]);
        check_char_fixture("bigram", &model, &dir, &r, &dev, &[1, 0, 0]);
        let path = dir.join("model.safetensors");
        // SAFETY: a read-only map of a fixture file.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &dev) }.unwrap();
        let built = BiLstmCrf::new(vb, model.config(), model.tags().to_vec()).unwrap();
        check_close("bigram emissions, unpacked", &built.forward_emissions(&x, &lengths).unwrap(), &r.t["emissions"]);
        // Character ids alone are refused, saying what it takes.
        let err = model.forward_emissions(&x.narrow(2, 0, 1).unwrap().squeeze(2).unwrap(), &lengths).unwrap_err().to_string();
        assert!(err.contains("[batch, length, 3]"), "{err}");

        check_round_trip_needs("bigrams.json", &model, &r, &dev, |again, _| assert_eq!(again.bigrams(), model.bigrams()));
    }
    // A bigram table needs both fields, positive, and embeddings input.
    let mut cfg = TaggerConfig::encoder(12, 8, 7);
    cfg.bigram_vocab_size = Some(10);
    cfg.bigram_dim = Some(4);
    let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
    assert!(BiLstmCrf::new(vb, &cfg, tag_set(7)).is_err());
}

#[test]
fn a_lexicon_feature_tagger_matches_its_reference() {
    for dev in devices() {
        let dir = fixture_dir("tagger-lexicon-tiny");
        let model = BiLstmCrf::load(&dir, &dev, DType::F32).unwrap();
        assert_eq!(model.config().lexicon_classes.as_deref(), Some(&["word".to_string(), "org".to_string()][..]));
        assert_eq!((model.config().lstm_input_dim(), model.config().id_columns()), (24, 5));
        assert_eq!(model.lexicon().unwrap().len(), 10);
        let r = Reference::load(&dir, &dev);
        let (x, lengths) = (r.input(), r.lengths.clone());
        assert_eq!(x.dims(), &[5, 7, 5]);
        // The matcher's ids agree with the script's own.
        check_char_fixture("lexicon", &model, &dir, &r, &dev, &[1, 0, 0, 0, 8]);
        // Without the lexicon columns the input is refused, saying what it takes.
        let err = model.forward_emissions(&x.narrow(2, 0, 3).unwrap(), &lengths).unwrap_err().to_string();
        assert!(err.contains("[batch, length, 5]"), "{err}");

        check_round_trip_needs("lexicon.txt", &model, &r, &dev, |again, out_dir| {
            assert_eq!(std::fs::read(out_dir.join("lexicon.txt")).unwrap(), std::fs::read(dir.join("lexicon.txt")).unwrap());
            assert_eq!(again.lexicon(), model.lexicon());
        });
    }
    // Lexicon features need both fields and embeddings input.
    let mut cfg = TaggerConfig::encoder(12, 8, 7);
    cfg.lexicon_classes = Some(vec!["word".into()]);
    cfg.lexicon_dim = Some(4);
    let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
    assert!(BiLstmCrf::new(vb, &cfg, tag_set(7)).is_err());
}

/// Word-vector lexicon features (`soft_lexicon`): the B/M/E set features, emissions and Viterbi
/// paths against scripts/make_tagger_soft_lexicon_fixture.py (NumPy in float64); `char_ids`
/// gives the script's own set ids for its texts (the heaviest two a set, ties to the lower id);
/// the round trip keeps `soft_lexicon.txt` and the vectors.
#[test]
fn a_soft_lexicon_tagger_matches_its_reference() {
    for dev in devices() {
        let dir = fixture_dir("tagger-soft-lexicon-tiny");
        let model = BiLstmCrf::load(&dir, &dev, DType::F32).unwrap();
        assert_eq!((model.config().lstm_input_dim(), model.config().id_columns()), (30, 9));
        let soft = model.soft_lexicon().expect("the soft lexicon");
        assert_eq!((soft.len(), soft.config().dim, soft.config().per_set), (12, 4, 2));
        let r = Reference::load(&dir, &dev);
        let (x, lengths) = (r.input(), r.lengths.clone());
        assert_eq!(x.dims(), &[5, 7, 9]);
        let set_ids = x.narrow(2, 3, 6).unwrap().contiguous().unwrap();
        check_close("soft lexicon features", &soft.features(&set_ids, DType::F32).unwrap(), &r.t["features"]);
        check_char_fixture("soft lexicon", &model, &dir, &r, &dev, &[1, 0, 0, 0, 0, 0, 0, 0, 0]);
        // Without the word ids the input is refused, saying what it takes.
        let err = model.forward_emissions(&x.narrow(2, 0, 3).unwrap(), &lengths).unwrap_err().to_string();
        assert!(err.contains("[batch, length, 9]"), "{err}");

        check_round_trip_needs("soft_lexicon.txt", &model, &r, &dev, |again, out_dir| {
            assert_eq!(std::fs::read(out_dir.join("soft_lexicon.txt")).unwrap(), std::fs::read(dir.join("soft_lexicon.txt")).unwrap());
            assert_eq!(again.soft_lexicon(), model.soft_lexicon());
            check_close("soft lexicon vectors", again.soft_lexicon().unwrap().table(), model.soft_lexicon().unwrap().table());
        });
    }
    // A soft lexicon needs embeddings input.
    let mut cfg = TaggerConfig::encoder(12, 8, 7);
    cfg.soft_lexicon = Some(concierge_models::tagger::SoftLexiconConfig { words: 5, dim: 4, per_set: 2 });
    let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
    assert!(BiLstmCrf::new(vb, &cfg, tag_set(7)).is_err());
}

/// LAC features (`lac`): LAC's BiGRU features, emissions and Viterbi paths against
/// scripts/make_tagger_lac_fixture.py (NumPy in float64: Paddle's GRU in its weight layout, each
/// sequence's reverse pass from its own end); `char_ids` gives LAC's ids (its `OOV` for the
/// characters it lacks); the round trip keeps `lac_vocab.json` and the `lac.*` tensors.
#[test]
fn a_lac_feature_tagger_matches_its_reference() {
    for dev in devices() {
        let dir = fixture_dir("tagger-lac-tiny");
        let model = BiLstmCrf::load(&dir, &dev, DType::F32).unwrap();
        assert_eq!((model.config().lstm_input_dim(), model.config().id_columns()), (34, 4));
        let lac = model.lac().expect("the LAC network");
        assert_eq!((lac.config().feature_dim(), lac.vocab().len(), lac.vocab().unk_id()), (16, 14, 13));
        let r = Reference::load(&dir, &dev);
        let (x, lengths) = (r.input(), r.lengths.clone());
        assert_eq!(x.dims(), &[5, 7, 4]);
        let ids = x.narrow(2, 3, 1).unwrap().squeeze(2).unwrap().contiguous().unwrap();
        check_close("LAC features", &lac.features(&ids, &lengths, DType::F32).unwrap(), &r.t["lac_features"]);
        // The CPU's plain-loop recurrence and candle's tensor ops agree (on a GPU both are ops).
        let ops = lac.clone().with_cpu_loops(false);
        check_close("LAC features through tensor ops", &ops.features(&ids, &lengths, DType::F32).unwrap(), &r.t["lac_features"]);
        // 欢迎你: no LAC row, so OOV (13); padding is OOV too.
        check_char_fixture("lac", &model, &dir, &r, &dev, &[1, 0, 0, 13]);
        let err = model.forward_emissions(&x.narrow(2, 0, 3).unwrap(), &lengths).unwrap_err().to_string();
        assert!(err.contains("[batch, length, 4]"), "{err}");

        check_round_trip_needs("lac_vocab.json", &model, &r, &dev, |again, _| {
            assert_eq!(again.lac().unwrap().vocab(), lac.vocab());
            assert_eq!(again.lac().unwrap().tensors().len(), lac.tensors().len());
        });
    }
    // LAC features are for embeddings input, with layers it has.
    let mut cfg = TaggerConfig::encoder(12, 8, 7);
    cfg.lac = Some(concierge_models::tagger::LacConfig::small(vec![1]));
    let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
    assert!(BiLstmCrf::new(vb, &cfg, tag_set(7)).is_err());
    let mut cfg = TaggerConfig::embeddings(10, 4, 8, 7);
    cfg.lac = Some(concierge_models::tagger::LacConfig::small(vec![3]));
    let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
    let err = BiLstmCrf::new(vb, &cfg, tag_set(7)).unwrap_err().to_string();
    assert!(err.contains("layers 1..=2"), "{err}");
}

#[test]
fn character_embedding_tagger_matches_pytorch() {
    for dev in devices() {
        let model = check_parity("tagger-chars-tiny", &dev);
        // Found under `fc` by the fallback names; the unknown config field is kept.
        assert_eq!((model.config().emission_name.as_deref(), model.emission_name()), (None, "fc"));
        assert_eq!(model.config().extra["scheme"], "bmes");
        // The vocabulary maps the reference texts to the reference ids, 烤鸭 to <unk>.
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture_dir("tagger-chars-tiny/reference.json")).unwrap())
                .unwrap();
        let texts: Vec<&str> = json["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        let want: Vec<Vec<u32>> = serde_json::from_value(json["ids"].clone()).unwrap();
        let (ids, lengths) = model.char_ids(&texts, &dev).unwrap();
        let got = ids.to_vec2::<u32>().unwrap();
        for ((row, n), want) in got.iter().zip(&lengths).zip(&want) {
            assert_eq!(&row[..*n], &want[..]);
        }
        let vocab = model.vocab().unwrap();
        assert_eq!((vocab.unk_id(), vocab.id("烤"), vocab.len()), (1, 1, 24));
        // Tagging text end to end gives the reference paths.
        let r = Reference::load(&fixture_dir("tagger-chars-tiny"), &dev);
        let paths: Vec<Vec<u32>> = model.decode(&ids, &lengths).unwrap().into_iter().map(|p| p.tags).collect();
        assert_eq!(paths, r.rows("paths"));
        assert_eq!(model.tag_names(&paths[0])[..2], ["M-PER", "E-PER"]);
    }
}

/// A small deterministic generator (xorshift64*), so the brute-force cases are reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-scale, scale).
    fn float(&mut self, scale: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }
    fn floats(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.float(scale)).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn random_crf(rng: &mut Rng, t: usize, dev: &Device) -> Crf {
    let trans = Tensor::from_vec(rng.floats(t * t, 2.0), (t, t), dev).unwrap();
    let start = Tensor::from_vec(rng.floats(t, 2.0), t, dev).unwrap();
    let end = Tensor::from_vec(rng.floats(t, 2.0), t, dev).unwrap();
    Crf::new(trans, start, end).unwrap()
}

/// Every tag path of length `l` over `t` tags.
fn all_paths(t: usize, l: usize) -> Vec<Vec<u32>> {
    (0..t.pow(l as u32))
        .map(|mut k| {
            (0..l)
                .map(|_| {
                    let tag = (k % t) as u32;
                    k /= t;
                    tag
                })
                .collect()
        })
        .collect()
}

/// A path's score in f64 from the CRF's parameters and one sequence's emissions `[L][T]`.
fn score(crf: &Crf, em: &[Vec<f32>], path: &[u32]) -> f64 {
    let trans = crf.transitions().to_vec2::<f32>().unwrap();
    let start = crf.start_transitions().to_vec1::<f32>().unwrap();
    let end = crf.end_transitions().to_vec1::<f32>().unwrap();
    let p = |i: usize| path[i] as usize;
    let mut s = start[p(0)] as f64 + end[p(path.len() - 1)] as f64;
    for i in 0..path.len() {
        s += em[i][p(i)] as f64;
        if i > 0 {
            s += trans[p(i - 1)][p(i)] as f64;
        }
    }
    s
}

/// Viterbi, log Z, path scores, NLL and marginals against enumeration of every path, on
/// random CRFs with 3-4 tags and padded batches of lengths 1-5.
#[test]
fn crf_equals_brute_force_enumeration() {
    for dev in devices() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut worst = [0f64; 3];
        for case in 0..40 {
            let t = 3 + case % 2;
            let crf = random_crf(&mut rng, t, &dev);
            let b = 1 + rng.below(4);
            let mut lengths: Vec<usize> = (0..b).map(|_| 1 + rng.below(5)).collect();
            if case % 3 == 0 {
                lengths[0] = 5;
            }
            let l = *lengths.iter().max().unwrap() + case % 2; // sometimes a fully padded column too
            let em_flat = rng.floats(b * l * t, 3.0);
            let em = Tensor::from_vec(em_flat.clone(), (b, l, t), &dev).unwrap();
            let decoded = crf.decode(&em, &lengths).unwrap();
            let log_z = crf.log_partition(&em, &lengths).unwrap().to_vec1::<f32>().unwrap();
            let marg = crf.marginals(&em, &lengths).unwrap().to_vec3::<f32>().unwrap();
            let gold: Vec<Vec<u32>> = lengths.iter().map(|&n| (0..n).map(|_| rng.below(t) as u32).collect()).collect();
            let gold_scores = crf.path_score(&em, &gold).unwrap().to_vec1::<f32>().unwrap();
            let nll = crf.nll_per_sequence(&em, &gold).unwrap().to_vec1::<f32>().unwrap();
            for s in 0..b {
                let n = lengths[s];
                let seq: Vec<Vec<f32>> = (0..n).map(|i| em_flat[(s * l + i) * t..(s * l + i + 1) * t].to_vec()).collect();
                let paths = all_paths(t, n);
                let scores: Vec<f64> = paths.iter().map(|p| score(&crf, &seq, p)).collect();
                let (best, best_score) =
                    scores.iter().enumerate().fold((0, f64::NEG_INFINITY), |a, (i, &v)| if v > a.1 { (i, v) } else { a });
                assert_eq!(decoded[s].tags, paths[best], "case {case} seq {s}");
                let max = best_score;
                let brute_z = max + scores.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
                let errs = [
                    (decoded[s].score as f64 - best_score).abs(),
                    (log_z[s] as f64 - brute_z).abs(),
                    (gold_scores[s] as f64 - score(&crf, &seq, &gold[s])).abs(),
                ];
                assert!(errs.iter().all(|&e| e < 1e-4), "case {case} seq {s}: {errs:?}");
                assert!((nll[s] as f64 - (brute_z - score(&crf, &seq, &gold[s]))).abs() < 1e-4);
                // Marginals: the probability mass of the paths through each (position, tag).
                for i in 0..l {
                    for (j, &got) in marg[s][i].iter().enumerate() {
                        let want: f64 = if i >= n {
                            0.0
                        } else {
                            paths.iter().zip(&scores).filter(|(p, _)| p[i] == j as u32).map(|(_, v)| (v - brute_z).exp()).sum()
                        };
                        let err = (got as f64 - want).abs();
                        worst[2] = worst[2].max(err);
                        assert!(err < 1e-5, "case {case} seq {s} marginal ({i}, {j}): {got} vs {want}");
                    }
                }
                worst[0] = worst[0].max(errs[0]);
                worst[1] = worst[1].max(errs[1]);
            }
        }
        println!("{dev:?}: max abs error viterbi score {:.1e}, log Z {:.1e}, marginals {:.1e}", worst[0], worst[1], worst[2]);
    }
}

/// Constrained decoding (`Crf::constrain`) against enumeration of the paths the scheme allows,
/// a path being allowed when it is the canonical tagging of its own chunks (`spans` then
/// `tags_of` gives it back: an independent reading of BIO, BIOES and BMES). On random CRFs over
/// tag sets of each scheme, padded batches of lengths 1-4: Viterbi (kernel and tensor ops) finds
/// the best allowed path with its unpenalised score, the marginals are the allowed paths' mass
/// (forbidden tags get none), and the likelihood is still over every path.
#[test]
fn constrained_crf_equals_brute_force_over_allowed_paths() {
    use concierge_models::sequence::{scheme_of, spans, tags_of};
    let sets: [&[&str]; 3] = [
        &["O", "B-A", "I-A", "B-B", "I-B"],
        &["O", "B-A", "I-A", "E-A", "S-A"],
        &["B-A", "M-A", "E-A", "S-A", "O"],
    ];
    for dev in devices() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for case in 0..30 {
            let names: Vec<String> = sets[case % 3].iter().map(|t| t.to_string()).collect();
            let scheme = scheme_of(&names).unwrap();
            let t = names.len();
            let free = random_crf(&mut rng, t, &dev);
            let mut crf = free.clone();
            assert!(!crf.is_constrained());
            crf.constrain(&names).unwrap();
            assert!(crf.is_constrained());
            let b = 1 + rng.below(3);
            let lengths: Vec<usize> = (0..b).map(|_| 1 + rng.below(4)).collect();
            let l = *lengths.iter().max().unwrap() + case % 2;
            let em_flat = rng.floats(b * l * t, 3.0);
            let em = Tensor::from_vec(em_flat.clone(), (b, l, t), &dev).unwrap();
            let decoded = crf.decode(&em, &lengths).unwrap();
            let by_ops = crf.decode_tensor_ops(&em, &lengths).unwrap();
            let marg = crf.marginals(&em, &lengths).unwrap().to_vec3::<f32>().unwrap();
            let log_z = crf.log_partition(&em, &lengths).unwrap().to_vec1::<f32>().unwrap();
            let free_z = free.log_partition(&em, &lengths).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(log_z, free_z, "case {case}: the likelihood must stay over every path");
            for s in 0..b {
                let n = lengths[s];
                let seq: Vec<Vec<f32>> = (0..n).map(|i| em_flat[(s * l + i) * t..(s * l + i + 1) * t].to_vec()).collect();
                let allowed: Vec<Vec<u32>> = all_paths(t, n)
                    .into_iter()
                    .filter(|p| {
                        let tags: Vec<&str> = p.iter().map(|&k| names[k as usize].as_str()).collect();
                        tags_of(&spans(&tags).unwrap(), n, scheme).unwrap() == tags
                    })
                    .collect();
                let scores: Vec<f64> = allowed.iter().map(|p| score(&crf, &seq, p)).collect();
                let (best, best_score) =
                    scores.iter().enumerate().fold((0, f64::NEG_INFINITY), |a, (i, &v)| if v > a.1 { (i, v) } else { a });
                assert_eq!(decoded[s].tags, allowed[best], "case {case} seq {s} ({names:?})");
                assert_eq!(by_ops[s].tags, allowed[best], "case {case} seq {s}: tensor ops");
                assert!((decoded[s].score as f64 - best_score).abs() < 1e-4, "case {case} seq {s}: score");
                let max = best_score;
                let z = max + scores.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
                for i in 0..n {
                    for (j, &got) in marg[s][i].iter().enumerate() {
                        let want: f64 =
                            allowed.iter().zip(&scores).filter(|(p, _)| p[i] == j as u32).map(|(_, v)| (v - z).exp()).sum();
                        assert!((got as f64 - want).abs() < 1e-5, "case {case} seq {s} marginal ({i}, {j}): {got} vs {want}");
                    }
                }
            }
        }
    }
    // The rules, spelled out on BMES: M- and E- only after B- or M- of their label, nothing
    // starts inside a chunk, and no chunk is left open.
    let bmes: Vec<String> = ["O", "B-PER", "M-PER", "E-PER", "S-PER", "B-LOC"].iter().map(|t| t.to_string()).collect();
    let (steps, start, end) = concierge_models::tagger::crf::allowed_steps(&bmes).unwrap();
    let ok = |a: usize, b: usize| steps[a * bmes.len() + b];
    assert!(ok(1, 2) && ok(1, 3) && ok(2, 2) && ok(2, 3) && ok(3, 0) && ok(3, 5) && ok(4, 4) && ok(0, 1));
    assert!(!ok(0, 2) && !ok(0, 3) && !ok(5, 2) && !ok(1, 0) && !ok(1, 1) && !ok(2, 4) && !ok(3, 2));
    assert_eq!(start, [true, true, false, false, true, true]);
    assert_eq!(end, [true, false, false, true, true, false]);
    let err = Crf::new(Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(), Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(), Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap())
        .unwrap()
        .constrain(&["O".to_string(), "X-A".to_string()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("constrained decoding needs BIO, BIOES or BMES tags"), "{err}");
}

/// `Crf::decode` (the kernels crate's Viterbi on the CPU) against the tensor-op version it
/// replaced, on random CRFs of 1, 5 and 130 tags and padded batches: the same paths, scores
/// within 1e-4 relative (the two add the same numbers in the same order, so in practice equal).
#[test]
fn crf_decode_kernel_matches_tensor_ops() {
    let dev = Device::Cpu;
    let mut rng = Rng(0x0dec_0de5);
    for &(b, l, t) in &[(3usize, 1usize, 5usize), (3, 17, 5), (1, 17, 1), (3, 17, 130), (8, 30, 9), (2, 5, 2)] {
        let crf = random_crf(&mut rng, t, &dev);
        let lengths: Vec<usize> = (0..b).map(|s| if s == 0 { l } else { 1 + rng.below(l) }).collect();
        let em = Tensor::from_vec(rng.floats(b * l * t, 3.0), (b, l, t), &dev).unwrap();
        let kernel = crf.decode(&em, &lengths).unwrap();
        let ops = crf.decode_tensor_ops(&em, &lengths).unwrap();
        for (s, (k, o)) in kernel.iter().zip(&ops).enumerate() {
            assert_eq!(k.tags, o.tags, "B={b} L={l} T={t} seq {s}");
            assert!((k.score - o.score).abs() <= 1e-4 * o.score.abs().max(1.0), "seq {s}: {} vs {}", k.score, o.score);
        }
    }
    // Exact ties (all-zero parameters and emissions) go to the lowest tag on both.
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev).unwrap();
    let crf = Crf::new(zeros(&[4, 4]), zeros(&[4]), zeros(&[4])).unwrap();
    let em = zeros(&[2, 3, 4]);
    assert_eq!(crf.decode(&em, &[3, 2]).unwrap(), crf.decode_tensor_ops(&em, &[3, 2]).unwrap());
    assert_eq!(crf.decode(&em, &[3, 2]).unwrap()[0].tags, vec![0, 0, 0]);
    // Bad lengths are the same InvalidInput error as before.
    assert!(matches!(crf.decode(&em, &[4, 1]), Err(ModelError::InvalidInput(_))));
    assert!(matches!(crf.decode(&zeros(&[2, 3, 5]), &[3, 1]), Err(ModelError::InvalidInput(_))));
}

#[test]
fn crf_nll_reductions_follow_pytorch_crf() {
    let dev = Device::Cpu;
    let mut rng = Rng(7);
    let crf = random_crf(&mut rng, 4, &dev);
    let em = Tensor::from_vec(rng.floats(3 * 5 * 4, 2.0), (3, 5, 4), &dev).unwrap();
    let gold = vec![vec![0, 1, 2, 3, 0], vec![1, 1], vec![3, 2, 1]];
    let per = crf.nll_per_sequence(&em, &gold).unwrap().to_vec1::<f32>().unwrap();
    let sum: f32 = per.iter().sum();
    let get = |r| crf.nll(&em, &gold, r).unwrap().to_scalar::<f32>().unwrap();
    assert!((get(Reduction::Sum) - sum).abs() < 1e-5);
    assert!((get(Reduction::Mean) - sum / 3.0).abs() < 1e-5);
    assert!((get(Reduction::TokenMean) - sum / 10.0).abs() < 1e-5);
    assert!(per.iter().all(|&v| v >= 0.0), "{per:?}");
}

/// Padded batches give each sequence what it gets alone, whatever the padding holds: the CRF
/// on emissions, and the whole model (the backward LSTM must start at each sequence's end).
#[test]
fn a_padded_batch_equals_each_sequence_alone() {
    for dev in devices() {
        for name in ["tagger-tiny", "tagger-chars-tiny"] {
            let model = BiLstmCrf::load(&fixture_dir(name), &dev, DType::F32).unwrap();
            let r = Reference::load(&fixture_dir(name), &dev);
            let x = r.input();
            let emissions = model.forward_emissions(&x, &r.lengths).unwrap();
            let batch = model.decode(&x, &r.lengths).unwrap();
            let batch_z = model.crf().log_partition(&emissions, &r.lengths).unwrap().to_vec1::<f32>().unwrap();
            let batch_m = model.marginals(&x, &r.lengths).unwrap();
            for (s, &n) in r.lengths.iter().enumerate() {
                let alone_x = x.narrow(0, s, 1).unwrap().narrow(1, 0, n).unwrap();
                let alone_em = model.forward_emissions(&alone_x, &[n]).unwrap();
                let in_batch = emissions.narrow(0, s, 1).unwrap().narrow(1, 0, n).unwrap();
                let err = (&alone_em - &in_batch).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(err < 1e-5, "{name} seq {s}: emissions alone vs in the batch differ by {err}");
                let alone: Vec<TagPath> = model.decode(&alone_x, &[n]).unwrap();
                assert_eq!(alone[0].tags, batch[s].tags, "{name} seq {s}");
                assert!((alone[0].score - batch[s].score).abs() < 1e-4);
                let z = model.crf().log_partition(&alone_em, &[n]).unwrap().to_vec1::<f32>().unwrap()[0];
                assert!((z - batch_z[s]).abs() < 1e-4, "{name} seq {s}: {z} vs {}", batch_z[s]);
                let m = model.marginals(&alone_x, &[n]).unwrap();
                let mb = batch_m.narrow(0, s, 1).unwrap().narrow(1, 0, n).unwrap();
                let err = (&m - &mb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(err < 1e-5, "{name} seq {s}: marginals differ by {err}");
            }
            // Changing what the padding holds changes nothing real.
            let noisy = match model.config().input {
                InputKind::Encoder => (x.clone() + 5.0).unwrap(),
                InputKind::Embeddings => Tensor::full(3u32, x.shape(), &dev).unwrap(),
            };
            let mask = concierge_mask(&r.lengths, x.dim(1).unwrap(), &dev, x.rank());
            let mixed = if x.rank() == 3 {
                (x.broadcast_mul(&mask).unwrap() + noisy.broadcast_mul(&(1.0 - &mask).unwrap()).unwrap()).unwrap()
            } else {
                let m = mask.to_dtype(DType::U8).unwrap();
                m.where_cond(&x, &noisy).unwrap()
            };
            let again = model.decode(&mixed, &r.lengths).unwrap();
            assert_eq!(again, batch, "{name}: padding contents changed the result");
        }
    }
}

/// `[B, L]` (or `[B, L, 1]` for features) 0/1 f32 mask of the lengths.
fn concierge_mask(lengths: &[usize], l: usize, dev: &Device, rank: usize) -> Tensor {
    let v: Vec<f32> = lengths.iter().flat_map(|&n| (0..l).map(move |t| if t < n { 1.0 } else { 0.0 })).collect();
    let m = Tensor::from_vec(v, (lengths.len(), l), dev).unwrap();
    if rank == 3 {
        m.unsqueeze(2).unwrap()
    } else {
        m
    }
}

fn tag_set(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("T{i}")).collect()
}

/// A toy task only the context can solve: the tag of a token is 1 + the sign pattern of its
/// own and its left neighbour's first feature (4 cases), tag 0 at the start. A fresh model
/// trained with AdamW on it lowers its loss, and every parameter gets a gradient.
#[test]
fn the_nll_trains_the_whole_model_with_adamw() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let mut cfg = TaggerConfig::encoder(4, 8, 5);
    cfg.num_layers = 2;
    cfg.dropout = 0.1;
    let model = BiLstmCrf::new(vb, &cfg, tag_set(5)).unwrap();
    let vars = varmap.all_vars();
    // lstm: 2 layers x 2 directions x 4 tensors; emission weight + bias; the crf's 3.
    assert_eq!(vars.len(), 16 + 2 + 3);

    let mut rng = Rng(11);
    let lengths = [6usize, 3, 5, 1, 6, 4, 2, 6];
    let (b, l) = (lengths.len(), 6);
    let x = rng.floats(b * l * 4, 1.0);
    let gold: Vec<Vec<u32>> = lengths
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            let f = |i: usize| x[(s * l + i) * 4] > 0.0;
            (0..n).map(|i| if i == 0 { 0 } else { 1 + 2 * f(i) as u32 + f(i - 1) as u32 }).collect()
        })
        .collect();
    let x = Tensor::from_vec(x, (b, l, 4), &dev).unwrap();

    let grads = model.training_loss(&x, &gold, Reduction::Mean).unwrap().backward().unwrap();
    let no_grad: Vec<&Var> = vars.iter().filter(|v| grads.get(v.as_tensor()).is_none()).collect();
    assert!(no_grad.is_empty(), "{} parameters got no gradient", no_grad.len());

    let mut opt = AdamW::new(vars, ParamsAdamW { lr: 0.03, weight_decay: 0.0, ..Default::default() }).unwrap();
    let loss = |m: &BiLstmCrf| m.nll(&x, &gold, Reduction::Mean).unwrap().to_scalar::<f32>().unwrap();
    let first = loss(&model);
    for _ in 0..60 {
        opt.backward_step(&model.training_loss(&x, &gold, Reduction::Mean).unwrap()).unwrap();
    }
    let last = loss(&model);
    println!("toy task nll: {first:.3} -> {last:.3}");
    assert!(last < 0.3 * first, "the loss went from {first} to only {last}");
    let lengths: Vec<usize> = gold.iter().map(Vec::len).collect();
    let right: usize = model
        .decode(&x, &lengths)
        .unwrap()
        .iter()
        .zip(&gold)
        .map(|(p, g)| p.tags.iter().zip(g).filter(|(a, b)| a == b).count())
        .sum();
    let total: usize = lengths.iter().sum();
    assert!(right * 10 >= total * 9, "{right} of {total} tags right after training");
}

/// save writes what load reads: same config, tags, vocabulary and outputs; a fresh model too.
#[test]
fn save_and_load_round_trip() {
    let dev = Device::Cpu;
    for name in ["tagger-tiny", "tagger-chars-tiny"] {
        let model = BiLstmCrf::load(&fixture_dir(name), &dev, DType::F32).unwrap();
        let out = tmp_dir(name);
        model.save(&out).unwrap();
        let again = BiLstmCrf::load(&out, &dev, DType::F32).unwrap();
        assert_eq!(again.config(), model.config());
        assert_eq!(again.tags(), model.tags());
        assert_eq!(again.vocab(), model.vocab());
        let r = Reference::load(&fixture_dir(name), &dev);
        let a = model.forward_emissions(&r.input(), &r.lengths).unwrap();
        let b = again.forward_emissions(&r.input(), &r.lengths).unwrap();
        assert_eq!(floats(&a), floats(&b), "{name}");
        // The same tensor names as the PyTorch checkpoint.
        let mut want: Vec<String> = candle_core::safetensors::load(fixture_dir(name).join("model.safetensors"), &dev)
            .unwrap()
            .into_keys()
            .collect();
        let mut got: Vec<String> =
            candle_core::safetensors::load(out.join("model.safetensors"), &dev).unwrap().into_keys().collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{name}");
        std::fs::remove_dir_all(&out).unwrap();
    }

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let cfg = TaggerConfig::embeddings(30, 6, 5, 3);
    let vocab = concierge_models::tagger::Vocab::new(
        [("<unk>", 0), ("a", 1), ("b", 2), ("中", 29)].into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        "<unk>",
    )
    .unwrap();
    let model = BiLstmCrf::new(vb, &cfg, tag_set(3)).unwrap().with_vocab(vocab).unwrap();
    let out = tmp_dir("fresh");
    model.save(&out).unwrap();
    let again = BiLstmCrf::load(&out, &dev, DType::F32).unwrap();
    let (ids, lengths) = again.char_ids(&["ab中x", "b"], &dev).unwrap();
    assert_eq!(ids.to_vec2::<u32>().unwrap(), [[1, 2, 29, 0], [2, 0, 0, 0]]);
    // Same paths; scores to rounding (the loaded model packs its LSTM input products).
    let (a, b) = (again.decode(&ids, &lengths).unwrap(), model.decode(&ids, &lengths).unwrap());
    assert_eq!(a.iter().map(|p| &p.tags).collect::<Vec<_>>(), b.iter().map(|p| &p.tags).collect::<Vec<_>>());
    assert!(a.iter().zip(&b).all(|(x, y)| (x.score - y.score).abs() <= 1e-5), "{a:?} vs {b:?}");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["input"], "embeddings");
    assert!(config.get("emission_name").is_none());
    std::fs::remove_dir_all(&out).unwrap();
}

/// The same model in bf16 decodes as in f32 (the CRF runs in f32 either way).
#[test]
fn a_half_precision_model_runs_its_crf_in_f32() {
    let dev = Device::Cpu;
    let dir = fixture_dir("tagger-chars-tiny");
    let model = BiLstmCrf::load(&dir, &dev, DType::BF16).unwrap();
    let r = Reference::load(&dir, &dev);
    let em = model.forward_emissions(&r.input(), &r.lengths).unwrap();
    assert_eq!(em.dtype(), DType::BF16);
    assert_eq!(model.crf().log_partition(&em, &r.lengths).unwrap().dtype(), DType::F32);
    let m = model.marginals(&r.input(), &r.lengths).unwrap();
    let sums = m.sum(2).unwrap().to_vec2::<f32>().unwrap();
    for (row, &n) in sums.iter().zip(&r.lengths) {
        assert!(row[..n].iter().all(|s| (s - 1.0).abs() < 1e-5) && row[n..].iter().all(|&s| s == 0.0), "{row:?}");
    }
}

fn copy_fixture(name: &str, tag: &str) -> PathBuf {
    let out = tmp_dir(tag);
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(fixture_dir(name)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, out.join(p.file_name().unwrap())).unwrap();
    }
    out
}

#[test]
fn checkpoint_errors_name_the_file_and_tensor() {
    let dev = Device::Cpu;
    let dir = copy_fixture("tagger-tiny", "errors");
    std::fs::remove_file(dir.join("tags.json")).unwrap();
    let err = BiLstmCrf::load(&dir, &dev, DType::F32).unwrap_err();
    assert!(matches!(&err, ModelError::MissingFile { path, .. } if path.ends_with("tags.json")), "{err}");

    std::fs::write(dir.join("tags.json"), r#"["O", "B-PER"]"#).unwrap();
    let err = BiLstmCrf::load(&dir, &dev, DType::F32).unwrap_err().to_string();
    assert!(err.contains("tags.json") && err.contains("has 2 tags") && err.contains("num_tags 7"), "{err}");

    std::fs::write(dir.join("tags.json"), r#"["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "O"]"#).unwrap();
    let err = BiLstmCrf::load(&dir, &dev, DType::F32).unwrap_err().to_string();
    assert!(err.contains("tags.json") && err.contains("\"O\" appears twice"), "{err}");
    std::fs::copy(fixture_dir("tagger-tiny/tags.json"), dir.join("tags.json")).unwrap();

    let mut ts = candle_core::safetensors::load(dir.join("model.safetensors"), &dev).unwrap();
    ts.remove("lstm.weight_hh_l1_reverse");
    candle_core::safetensors::save(&ts, dir.join("model.safetensors")).unwrap();
    let err = BiLstmCrf::load(&dir, &dev, DType::F32).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("lstm.weight_hh_l1_reverse"), "{err}");

    let cfg = r#"{"input": "embeddings", "input_dim": 12, "hidden_size": 8, "num_tags": 7}"#;
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let err = BiLstmCrf::load(&dir, &dev, DType::F32).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("vocab_size"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_inputs_are_refused_clearly() {
    let dev = Device::Cpu;
    let model = BiLstmCrf::load(&fixture_dir("tagger-tiny"), &dev, DType::F32).unwrap();
    let x = Tensor::zeros((2, 4, 12), DType::F32, &dev).unwrap();
    for lengths in [&[4usize, 0][..], &[5, 1], &[1]] {
        let err = model.decode(&x, lengths).unwrap_err();
        assert!(matches!(err, ModelError::InvalidInput(_)), "{lengths:?}: {err}");
    }
    let err = model.decode(&Tensor::zeros((2, 4, 10), DType::F32, &dev).unwrap(), &[4, 4]).unwrap_err();
    assert!(err.to_string().contains("features [batch, length, 12]"), "{err}");
    let err = model.nll(&x, &[vec![0, 1, 2, 7], vec![0]], Reduction::Mean).unwrap_err();
    assert!(err.to_string().contains("tag id 7"), "{err}");
    let err = model.char_ids(&["abc"], &dev).unwrap_err();
    assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
}

#[test]
fn a_minimal_config_takes_the_defaults() {
    let cfg: TaggerConfig =
        serde_json::from_str(r#"{"input": "encoder", "input_dim": 384, "hidden_size": 128, "num_tags": 9}"#).unwrap();
    assert_eq!(cfg, TaggerConfig::encoder(384, 128, 9));
    assert_eq!((cfg.num_layers, cfg.dropout, cfg.unk_token()), (1, 0.0, "<unk>"));
}

/// The committed Chinese tagger (`checkpoints/entities-zh-msra`, trained by
/// scripts/train-msra.sh) tags a person, a place and an organisation in sentences that are not
/// in MSRA as their whole spans.
#[test]
fn the_committed_chinese_tagger_finds_people_places_and_organisations() {
    tags_people_places_and_organisations("entities-zh-msra");
}

/// The committed Chinese ensemble (`checkpoints/entities-zh-msra-ensemble`: six character
/// taggers, scripts/train-msra-ensemble.sh) loads as one tagger and tags the same sentences as
/// their whole spans.
#[test]
fn the_committed_chinese_ensemble_finds_people_places_and_organisations() {
    tags_people_places_and_organisations("entities-zh-msra-ensemble");
}

/// The committed checkpoint `name` tags the person, places and organisations of three
/// sentences that are not in MSRA as their whole spans.
fn tags_people_places_and_organisations(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../checkpoints").join(name);
    let model = BiLstmCrf::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let texts = ["我明天要去上海出差。", "她毕业于北京大学，现在在联合国工作。", "邓小平是四川人。"];
    let (ids, lens) = model.char_ids(&texts, &Device::Cpu).unwrap();
    let paths = model.decode(&ids, &lens).unwrap();
    let tagged: Vec<String> = texts
        .iter()
        .zip(&paths)
        .map(|(t, p)| t.chars().zip(model.tag_names(&p.tags)).map(|(c, tag)| format!("{c}/{tag}")).collect::<Vec<_>>().join(" "))
        .collect();
    let has = |s: usize, span: &str| tagged[s].contains(span);
    assert!(has(0, "上/B-LOC 海/E-LOC"), "{}", tagged[0]);
    assert!(has(1, "北/B-ORG 京/M-ORG 大/M-ORG 学/E-ORG"), "{}", tagged[1]);
    assert!(has(1, "联/B-ORG 合/M-ORG 国/E-ORG"), "{}", tagged[1]);
    assert!(has(2, "邓/B-PER 小/M-PER 平/E-PER") && has(2, "四/B-LOC 川/E-LOC"), "{}", tagged[2]);
}

const CRF_NAMES: [&str; 3] = ["crf.transitions", "crf.start_transitions", "crf.end_transitions"];

/// `m` saved and loaded again with its tensors `names` (each must be there) redrawn from N(0, 1).
/// Each call has its own folder: tests running at once in this process call it too.
fn reloaded_with_random(m: &BiLstmCrf, names: &[&str]) -> BiLstmCrf {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dev = Device::Cpu;
    let out = tmp_dir(&format!("member-{}", CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    m.save(&out).unwrap();
    let mut ts = candle_core::safetensors::load(out.join("model.safetensors"), &dev).unwrap();
    for &name in names {
        let x = ts.get(name).unwrap_or_else(|| panic!("no {name} in the saved member")).clone();
        ts.insert(name.into(), x.randn_like(0.0, 1.0).unwrap());
    }
    candle_core::safetensors::save(&ts, out.join("model.safetensors")).unwrap();
    let m = BiLstmCrf::load(&out, &dev, DType::F32).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    m
}

/// The members' tensors as an ensemble checkpoint names them, `members.{k}.*`.
fn as_members(members: &[BiLstmCrf]) -> HashMap<String, Tensor> {
    let mut tensors = HashMap::new();
    for (k, m) in members.iter().enumerate() {
        for (name, x) in m.named_tensors() {
            tensors.insert(format!("members.{k}.{name}"), x.clone());
        }
    }
    tensors
}

/// An ensemble (`TaggerConfig::ensemble`) of three random members saved apart and assembled
/// under `members.{k}.`: its emissions are the mean of theirs, its CRF the mean of theirs, and
/// its Viterbi path is the one whose mean member score (each member's own CRF and emissions) is
/// highest, found by enumerating every path; the path score is that mean. An ensemble round-trips
/// through save/load; bad ensemble configs and a missing member are refused clearly.
#[test]
fn an_ensemble_tags_by_the_mean_of_its_members_path_scores() {
    let dev = Device::Cpu;
    let (d, t) = (6usize, 3usize);
    let mut cfg = TaggerConfig::encoder(d, 4, t);
    cfg.num_intents = Some(2);
    let intents = vec!["ask".to_string(), "book".to_string()];
    let members: Vec<BiLstmCrf> = (0..3)
        .map(|_| {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
            let m = BiLstmCrf::new(vb, &cfg, tag_set(t)).unwrap().with_intents(intents.clone()).unwrap();
            // Random CRFs (pytorch-crf's init is small): members disagree about transitions too.
            reloaded_with_random(&m, &CRF_NAMES)
        })
        .collect();
    let tensors = as_members(&members);
    let mut ecfg = cfg.clone();
    ecfg.ensemble = Some(3);
    let built = BiLstmCrf::new(VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev), &ecfg, tag_set(t))
        .unwrap()
        .with_intents(intents.clone())
        .unwrap();
    let out = tmp_dir("ensemble");
    built.save(&out).unwrap();
    let ens = BiLstmCrf::load(&out, &dev, DType::F32).unwrap();
    assert_eq!(ens.num_members(), 3);
    assert_eq!(ens.config(), &ecfg);
    let mut names: Vec<String> = candle_core::safetensors::load(out.join("model.safetensors"), &dev).unwrap().into_keys().collect();
    names.sort();
    let mut want: Vec<String> = tensors.keys().cloned().collect();
    want.sort();
    assert_eq!(names, want, "each member under members.{{k}}., its own CRF included");
    assert!(names.contains(&"members.2.lstm.weight_ih_l0_reverse".to_string()));

    let mut rng = Rng(0x5eed_0e5e);
    let lengths = vec![4usize, 2, 3];
    let x = Tensor::from_vec(rng.floats(3 * 4 * d, 1.5), (3, 4, d), &dev).unwrap();
    let per: Vec<Tensor> = members.iter().map(|m| m.forward_emissions(&x, &lengths).unwrap()).collect();
    let mean = (Tensor::stack(&per, 0).unwrap().sum(0).unwrap() / 3.0).unwrap();
    check_close("ensemble emissions", &ens.forward_emissions(&x, &lengths).unwrap(), &mean);
    let crfs: Vec<Tensor> = members.iter().map(|m| m.crf().transitions().clone()).collect();
    let mean_t = (Tensor::stack(&crfs, 0).unwrap().sum(0).unwrap() / 3.0).unwrap();
    check_close("ensemble transitions", ens.crf().transitions(), &mean_t);
    let probs = ens.intent_probs(&x, &lengths).unwrap().unwrap();
    assert_eq!(probs.dims(), [3, 2]);

    let paths = ens.decode(&x, &lengths).unwrap();
    for (b, &len) in lengths.iter().enumerate() {
        let ems: Vec<Vec<Vec<f32>>> =
            per.iter().map(|e| e.get(b).unwrap().narrow(0, 0, len).unwrap().to_vec2::<f32>().unwrap()).collect();
        let mean_score = |p: &[u32]| members.iter().zip(&ems).map(|(m, em)| score(m.crf(), em, p)).sum::<f64>() / 3.0;
        let best = all_paths(t, len).into_iter().max_by(|a, b| mean_score(a).total_cmp(&mean_score(b))).unwrap();
        assert_eq!(paths[b].tags, best, "sequence {b}");
        assert!((paths[b].score as f64 - mean_score(&best)).abs() < 1e-4, "{} vs {}", paths[b].score, mean_score(&best));
    }
    let marg = ens.marginals(&x, &lengths).unwrap().sum(2).unwrap().to_vec2::<f32>().unwrap();
    assert!((marg[1][0] - 1.0).abs() < 1e-5 && marg[1][3] == 0.0, "{marg:?}");
    // Ensembles are for inference.
    let err = ens.emissions(&x, &lengths, true).unwrap_err().to_string();
    assert!(err.contains("ensemble-tagger"), "{err}");

    // A missing member, and configs that cannot be ensembles.
    let mut short = tensors.clone();
    short.retain(|k, _| !k.starts_with("members.2."));
    let err = BiLstmCrf::new(VarBuilder::from_tensors(short, DType::F32, &dev), &ecfg, tag_set(t)).unwrap_err().to_string();
    assert!(err.contains("members.2."), "{err}");
    for (n, input) in [(1, InputKind::Encoder), (65, InputKind::Embeddings)] {
        let mut bad = if input == InputKind::Embeddings { TaggerConfig::embeddings(10, d, 4, t) } else { cfg.clone() };
        bad.ensemble = Some(n);
        let varmap = VarMap::new();
        let err = BiLstmCrf::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &bad, tag_set(t)).unwrap_err().to_string();
        assert!(err.contains("ensemble must have 2 to 64 members"), "{err}");
    }
    std::fs::remove_dir_all(&out).unwrap();
}

/// An ensemble voting by marginals (`ensemble_vote: marginals`, constrained BIO tags): its
/// emissions are the log of the mean of its members' marginals (each member's own constrained
/// CRF), and its Viterbi path is the allowed path with the highest sum of those logs, found by
/// enumerating every path. The vote round-trips through config.json, and a single tagger with
/// a vote is refused.
#[test]
fn an_ensemble_voting_by_marginals_decodes_its_members_mean_marginals() {
    let dev = Device::Cpu;
    let d = 5usize;
    let tags: Vec<String> = ["O", "B-X", "I-X", "B-Y", "I-Y"].iter().map(|t| t.to_string()).collect();
    let t = tags.len();
    let mut cfg = TaggerConfig::encoder(d, 4, t);
    cfg.constrained = true;
    let members: Vec<BiLstmCrf> = (0..3)
        .map(|_| {
            let varmap = VarMap::new();
            let m = BiLstmCrf::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg, tags.clone()).unwrap();
            reloaded_with_random(&m, &[CRF_NAMES.as_slice(), &["hidden2tag.bias"]].concat())
        })
        .collect();
    let tensors = as_members(&members);
    let mut ecfg = cfg.clone();
    ecfg.ensemble = Some(3);
    ecfg.ensemble_vote = EnsembleVote::Marginals;
    let built = BiLstmCrf::new(VarBuilder::from_tensors(tensors, DType::F32, &dev), &ecfg, tags.clone()).unwrap();
    let out = tmp_dir("vote-ensemble");
    built.save(&out).unwrap();
    let written = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(written.contains("\"ensemble_vote\": \"marginals\""), "{written}");
    let ens = BiLstmCrf::load(&out, &dev, DType::F32).unwrap();
    assert_eq!(ens.config(), &ecfg);

    let mut rng = Rng(0x0b0e_5eed);
    let lengths = vec![4usize, 2, 3];
    let x = Tensor::from_vec(rng.floats(3 * 4 * d, 1.5), (3, 4, d), &dev).unwrap();
    let margs: Vec<Tensor> = members.iter().map(|m| m.marginals(&x, &lengths).unwrap()).collect();
    let mean = (Tensor::stack(&margs, 0).unwrap().sum(0).unwrap() / 3.0).unwrap();
    let log_mean = mean.maximum(1e-30).unwrap().log().unwrap();
    check_close("ensemble emissions (log mean marginals)", &ens.forward_emissions(&x, &lengths).unwrap(), &log_mean);
    // The members' marginals disagree: the vote is not any one member's.
    let spread = (&margs[0] - &margs[1]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(spread > 0.05, "members too alike to test a vote: {spread}");

    let allowed = |p: &[u32]| {
        let inside = |i: u32| tags[i as usize].starts_with("I-");
        !inside(p[0]) && p.windows(2).all(|w| !inside(w[1]) || tags[w[0] as usize].get(2..) == tags[w[1] as usize].get(2..))
    };
    let paths = ens.decode(&x, &lengths).unwrap();
    for (b, &len) in lengths.iter().enumerate() {
        let lm = log_mean.get(b).unwrap().to_vec2::<f32>().unwrap();
        let total = |p: &[u32]| p.iter().enumerate().map(|(i, &j)| lm[i][j as usize] as f64).sum::<f64>();
        let best = all_paths(t, len).into_iter().filter(|p| allowed(p)).max_by(|a, b| total(a).total_cmp(&total(b))).unwrap();
        assert_eq!(paths[b].tags, best, "sequence {b}");
        assert!((paths[b].score as f64 - total(&best)).abs() < 1e-3, "{} vs {}", paths[b].score, total(&best));
    }

    // A vote needs an ensemble.
    let mut bad = cfg.clone();
    bad.ensemble_vote = EnsembleVote::Marginals;
    let varmap = VarMap::new();
    let err = BiLstmCrf::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &bad, tags).unwrap_err().to_string();
    assert!(err.contains("ensemble_vote is for an ensemble"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}

/// A loaded f32 CPU tagger runs its LSTM recurrence in plain loops (both directions on two
/// threads); a freshly built one (variables) steps it through tensor ops. On a two-layer model
/// and a padded batch, the two give the same emissions (to f32 rounding) and zero LSTM state at
/// padding (the emission bias alone).
#[test]
fn the_cpu_lstm_loops_match_the_tensor_ops() {
    let dev = Device::Cpu;
    let mut cfg = TaggerConfig::encoder(10, 7, 5);
    cfg.num_layers = 2;
    let varmap = VarMap::new();
    let fresh = BiLstmCrf::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg, tag_set(5)).unwrap();
    let out = tmp_dir("loops");
    fresh.save(&out).unwrap();
    let loaded = BiLstmCrf::load(&out, &dev, DType::F32).unwrap();
    let mut rng = Rng(0x100f_5eed);
    let lengths = vec![6usize, 1, 4, 6];
    let x = Tensor::from_vec(rng.floats(4 * 7 * 10, 2.0), (4, 7, 10), &dev).unwrap();
    let a = fresh.forward_emissions(&x, &lengths).unwrap();
    let b = loaded.forward_emissions(&x, &lengths).unwrap();
    check_close("loops vs ops", &b, &a);
    let h = loaded.lstm().forward(&x, &lengths, false).unwrap();
    assert_eq!(h.dims(), [4, 7, 14]);
    let pad = floats(&h.get(1).unwrap().narrow(0, 1, 6).unwrap());
    assert!(pad.iter().all(|&v| v == 0.0), "padding outputs must be zero");
    std::fs::remove_dir_all(&out).unwrap();
}

/// A tiny random BERT's tensors for `char_bert`, by their `transformers` names.
fn random_char_bert(cfg: &concierge_models::tagger::CharBertConfig, seed: u64, dev: &Device) -> HashMap<String, Tensor> {
    let mut rng = Rng(seed | 1);
    cfg.tensor_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            // LayerNorm gains near 1, everything else small.
            let base = if name.ends_with("LayerNorm.weight") { 1.0 } else { 0.0 };
            let v: Vec<f32> = (0..n).map(|_| base + rng.float(0.2)).collect();
            (name, Tensor::from_vec(v, shape, dev).unwrap())
        })
        .collect()
}

/// Char BERT features (`char_bert`): each layer read equals candle-transformers' reference BERT
/// (`bert::reference_forward`, the reference the encoder is tested against) over `[CLS] chars
/// [SEP]`, at the characters' positions; a sequence longer than the BERT's positions runs in
/// windows, each as its own `[CLS] window [SEP]`; padding reads zeros; characters find their row
/// as written, lower-cased or folded to half-width, else `[UNK]`; and a tagger reading them
/// saves and loads with `char_bert_vocab.json` and the `char_bert.*` tensors.
#[test]
fn char_bert_features_match_the_reference_bert() {
    use concierge_models::tagger::char_bert::char_bert_id;
    use concierge_models::tagger::{CharBert, CharBertConfig, Vocab};
    let dev = Device::Cpu;
    let cfg = CharBertConfig {
        vocab_size: 12,
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 16,
        max_position_embeddings: 7,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        layers: vec![1, 2],
    };
    let tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "中", "国", "人", "a", "1", "北", "京", "!"];
    let vocab = Vocab::new(tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect(), "[UNK]").unwrap();
    assert_eq!(["中", "A", "ａ", "１", "！", "x", "Ａ"].map(|t| char_bert_id(&vocab, t)), [4, 7, 7, 8, 11, 1, 7]);
    let weights = random_char_bert(&cfg, 5, &dev);
    let cb = CharBert::load(&VarBuilder::from_tensors(weights.clone(), DType::F32, &dev), &cfg, vocab.clone()).unwrap();
    // Sequence 0 is 7 characters: windows of 5 (7 positions less [CLS] and [SEP]) and 2.
    let seqs: [&[u32]; 3] = [&[4, 5, 6, 9, 10, 7, 8], &[9, 10, 1], &[11]];
    let lengths: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
    let l = 7;
    let flat: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(0, l - s.len()))).collect();
    let ids = Tensor::from_vec(flat, (3, l), &dev).unwrap();
    let got = cb.features(&ids, &lengths, DType::F32).unwrap();
    assert_eq!(got.dims(), [3, l, 16]);
    // The reference, one window at a time, for each layer read.
    let reference = |window: &[u32], layer: usize| -> Tensor {
        let mut bert = cfg.bert().unwrap();
        bert.num_hidden_layers = layer;
        let mut w = vec![2u32];
        w.extend_from_slice(window);
        w.push(3);
        let n = w.len();
        let ids = Tensor::from_vec(w, (1, n), &dev).unwrap();
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &dev);
        let out = concierge_models::bert::reference_forward(vb, &bert, &ids, &ids.zeros_like().unwrap(), &ids.ones_like().unwrap()).unwrap();
        out.squeeze(0).unwrap().narrow(0, 1, n - 2).unwrap()
    };
    for (s, seq) in seqs.iter().enumerate() {
        for (k, &layer) in cfg.layers.iter().enumerate() {
            let want = Tensor::cat(&seq.chunks(5).map(|w| reference(w, layer)).collect::<Vec<_>>(), 0).unwrap();
            let part = got.get(s).unwrap().narrow(0, 0, seq.len()).unwrap().narrow(1, 8 * k, 8).unwrap();
            check_close(&format!("sequence {s}, layer {layer}"), &part, &want);
        }
        let pad = got.get(s).unwrap().narrow(0, seq.len(), l - seq.len()).unwrap();
        assert!(floats(&pad).iter().all(|&v| v == 0.0), "padding reads zeros");
    }

    // A tagger reading them: ids carry the BERT row last, and the checkpoint round-trips.
    let mut tcfg = TaggerConfig::embeddings(5, 4, 3, 3);
    tcfg.char_bert = Some(cfg.clone());
    assert_eq!(tcfg.lstm_input_dim(), 4 + 16);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let tvocab = Vocab::new([("<unk>", 0), ("中", 1), ("国", 2)].into_iter().map(|(k, v)| (k.to_owned(), v)).collect(), "<unk>").unwrap();
    let model = BiLstmCrf::new(vb, &tcfg, tag_set(3)).unwrap().with_vocab(tvocab).unwrap().with_char_bert(cb.clone()).unwrap();
    let (ids, lengths) = model.char_ids(&["中国人", "Ａ"], &dev).unwrap();
    assert_eq!(ids.to_vec3::<u32>().unwrap(), [[[1, 4], [2, 5], [0, 6]], [[0, 7], [0, 1], [0, 1]]]);
    let out = tmp_dir("char-bert");
    model.save(&out).unwrap();
    assert!(out.join("char_bert_vocab.json").is_file());
    let again = BiLstmCrf::load(&out, &dev, DType::F32).unwrap();
    assert_eq!(again.char_bert().unwrap().vocab(), &vocab);
    let (a, b) = (model.forward_emissions(&ids, &lengths).unwrap(), again.forward_emissions(&ids, &lengths).unwrap());
    check_close("emissions after the round trip", &a, &b);
    // Without its vocabulary the checkpoint names the missing file.
    std::fs::remove_file(out.join("char_bert_vocab.json")).unwrap();
    let err = BiLstmCrf::load(&out, &dev, DType::F32).unwrap_err().to_string();
    assert!(err.contains("char_bert_vocab.json"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
    // Layers past the BERT's are refused.
    let mut bad = cfg.clone();
    bad.layers = vec![3];
    assert!(CharBert::load(&VarBuilder::from_tensors(weights, DType::F32, &dev), &bad, vocab).is_err());
}
