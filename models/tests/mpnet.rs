//! The MPNet encoder (models/src/bert.rs) against the NumPy reference of
//! scripts/make_mpnet_fixture.py, written from transformers' modeling_mpnet.py:
//! - a tiny random MPNet (`fixtures/mpnet-tiny`): relative-position buckets equal for every
//!   offset in -140..=140; last hidden states within 1e-4 absolute in f32 (the fused CPU
//!   kernel), within 3e-2 in f16 (the padded attention path, as on a GPU);
//! - a tiny random RoBERTa (`fixtures/roberta-tiny`), the same way: BERT's layer with positions
//!   counted from `pad_token_id + 1`;
//! - the real all-mpnet-base-v2 (`fixtures/mpnet_parity.json`; runs where
//!   scripts/fetch-mpnet.sh has put the model in model-store/all-mpnet-base-v2, and says so
//!   when it skips): the same token ids, and cosine >= 0.99999 to the reference's embeddings.
use std::path::PathBuf;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use concierge_models::bert::{mpnet_bucket, read_config, BertEncoder, PackedBatch};
use concierge_models::{ModelSource, TextEncoder};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mpnet-tiny"))
}

fn roberta_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/roberta-tiny"))
}

fn json(path: PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn relative_buckets_match_transformers() {
    let fx = json(fixture_dir().join("expected.json"));
    let buckets = fx["buckets"].as_object().unwrap();
    assert_eq!(buckets.len(), 281);
    for (offset, want) in buckets {
        let offset: i64 = offset.parse().unwrap();
        assert_eq!(mpnet_bucket(offset) as u64, want.as_u64().unwrap(), "offset {offset}");
    }
}

#[test]
fn tiny_mpnet_matches_the_numpy_reference() {
    matches_the_numpy_reference(&fixture_dir());
}

/// RoBERTa's positions start at pad_token_id + 1 too (with BERT's layer, and one token type).
#[test]
fn tiny_roberta_matches_the_numpy_reference() {
    matches_the_numpy_reference(&roberta_dir());
}

fn matches_the_numpy_reference(dir: &std::path::Path) {
    let fx = json(dir.join("expected.json"));
    let cfg = read_config(&dir.join("config.json")).unwrap();
    let seqs: Vec<Vec<u32>> =
        fx["ids"].as_array().unwrap().iter().map(|s| s.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()).collect();
    let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
    let ids: Vec<u32> = seqs.concat();
    let types = vec![0u32; ids.len()];
    let want: Vec<f32> = fx["hidden"].as_array().unwrap().iter().flat_map(|s| s.as_array().unwrap().iter().flat_map(floats)).collect();
    for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::F16, 3e-2)] {
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], dtype, &Device::Cpu) }.unwrap();
        let enc = BertEncoder::load(vb, &cfg).unwrap();
        // All sequences in one packed batch, then each alone: both must match.
        let all = enc.forward(&PackedBatch { ids: &ids, type_ids: &types, lens: &lens }).unwrap();
        let got: Vec<f32> = all.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), want.len());
        let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err < tol, "{dtype:?} batch: max abs err {err}");
        let mut start = 0;
        for s in &seqs {
            let alone = enc.forward(&PackedBatch { ids: s, type_ids: &types[..s.len()], lens: &[s.len()] }).unwrap();
            let got: Vec<f32> = alone.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let w = &want[start..start + got.len()];
            let err = got.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < tol, "{dtype:?} sequence of {}: max abs err {err}", s.len());
            start += got.len();
        }
    }
    // Positions start at pad_token_id + 1: the 50 position rows hold 48 tokens.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu) }.unwrap();
    let enc = BertEncoder::load(vb, &cfg).unwrap();
    let long = vec![5u32; 49];
    let err = enc.forward(&PackedBatch { ids: &long, type_ids: &[0; 49], lens: &[49] }).expect_err("49 tokens is too long");
    assert!(err.to_string().contains("48"), "{err}");
}

#[test]
fn all_mpnet_base_v2_matches_the_numpy_reference() {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../model-store/all-mpnet-base-v2"));
    if !dir.join("model.safetensors").exists() {
        eprintln!("SKIPPED: {} is not there (scripts/fetch-mpnet.sh fetches it)", dir.display());
        return;
    }
    let enc = TextEncoder::load(&ModelSource::Dir(dir), &Device::Cpu, DType::F32, None).unwrap();
    assert_eq!(enc.info().dimension, 768);
    assert_eq!(enc.info().max_input_tokens, 384);
    assert!(enc.normalizes());
    let fx = json(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mpnet_parity.json")));
    let rows = fx["sentences"].as_array().unwrap();
    let toks: Vec<_> = rows.iter().enumerate().map(|(i, r)| enc.tokenize(i, r["text"].as_str().unwrap(), true).unwrap()).collect();
    for (t, r) in toks.iter().zip(rows) {
        let want: Vec<u32> = r["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(t.ids, want, "token ids of {:?}", r["text"]);
    }
    let refs: Vec<_> = toks.iter().collect();
    let got = enc.embed(&refs, &vec![true; refs.len()]).unwrap();
    for (g, r) in got.iter().zip(rows) {
        let w = floats(&r["embedding"]);
        let cos: f64 = g.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!(cos >= 0.99999, "{:?}: cosine {cos}", r["text"]);
    }
}
