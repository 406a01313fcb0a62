//! Readers for the tagger's two data sets, as `scripts/fetch-tagger-data.sh` unpacks them
//! (formats, counts and licences are in its header):
//! - ATIS (`atis/train_dev`, `atis/test`): one utterance a line, `word:TAG … <=> intent`, IOB2;
//! - MSRA NER (`msra/msra_train.txt`, `msra/msra_test.txt`): one character and its BMES tag a
//!   line, a blank line between sentences.
//!
//! Both readers take LF or CRLF, stray spaces and tabs around fields, and a UTF-8 byte-order
//! mark; tags are kept as written, but each must parse (see [`super::spans::parse_tag`]).
//! Errors name the file and the 1-based line.
use std::path::{Path, PathBuf};

use super::spans::parse_tag;
use super::{Result, SequenceError};

/// One labelled sentence: a tag for each token, and the utterance's intent where the data set
/// has one (ATIS; several intents stay joined by `;` as written, e.g. `atis_flight;atis_airfare`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sentence {
    pub tokens: Vec<String>,
    pub tags: Vec<String>,
    pub intent: Option<String>,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| SequenceError::Io { path: path.to_owned(), source })
}

/// Lines numbered from 1, without their line ending (`\n` or `\r\n`) or the byte-order mark.
fn numbered_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    text.lines().enumerate().map(|(i, line)| (i + 1, line))
}

fn parse_err(path: &Path, line: usize, reason: impl Into<String>) -> SequenceError {
    SequenceError::Parse { path: path.to_owned(), line, reason: reason.into() }
}

fn check_tag(tag: &str, path: &Path, line: usize) -> Result<()> {
    parse_tag(tag).map(|_| ()).map_err(|e| parse_err(path, line, e.to_string()))
}

/// Reads an ATIS file: one utterance a line, `word:TAG word:TAG … <=> intent`.
pub fn read_atis(path: impl AsRef<Path>) -> Result<Vec<Sentence>> {
    let path = path.as_ref();
    parse_atis(&read(path)?, path)
}

/// [`read_atis`] on text already read; `path` is only for error messages.
pub fn parse_atis(text: &str, path: &Path) -> Result<Vec<Sentence>> {
    let mut out = Vec::new();
    for (n, line) in numbered_lines(text) {
        let mut fields: Vec<&str> = line.split_ascii_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let arrow =
            fields.iter().position(|&f| f == "<=>").ok_or_else(|| parse_err(path, n, "no ` <=> intent` at the end"))?;
        let intent = match &fields[arrow + 1..] {
            [intent] => intent.to_string(),
            [] => return Err(parse_err(path, n, "no intent after `<=>`")),
            more => return Err(parse_err(path, n, format!("{} words after `<=>`; expected one intent", more.len()))),
        };
        fields.truncate(arrow);
        if fields.is_empty() {
            return Err(parse_err(path, n, "no words before `<=>`"));
        }
        let (mut tokens, mut tags) = (Vec::with_capacity(fields.len()), Vec::with_capacity(fields.len()));
        for field in fields {
            // The tag follows the last colon: a word may hold colons, a tag never does.
            let (word, tag) = field
                .rsplit_once(':')
                .filter(|(w, t)| !w.is_empty() && !t.is_empty())
                .ok_or_else(|| parse_err(path, n, format!("{field:?} is not word:TAG")))?;
            check_tag(tag, path, n)?;
            tokens.push(word.to_owned());
            tags.push(tag.to_owned());
        }
        out.push(Sentence { tokens, tags, intent: Some(intent) });
    }
    Ok(out)
}

/// Reads an MSRA NER file: `char TAG` a line, sentences separated by blank lines (several
/// blank lines in a row, or none at the end of the file, are fine).
pub fn read_msra(path: impl AsRef<Path>) -> Result<Vec<Sentence>> {
    let path = path.as_ref();
    parse_msra(&read(path)?, path)
}

/// [`read_msra`] on text already read; `path` is only for error messages.
pub fn parse_msra(text: &str, path: &Path) -> Result<Vec<Sentence>> {
    let mut out = Vec::new();
    let (mut tokens, mut tags) = (Vec::new(), Vec::new());
    let flush = |tokens: &mut Vec<String>, tags: &mut Vec<String>, out: &mut Vec<Sentence>| {
        if !tokens.is_empty() {
            out.push(Sentence { tokens: std::mem::take(tokens), tags: std::mem::take(tags), intent: None });
        }
    };
    for (n, line) in numbered_lines(text) {
        // ASCII whitespace only: a token may be a full-width space (U+3000) in Chinese text.
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        match fields[..] {
            [] => flush(&mut tokens, &mut tags, &mut out),
            [token, tag] => {
                check_tag(tag, path, n)?;
                tokens.push(token.to_owned());
                tags.push(tag.to_owned());
            }
            _ => return Err(parse_err(path, n, format!("{} fields; expected `token TAG`", fields.len()))),
        }
    }
    flush(&mut tokens, &mut tags, &mut out);
    Ok(out)
}

