//! A word list for character taggers (Chinese): which known words each character begins,
//! continues or ends. The lexicon features of Zhang and Yang (2018, Lattice LSTM) and Ma et al.
//! (2020, "Simplify the Usage of Lexicon in Chinese NER", SoftLexicon) in their simplest form: a
//! character inside 北京大学 learns that it sits in a known organisation name, whether or not
//! the name was in the training data.
//!
//! Each word (two characters or more) belongs to one or more *classes* (e.g. `word` for any
//! word, `person`, `place`, `org` from a dictionary's part-of-speech tags). For every character
//! and class the tagger reads three bits: some word of that class starts at the character (B),
//! continues through it (M) or ends at it (E). As ids: `class * 8 + B + 2 M + 4 E`, rows of one
//! `lexicon_embedding.weight` table `[classes * 8, lexicon_dim]`.
//!
//! File `lexicon.txt` beside the checkpoint: one `word<TAB>class,class…` a line, sorted.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::error::{ModelError, Result};

/// Longest word the matcher looks for, in characters.
pub const MAX_WORD_CHARS: usize = 16;

#[derive(Debug, Clone, PartialEq)]
pub struct Lexicon {
    classes: Vec<String>,
    /// Word -> bit mask of its classes.
    words: HashMap<String, u32>,
    /// Characters in the longest word.
    max_len: usize,
}

impl Lexicon {
    /// `entries`: (word, class index) pairs; a word may come with several classes. Words of one
    /// character, or longer than [`MAX_WORD_CHARS`], are refused.
    pub fn new(
        classes: Vec<String>,
        entries: impl IntoIterator<Item = (String, usize)>,
    ) -> Result<Self> {
        if classes.is_empty() || classes.len() > 16 {
            return Err(ModelError::Unsupported(format!(
                "a lexicon needs 1 to 16 classes, got {}",
                classes.len()
            )));
        }
        let mut words: HashMap<String, u32> = HashMap::new();
        let mut max_len = 0;
        for (word, class) in entries {
            let n = word.chars().count();
            if !(2..=MAX_WORD_CHARS).contains(&n) {
                return Err(ModelError::Unsupported(format!(
                    "lexicon word {word:?}: words have 2 to {MAX_WORD_CHARS} characters"
                )));
            }
            if class >= classes.len() {
                return Err(ModelError::Unsupported(format!(
                    "lexicon word {word:?}: class {class} of {}",
                    classes.len()
                )));
            }
            max_len = max_len.max(n);
            *words.entry(word).or_default() |= 1 << class;
        }
        Ok(Self {
            classes,
            words,
            max_len,
        })
    }

    /// Reads `lexicon.txt` (`word<TAB>class,class…` lines) for a tagger whose config names
    /// `classes`; a class not among them is an error.
    pub fn from_file(path: &Path, classes: &[String]) -> Result<Self> {
        let bad = |reason: String| ModelError::BadFile {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let index: HashMap<&str, usize> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i))
            .collect();
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
            let (word, cls) = line
                .split_once('\t')
                .ok_or_else(|| bad(format!("line {}: `word<TAB>class,…` expected", n + 1)))?;
            for c in cls.split(',') {
                let &i = index
                    .get(c)
                    .ok_or_else(|| bad(format!("line {}: class {c:?} is not one of the config's lexicon_classes {classes:?}", n + 1)))?;
                entries.push((word.to_string(), i));
            }
        }
        Self::new(classes.to_vec(), entries).map_err(|e| bad(e.to_string()))
    }

    /// Writes `lexicon.txt`, sorted, so the file is reproducible.
    pub fn save(&self, path: &Path) -> Result<()> {
        let sorted: BTreeMap<&str, u32> =
            self.words.iter().map(|(w, &m)| (w.as_str(), m)).collect();
        let mut out = String::with_capacity(sorted.len() * 12);
        for (word, mask) in sorted {
            let cls: Vec<&str> = (0..self.classes.len())
                .filter(|c| mask & (1 << c) != 0)
                .map(|c| self.classes[c].as_str())
                .collect();
            out.push_str(word);
            out.push('\t');
            out.push_str(&cls.join(","));
            out.push('\n');
        }
        std::fs::write(path, out).map_err(|e| ModelError::BadFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Rows of the lexicon embedding table: 8 per class.
    pub fn rows(&self) -> usize {
        self.classes.len() * 8
    }

    /// The padding positions' ids (no word), one per class.
    pub fn none_ids(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.classes.len() as u32).map(|c| c * 8)
    }

    /// Ids for each character of `chars`, `classes` of them a character (character-major):
    /// `class * 8 + B + 2 M + 4 E` (see the module header).
    pub fn ids<S: AsRef<str>>(&self, chars: &[S]) -> Vec<u32> {
        let c = self.classes.len();
        let mut bits = vec![0u32; chars.len() * c];
        let mut key = String::new();
        for start in 0..chars.len() {
            key.clear();
            key.push_str(chars[start].as_ref());
            for end in start + 1..chars.len().min(start + self.max_len) {
                key.push_str(chars[end].as_ref());
                let Some(&mask) = self.words.get(&key) else {
                    continue;
                };
                for class in (0..c).filter(|k| mask & (1 << k) != 0) {
                    bits[start * c + class] |= 1;
                    for mid in start + 1..end {
                        bits[mid * c + class] |= 2;
                    }
                    bits[end * c + class] |= 4;
                }
            }
        }
        for (i, b) in bits.iter_mut().enumerate() {
            *b += (i % c) as u32 * 8;
        }
        bits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chars(s: &str) -> Vec<String> {
        s.chars().map(String::from).collect()
    }

    #[test]
    fn marks_begin_middle_and_end_per_class() {
        let classes = vec!["word".to_string(), "org".to_string()];
        let lex = Lexicon::new(
            classes.clone(),
            [
                ("北京".to_string(), 0),
                ("北京大学".to_string(), 0),
                ("北京大学".to_string(), 1),
                ("大学生".to_string(), 0),
            ],
        )
        .unwrap();
        // 北 京 大 学 生: 北京 (B E), 北京大学 (B M M E, word and org), 大学生 (B M E).
        let ids = lex.ids(&chars("北京大学生"));
        let word: Vec<u32> = ids.iter().step_by(2).copied().collect();
        let org: Vec<u32> = ids.iter().skip(1).step_by(2).map(|i| i - 8).collect();
        assert_eq!(word, vec![1, 4 | 2, 2 | 1, 4 | 2, 4]);
        assert_eq!(org, vec![1, 2, 2, 4, 0]);
        assert_eq!(lex.ids(&chars("南")), vec![0, 8]);
        assert!(lex.ids::<String>(&[]).is_empty());

        let dir = std::env::temp_dir().join(format!("concierge-lexicon-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lexicon.txt");
        lex.save(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "北京\tword\n北京大学\tword,org\n大学生\tword\n"
        );
        assert_eq!(Lexicon::from_file(&path, &classes).unwrap(), lex);
        let err = Lexicon::from_file(&path, &classes[..1])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"org\" is not one of"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            Lexicon::new(classes, [("北".to_string(), 0)]).is_err(),
            "one-character words are refused"
        );
    }
}
