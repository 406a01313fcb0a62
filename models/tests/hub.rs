//! Loading by Hub repo id from the local Hugging Face cache, offline: HF_HOME and
//! HF_HUB_OFFLINE are honoured and nothing touches the network. (Its own test binary: it sets
//! process-wide environment variables.)
mod common;

use candle_core::{DType, Device};
use concierge_models::{ModelSource, TextEncoder};

#[test]
fn loads_from_the_hub_cache_offline_and_names_missing_files() {
    let home = std::env::temp_dir().join(format!("concierge-hf-home-{}", std::process::id()));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = home.join("hub/models--acme--minilm");
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(snap.join("1_Pooling")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let src = common::default_model_dir();
    for f in ["config.json", "tokenizer.json", "model.safetensors", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json"] {
        std::fs::copy(src.join(f), snap.join(f)).unwrap();
    }
    // SAFETY: this test binary has one test, so no other thread reads the environment.
    unsafe {
        std::env::set_var("HF_HOME", &home);
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let hub = ModelSource::Hub { repo: "acme/minilm".into(), revision: "main".into() };
    let enc = TextEncoder::load(&hub, &Device::Cpu, DType::F32, None).unwrap();
    assert_eq!(enc.info().id, "acme/minilm");
    assert_eq!(enc.info().version, commit, "the resolved commit, not the branch name");
    assert_eq!(enc.info().max_input_tokens, 256, "sentence_bert_config.json was found");

    // Same vectors as from the folder.
    let local = TextEncoder::load(&ModelSource::Dir(src), &Device::Cpu, DType::F32, None).unwrap();
    let t = enc.tokenize(0, "where is my parcel?", false).unwrap();
    assert_eq!(enc.embed(&[&t], &[true]).unwrap(), local.embed(&[&t], &[true]).unwrap());

    std::fs::remove_file(snap.join("tokenizer.json")).unwrap();
    let err = TextEncoder::load(&hub, &Device::Cpu, DType::F32, None).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("HF_HUB_OFFLINE") && err.contains("acme/minilm@main"), "{err}");
    std::fs::remove_dir_all(&home).unwrap();
}
