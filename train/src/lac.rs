//! Reads Baidu LAC's small model as jieba ships it (`jieba/lac_small/`, unpacked by
//! `scripts/fetch-tagger-data.sh` into `model-store/data/lac/`) for `train-tagger --lac`: the
//! folder's `word.dic` and the PaddlePaddle LoDTensors of `model_baseline/` become a frozen
//! [`Lac`] (see `concierge_models::tagger::lac` for the network and the weight layout), which the
//! trained tagger's checkpoint then carries under `lac.*`.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use concierge_models::tagger::lac::LAC_UNK;
use concierge_models::tagger::{Lac, LacConfig, Vocab};

use crate::vectors::parse_lod_tensor;

/// `word.dic`'s `(id, token)` lines, each id below `rows`.
pub fn read_word_dic(path: &Path, rows: usize) -> anyhow::Result<Vec<(u32, String)>> {
    let dic = std::fs::read_to_string(path).with_context(|| format!("reading {} (a LAC folder holds word.dic and model_baseline/)", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in dic.lines().enumerate() {
        let Some((id, token)) = line.split_once('\t') else {
            bail!("{} line {}: `id<TAB>token` expected", path.display(), n + 1)
        };
        let id: u32 = id.parse().with_context(|| format!("{} line {}: id {id:?}", path.display(), n + 1))?;
        ensure!((id as usize) < rows, "{} line {}: id {id} is past the table's {rows} rows", path.display(), n + 1);
        out.push((id, token.to_string()));
    }
    ensure!(!out.is_empty(), "{}: no tokens", path.display());
    Ok(out)
}

/// The tensors of a LAC folder's `model_baseline/` that [`Lac`] reads (every file but the
/// emission layer `fc_4` and `crfw`, which `with_head` adds), by their Paddle names.
fn read_tensors(dir: &Path, num_layers: usize, with_head: bool) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut names = vec!["word_emb".to_string()];
    for k in 0..2 * num_layers {
        names.extend([format!("fc_{k}.w_0"), format!("fc_{k}.b_0"), format!("gru_{k}.w_0"), format!("gru_{k}.b_0")]);
    }
    if with_head {
        names.extend([format!("fc_{}.w_0", 2 * num_layers), format!("fc_{}.b_0", 2 * num_layers), "crfw".into()]);
    }
    let mut out = HashMap::new();
    for name in names {
        let path = dir.join("model_baseline").join(&name);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let (dims, values) = parse_lod_tensor(&bytes).with_context(|| format!("{} (PaddlePaddle LoDTensor)", path.display()))?;
        out.insert(name, Tensor::from_vec(values, dims, &Device::Cpu)?);
    }
    Ok(out)
}

/// LAC small from its folder, reading the outputs of `layers` (1-based) as features.
pub fn load_dir(dir: &Path, layers: Vec<usize>) -> anyhow::Result<Lac> {
    let tensors = read_tensors(dir, 2, false)?;
    let emb = &tensors["word_emb"];
    let (rows, dim) = emb.dims2()?;
    let hidden = tensors["gru_0.w_0"].dim(0)?;
    let cfg = LacConfig { vocab_size: rows, dim, hidden, num_layers: 2, layers };
    let ids: HashMap<String, u32> = read_word_dic(&dir.join("word.dic"), rows)?.into_iter().map(|(i, t)| (t, i)).collect();
    let vocab = Vocab::new(ids, LAC_UNK).with_context(|| format!("{}/word.dic", dir.display()))?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    Lac::load(&vb, &cfg, vocab).with_context(|| format!("LAC's network in {}", dir.display()))
}

/// A trainable copy of `lac`: the same network with its tensors as variables of `varmap` (so an
/// optimiser over `varmap.all_vars()` fine-tunes it, and the tagger saves what it learned).
pub fn trainable(lac: &Lac, varmap: &VarMap) -> anyhow::Result<Lac> {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
    let copy = Lac::load(&vb, lac.config(), lac.vocab().clone())?;
    let source: HashMap<&str, &Tensor> = lac.tensors().iter().map(|(n, t)| (n.as_str(), t)).collect();
    for (name, var) in varmap.data().lock().expect("varmap lock").iter() {
        let t = source.get(name.as_str()).with_context(|| format!("LAC has no tensor {name}"))?;
        var.set(&t.to_dtype(DType::F32)?)?;
    }
    Ok(copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A LAC folder read from its Paddle files gives the features of
    /// scripts/make_tagger_lac_fixture.py's NumPy reference (its tiny random network).
    #[test]
    fn a_lac_folder_reads_into_the_reference_network() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/tagger-lac-tiny");
        let lac = load_dir(&fixture.join("lac"), vec![1, 2]).unwrap();
        assert_eq!((lac.config().vocab_size, lac.config().dim, lac.config().hidden), (14, 5, 4));
        let r = candle_core::safetensors::load(fixture.join("reference.safetensors"), &Device::Cpu).unwrap();
        let lengths: Vec<usize> = r["lengths"].to_vec1::<i64>().unwrap().into_iter().map(|n| n as usize).collect();
        let ids = r["ids"].narrow(2, 3, 1).unwrap().squeeze(2).unwrap().to_dtype(DType::U32).unwrap();
        let got = lac.features(&ids, &lengths, DType::F32).unwrap();
        let err = (got - &r["lac_features"]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-5, "max error {err}");
        assert_eq!(lac.id("北"), 2);
        assert_eq!(lac.id("Ａ"), lac.id("A"), "full-width folds to half-width");
        assert_eq!(lac.id("欢"), 13, "OOV");
        let err = load_dir(&fixture, vec![1]).unwrap_err();
        assert!(format!("{err:#}").contains("model_baseline"), "{err:#}");
    }

    /// LAC's own tagging of `text` with its emission layer and CRF (`crfw`: start scores, end
    /// scores, then the transitions), by Viterbi: the tag names from `tag.dic`.
    fn lac_tags(dir: &Path, lac: &Lac, text: &str) -> Vec<String> {
        let head = read_tensors(dir, 2, true).unwrap();
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let ids: Vec<u32> = chars.iter().map(|c| lac.id(c)).collect();
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
        let top = lac.layer_outputs(&ids, &[n]).unwrap().pop().unwrap().squeeze(0).unwrap();
        let em: Vec<Vec<f32>> = top.matmul(&head["fc_4.w_0"]).unwrap().broadcast_add(&head["fc_4.b_0"]).unwrap().to_vec2().unwrap();
        let crf: Vec<Vec<f32>> = head["crfw"].to_vec2().unwrap();
        let k = em[0].len();
        let mut score: Vec<f32> = (0..k).map(|j| crf[0][j] + em[0][j]).collect();
        let mut back = Vec::new();
        for e in &em[1..] {
            let (s, b): (Vec<f32>, Vec<usize>) = (0..k)
                .map(|j| {
                    (0..k).map(|i| (score[i] + crf[2 + i][j], i)).fold((f32::MIN, 0), |a, c| if c.0 > a.0 { c } else { a })
                })
                .map(|(s, i)| (s, i))
                .unzip();
            score = s.iter().zip(e).map(|(s, e)| s + e).collect();
            back.push(b);
        }
        let mut best = (0..k).max_by(|&a, &b| (score[a] + crf[1][a]).total_cmp(&(score[b] + crf[1][b]))).unwrap();
        let mut path = vec![best];
        for b in back.iter().rev() {
            best = b[best];
            path.push(best);
        }
        path.reverse();
        let names: Vec<String> = std::fs::read_to_string(dir.join("tag.dic"))
            .unwrap()
            .lines()
            .map(|l| l.split_once('\t').unwrap().1.to_string())
            .collect();
        path.into_iter().map(|t| names[t].clone()).collect()
    }

    /// The real LAC weights read right give LAC's real tagging: people, places and organisations
    /// where a wrong gate layout or direction gives nonsense. Skips, saying so, without the data.
    #[test]
    fn the_real_lac_network_tags_entities() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model-store/data/lac");
        if !dir.join("model_baseline/gru_0.w_0").is_file() {
            eprintln!("SKIPPED: no LAC model at {} (scripts/fetch-tagger-data.sh fetches it)", dir.display());
            return;
        }
        let lac = load_dir(&dir, vec![1, 2]).unwrap();
        let tags = lac_tags(&dir, &lac, "邓小平在北京大学会见了联合国秘书长");
        let want = ["PER-B", "PER-I", "PER-I", "p-B", "ORG-B", "ORG-I", "ORG-I", "ORG-I", "v-B", "v-I", "u-B", "ORG-B", "ORG-I", "ORG-I"];
        assert_eq!(&tags[..want.len()], want, "{tags:?}");
        // Full-width digits fold to LAC's half-width ones; padding does not change a sequence.
        let tags = lac_tags(&dir, &lac, "四川省成都市的华为公司今天发布了新手机");
        assert_eq!(&tags[..3], ["LOC-B", "LOC-I", "LOC-I"], "{tags:?}");
        assert_eq!(&tags[7..11], ["ORG-B", "ORG-I", "ORG-I", "ORG-I"], "{tags:?}");
        assert_eq!(lac.id("１"), lac.id("1"));
        let a: Vec<u32> = "我爱北京".chars().map(|c| lac.id(&c.to_string())).collect();
        let b: Vec<u32> = "天安门".chars().map(|c| lac.id(&c.to_string())).collect();
        let padded = [a.clone(), b.clone(), vec![lac.vocab().unk_id()]].concat();
        let ids = Tensor::from_vec(padded, (2, 4), &Device::Cpu).unwrap();
        let both = lac.features(&ids, &[4, 3], DType::F32).unwrap();
        for (row, ids) in [a, b].into_iter().enumerate() {
            let n = ids.len();
            let alone = lac.features(&Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap(), &[n], DType::F32).unwrap();
            let diff = (both.narrow(0, row, 1).unwrap().narrow(1, 0, n).unwrap() - alone).unwrap();
            let diff = diff.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "sequence {row} batched with padding differs from alone by {diff}");
        }
        // The CPU loops against candle's ops on the real weights.
        let ops = lac.clone().with_cpu_loops(false).features(&ids, &[4, 3], DType::F32).unwrap();
        let diff = (ops - &both).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "CPU loops and tensor ops differ by {diff}");
        let pad = both.get(1).unwrap().get(3).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(pad, 0.0, "zero at padding");
    }
}
