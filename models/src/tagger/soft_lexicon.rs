//! Word-vector lexicon features for character taggers (Chinese): SoftLexicon (Ma et al. 2020,
//! "Simplify the Usage of Lexicon in Chinese NER", their B/M/E sets). For every character, the
//! known words that begin at it (B), continue through it (M) and end at it (E); each set becomes
//! one vector, the weighted mean of its words' pretrained vectors, and the three sit side by side
//! after the character's other features. Unlike the class flags of [`super::lexicon`], a word's
//! vector says what kind of word it is (北京大学 near other universities), so a character learns
//! it is inside an organisation name the training set never had.
//!
//! A word's weight is how often it occurs (in the tagger's training text, plus one, so words
//! the text never has still count); as in the paper the weights are normalised over all three
//! sets of a character and the set vectors scaled by 3: `v_set = 3 / Z * sum(w * e)` with `Z` the
//! sum of the weights of the character's words. A character no word covers gets zeros. Each set
//! keeps its `per_set` heaviest words (ties: the lower id), so the ids a character carries are a
//! fixed `3 * per_set`: B's, then M's, then E's, 0 (no word, weight 0) filling.
//!
//! Checkpoint: the table `soft_lexicon.embedding` `[words, dim]` (row 0 zeros: no word), frozen
//! in training; `soft_lexicon.txt` beside it, one `word<TAB>weight` a line in id order from id 1.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::lexicon::MAX_WORD_CHARS;
use crate::error::{ModelError, Result};

/// A tagger's `soft_lexicon` config entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoftLexiconConfig {
    /// Rows of the table: the words plus the no-word row 0.
    pub words: usize,
    /// Width of a word vector.
    pub dim: usize,
    /// Words kept a set (B, M, E) a character.
    pub per_set: usize,
}

impl SoftLexiconConfig {
    /// Width of a character's features: three set vectors.
    pub fn feature_dim(&self) -> usize {
        3 * self.dim
    }

    /// Ids a character: `per_set` for each of the three sets.
    pub fn id_columns(&self) -> usize {
        3 * self.per_set
    }

    pub(super) fn validate(&self) -> std::result::Result<(), String> {
        if self.words < 2 || self.dim == 0 || !(1..=64).contains(&self.per_set) {
            return Err("soft_lexicon: words (at least 2, row 0 is no word), dim positive and per_set 1 to 64".into());
        }
        Ok(())
    }
}

/// The word list, its weights and its vectors.
#[derive(Debug, Clone)]
pub struct SoftLexicon {
    cfg: SoftLexiconConfig,
    /// Word -> id (from 1).
    ids: HashMap<String, u32>,
    /// Words in id order (index 0 is id 1).
    words: Vec<String>,
    /// Weight per id; id 0 has 0.
    weights: Vec<f32>,
    /// Characters in the longest word.
    max_len: usize,
    /// `[words, dim]`.
    table: Tensor,
    /// `[words]` f32, on the table's device.
    weight_t: Tensor,
}

impl PartialEq for SoftLexicon {
    /// Same config, words and weights (the vectors are not compared).
    fn eq(&self, other: &Self) -> bool {
        self.cfg == other.cfg && self.words == other.words && self.weights == other.weights
    }
}

impl SoftLexicon {
    /// `entries`: (word, weight) in id order from 1; `table` `[entries + 1, dim]` with row 0 for
    /// no word. Words of one character or over [`MAX_WORD_CHARS`], repeated words and weights not
    /// positive and finite are refused.
    pub fn new(entries: Vec<(String, f32)>, table: Tensor, per_set: usize) -> Result<Self> {
        let (rows, dim) = table.dims2()?;
        let cfg = SoftLexiconConfig { words: rows, dim, per_set };
        cfg.validate().map_err(ModelError::Unsupported)?;
        if rows != entries.len() + 1 {
            return Err(ModelError::Unsupported(format!(
                "soft lexicon: {} words for a table of {rows} rows (one more than the words: row 0 is no word)",
                entries.len()
            )));
        }
        let mut ids = HashMap::with_capacity(entries.len());
        let mut words = Vec::with_capacity(entries.len());
        let mut weights = Vec::with_capacity(rows);
        weights.push(0.0);
        let mut max_len = 0;
        for (k, (word, w)) in entries.into_iter().enumerate() {
            let n = word.chars().count();
            if !(2..=MAX_WORD_CHARS).contains(&n) {
                return Err(ModelError::Unsupported(format!("soft lexicon word {word:?}: words have 2 to {MAX_WORD_CHARS} characters")));
            }
            if !(w.is_finite() && w > 0.0) {
                return Err(ModelError::Unsupported(format!("soft lexicon word {word:?}: weight {w}, weights are positive")));
            }
            if ids.insert(word.clone(), k as u32 + 1).is_some() {
                return Err(ModelError::Unsupported(format!("soft lexicon word {word:?} appears twice")));
            }
            max_len = max_len.max(n);
            words.push(word);
            weights.push(w);
        }
        let weight_t = Tensor::new(weights.as_slice(), table.device())?;
        Ok(Self { cfg, ids, words, weights, max_len, table, weight_t })
    }