/// Where the fetched data sets are: `$CONCIERGE_TEST_DATA_DIR`, else `model-store/data` in this
/// repository. For tests and benches, which skip when it is not there.
pub fn repo_data_dir() -> PathBuf {
    std::env::var_os("CONCIERGE_TEST_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../model-store/data"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("inline")
    }

    #[test]
    fn atis_lines() {
        let text = "i:O want:O to:O fly:O from:O baltimore:B-fromloc.city_name to:O \
                    las:B-toloc.city_name vegas:I-toloc.city_name <=> atis_flight\n\
                    \n  fares:O to:O st.:B-toloc.city_name louis:I-toloc.city_name\t<=>  atis_flight;atis_airfare \r\n\
                    10:30:B-depart_time.time am:I-depart_time.time <=> atis_flight";
        let s = parse_atis(text, p()).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].tokens.len(), 9);
        assert_eq!(s[0].tokens[5], "baltimore");
        assert_eq!(s[0].tags[8], "I-toloc.city_name");
        assert_eq!(s[0].intent.as_deref(), Some("atis_flight"));
        assert_eq!(s[1].tokens, ["fares", "to", "st.", "louis"]);
        assert_eq!(s[1].intent.as_deref(), Some("atis_flight;atis_airfare"));
        assert_eq!(s[2].tokens[0], "10:30");
        assert_eq!(s[2].tags[0], "B-depart_time.time");
    }

    #[test]
    fn atis_errors_name_the_line() {
        let cases = [
            ("a:O b:O\n", 1, "<=>"),
            ("a:O <=> x\nb:O <=>\n", 2, "no intent"),
            ("a:O <=> x y\n", 1, "2 words"),
            ("<=> x\n", 1, "no words"),
            ("a:O\r\n\r\nb <=> x\n", 1, "<=>"),
            ("a:O <=> x\n\nb <=> x\n", 3, "\"b\" is not word:TAG"),
            ("a:O <=> x\nb:Q-x <=> x\n", 2, "\"Q-x\""),
            ("a: <=> x\n", 1, "not word:TAG"),
        ];
        for (text, line, needle) in cases {
            let err = parse_atis(text, Path::new("atis/test")).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, SequenceError::Parse { line: l, .. } if l == line), "{text:?}: {msg}");
            assert!(msg.starts_with(&format!("atis/test:{line}: ")) && msg.contains(needle), "{text:?}: {msg}");
        }
    }

    #[test]
    fn msra_lines() {
        // CRLF, stray spaces, a tab, two blank lines in a row, a whitespace-only line, no final
        // blank line, a byte-order mark, and a full-width space as a token.
        let text = "\u{feff}中 B-ORG\r\n国 E-ORG\r\n\r\n\r\n 我  O \r\n\u{3000}\tO\r\n   \r\n张 B-PER\n三 E-PER";
        let s = parse_msra(text, p()).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].tokens, ["中", "国"]);
        assert_eq!(s[0].tags, ["B-ORG", "E-ORG"]);
        assert_eq!(s[1].tokens, ["我", "\u{3000}"]);
        assert_eq!(s[1].tags, ["O", "O"]);
        assert_eq!(s[2].tags, ["B-PER", "E-PER"]);
        assert!(s.iter().all(|s| s.intent.is_none()));
        assert!(parse_msra("", p()).unwrap().is_empty());
        assert!(parse_msra("\r\n\n", p()).unwrap().is_empty());
    }

    #[test]
    fn msra_errors_name_the_line() {
        let err = parse_msra("中 O\n\n国\n", Path::new("msra/x.txt")).unwrap_err().to_string();
        assert_eq!(err, "msra/x.txt:3: 1 fields; expected `token TAG`");
        let err = parse_msra("中 O\r\n国 O X\r\n", Path::new("m")).unwrap_err().to_string();
        assert!(err.starts_with("m:2: 3 fields"), "{err}");
        let err = parse_msra("中 O\n国 BX-LOC\n", Path::new("m")).unwrap_err().to_string();
        assert!(err.starts_with("m:2: tag \"BX-LOC\""), "{err}");
    }

    #[test]
    fn missing_file_names_it() {
        let err = read_msra("/nonexistent/msra_train.txt").unwrap_err().to_string();
        assert!(err.starts_with("cannot read /nonexistent/msra_train.txt: "), "{err}");
    }
}