    /// Reads `soft_lexicon.txt` (`word<TAB>weight` lines, id order) and the table
    /// (`embedding`, under `vb`'s prefix) of a checkpoint whose config says `cfg`.
    pub fn load(path: &Path, vb: &VarBuilder, cfg: &SoftLexiconConfig) -> Result<Self> {
        cfg.validate().map_err(ModelError::Unsupported)?;
        let bad = |reason: String| ModelError::BadFile { path: path.to_owned(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let mut entries = Vec::with_capacity(cfg.words.saturating_sub(1));
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
            let (word, w) = line
                .split_once('\t')
                .and_then(|(word, w)| Some((word, w.parse::<f32>().ok()?)))
                .ok_or_else(|| bad(format!("line {}: `word<TAB>weight` expected", n + 1)))?;
            entries.push((word.to_string(), w));
        }
        if entries.len() + 1 != cfg.words {
            return Err(bad(format!("{} words; the config's soft_lexicon says {} rows (words + 1)", entries.len(), cfg.words)));
        }
        let table = vb.get((cfg.words, cfg.dim), "embedding")?;
        Self::new(entries, table, cfg.per_set).map_err(|e| bad(e.to_string()))
    }

    /// Writes `soft_lexicon.txt`.
    pub fn save_words(&self, path: &Path) -> Result<()> {
        let mut out = String::with_capacity(self.words.len() * 12);
        for (word, w) in self.words.iter().zip(&self.weights[1..]) {
            out.push_str(word);
            out.push('\t');
            out.push_str(&w.to_string());
            out.push('\n');
        }
        std::fs::write(path, out).map_err(|e| ModelError::BadFile { path: path.to_owned(), reason: e.to_string() })
    }

    pub fn config(&self) -> &SoftLexiconConfig {
        &self.cfg
    }

    /// Words, not counting the no-word row.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The id of a word (None: not in the lexicon).
    pub fn id(&self, word: &str) -> Option<u32> {
        self.ids.get(word).copied()
    }

    /// The vector table `[words, dim]`.
    pub fn table(&self) -> &Tensor {
        &self.table
    }

    /// The same lexicon with its table in `dtype` on `device`.
    pub fn to(&self, device: &Device, dtype: DType) -> Result<Self> {
        let mut out = self.clone();
        out.table = self.table.to_device(device)?.to_dtype(dtype)?;
        out.weight_t = self.weight_t.to_device(device)?;
        Ok(out)
    }

    /// The ids of a padding position.
    pub fn none_ids(&self) -> Vec<u32> {
        vec![0; self.cfg.id_columns()]
    }

    /// For each character of `chars`, the ids of its B, M and E sets, `per_set` each (heaviest
    /// first, 0 filling): `chars.len() * 3 * per_set` ids, character-major.
    pub fn ids<S: AsRef<str>>(&self, chars: &[S]) -> Vec<u32> {
        let n = chars.len();
        let mut sets: Vec<[Vec<u32>; 3]> = vec![Default::default(); n];
        let mut key = String::new();
        for start in 0..n {
            key.clear();
            key.push_str(chars[start].as_ref());
            for end in start + 1..n.min(start + self.max_len) {
                key.push_str(chars[end].as_ref());
                let Some(&id) = self.ids.get(&key) else {
                    continue;
                };
                sets[start][0].push(id);
                for mid in &mut sets[start + 1..end] {
                    mid[1].push(id);
                }
                sets[end][2].push(id);
            }
        }
        let k = self.cfg.per_set;
        let mut out = Vec::with_capacity(n * 3 * k);
        for char_sets in &mut sets {
            for set in char_sets.iter_mut() {
                set.sort_by(|a, b| self.weights[*b as usize].total_cmp(&self.weights[*a as usize]).then(a.cmp(b)));
                set.truncate(k);
                out.extend_from_slice(set);
                out.extend(std::iter::repeat_n(0, k - set.len()));
            }
        }
        out
    }

    /// The characters' features `[B, L, 3 * dim]` in `dtype` for their ids `[B, L, 3 * per_set]`
    /// (u32, as [`Self::ids`] lays them out).
    pub fn features(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        let (b, l, c) = ids.dims3()?;
        let k = self.cfg.per_set;
        if c != 3 * k {
            return Err(ModelError::InvalidInput(format!("soft lexicon ids: {c} a character, expected {}", 3 * k)));
        }
        let flat = ids.flatten_all()?;
        let vecs = self.table.index_select(&flat, 0)?.to_dtype(DType::F32)?.reshape((b, l, 3, k, self.cfg.dim))?;
        let w = self.weight_t.index_select(&flat, 0)?.reshape((b, l, 3 * k))?;
        // 3 / Z over the character's words (no word: Z = 0, every weight 0, so any scale gives 0).
        let z = w.sum_keepdim(2)?.clamp(1e-12f32, f32::MAX)?;
        let w = w.broadcast_div(&(z / 3.0)?)?.reshape((b, l, 3, k, 1))?;
        let out = vecs.broadcast_mul(&w)?.sum(3)?.reshape((b, l, 3 * self.cfg.dim))?;
        Ok(out.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chars(s: &str) -> Vec<String> {
        s.chars().map(String::from).collect()
    }

    fn lexicon(per_set: usize) -> SoftLexicon {
        // ids 1..=4; row k of the table is k in every column.
        let entries = vec![("北京".to_string(), 3.0), ("北京大学".to_string(), 1.0), ("大学生".to_string(), 2.0), ("大学".to_string(), 4.0)];
        let table: Vec<f32> = (0..5).flat_map(|r| [r as f32, 10.0 * r as f32]).collect();
        SoftLexicon::new(entries, Tensor::from_vec(table, (5, 2), &Device::Cpu).unwrap(), per_set).unwrap()
    }

    #[test]
    fn sets_per_character_heaviest_first() {
        let lex = lexicon(2);
        // 北 京 大 学 生: 北京 [0,2) id 1, 北京大学 [0,4) id 2, 大学 [2,4) id 4, 大学生 [2,5) id 3.
        let ids = lex.ids(&chars("北京大学生"));
        let per_char: Vec<&[u32]> = ids.chunks(6).collect();
        assert_eq!(per_char[0], &[1, 2, 0, 0, 0, 0]); // B: 北京 (3) before 北京大学 (1)
        assert_eq!(per_char[1], &[0, 0, 2, 0, 1, 0]); // M: 北京大学; E: 北京
        assert_eq!(per_char[2], &[4, 3, 2, 0, 0, 0]); // B: 大学 (4), 大学生 (2); M: 北京大学
        assert_eq!(per_char[3], &[0, 0, 3, 0, 4, 2]); // M: 大学生; E: 大学 (4), 北京大学 (1)
        assert_eq!(per_char[4], &[0, 0, 0, 0, 3, 0]);
        // One a set: the lighter words drop.
        assert_eq!(&lexicon(1).ids(&chars("北京大学"))[..3], &[1, 0, 0]);
        assert!(lex.ids::<String>(&[]).is_empty());
        assert_eq!(lex.ids(&chars("南")), vec![0; 6]);
    }

    #[test]
    fn features_are_weighted_means_scaled_by_three() {
        let lex = lexicon(2);
        let ids = lex.ids(&chars("北京大学生"));
        let t = Tensor::from_vec(ids, (1, 5, 6), &Device::Cpu).unwrap();
        let f = lex.features(&t, DType::F32).unwrap();
        assert_eq!(f.dims(), &[1, 5, 6]);
        let f: Vec<Vec<f32>> = f.squeeze(0).unwrap().to_vec2().unwrap();
        // Character 大: B {大学 w4 row 4, 大学生 w2 row 3}, M {北京大学 w1 row 2}; Z = 7.
        let b = 3.0 / 7.0 * (4.0 * 4.0 + 2.0 * 3.0);
        let m = 3.0 / 7.0 * 2.0;
        let want = [b, 10.0 * b, m, 10.0 * m, 0.0, 0.0];
        for (got, want) in f[2].iter().zip(want) {
            assert!((got - want).abs() < 1e-4, "{:?} vs {want:?}", f[2]);
        }
        // Character 生: E {大学生}, Z = 2 -> 3 * row 3.
        assert_eq!(f[4], vec![0.0, 0.0, 0.0, 0.0, 9.0, 90.0]);
        // Padding (no words): zeros.
        let pad = Tensor::from_vec(lex.none_ids(), (1, 1, 6), &Device::Cpu).unwrap();
        assert_eq!(lex.features(&pad, DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0.0; 6]);
    }

    #[test]
    fn round_trips_through_its_file_and_refuses_bad_entries() {
        let lex = lexicon(2);
        let dir = std::env::temp_dir().join(format!("concierge-soft-lexicon-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("soft_lexicon.txt");
        lex.save_words(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "北京\t3\n北京大学\t1\n大学生\t2\n大学\t4\n");
        let ts: HashMap<String, Tensor> = [("embedding".to_string(), lex.table().clone())].into();
        let vb = VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu);
        assert_eq!(SoftLexicon::load(&path, &vb, lex.config()).unwrap(), lex);
        let wrong = SoftLexiconConfig { words: 4, ..lex.config().clone() };
        assert!(SoftLexicon::load(&path, &vb, &wrong).unwrap_err().to_string().contains("4 words"));
        std::fs::remove_dir_all(&dir).unwrap();
        let table = || Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(SoftLexicon::new(vec![("北".into(), 1.0)], table(), 1).is_err(), "one character");
        assert!(SoftLexicon::new(vec![("北京".into(), 0.0)], table(), 1).is_err(), "zero weight");
        assert!(SoftLexicon::new(vec![("北京".into(), 1.0), ("南京".into(), 1.0)], table(), 1).is_err(), "rows");
    }
}
