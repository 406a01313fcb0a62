//! Tag sequences to entity spans and back. The chunk rules are conlleval's `startOfChunk` and
//! `endOfChunk` (CoNLL-2000 evaluation script) with the IOBES additions that seqeval's default,
//! conlleval-compatible mode makes (`S-` is a chunk of one; `B-` always starts a chunk, `E-`
//! and `S-` always end one). For tags that only use B/I/O they are exactly conlleval's.
//! Ill-formed sequences are read the conlleval way, never rejected: an `I-` after `O` or
//! after another label starts a chunk, a chunk ends where the label changes, and so on.
//! BMES is IOBES with `M-` for `I-`; both letters are accepted in any sequence.
use super::{Result, SequenceError};

/// The position part of a tag. `M-` (BMES) reads as [`Prefix::I`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Prefix {
    O,
    B,
    I,
    E,
    S,
}

/// A tagging scheme: which prefixes a tag set uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// IOB2: `B-` opens every chunk, `I-` continues it.
    Bio,
    /// IOBES (BILOU with other letters): `B- I-* E-` or `S-`.
    Bioes,
    /// BMES, as in the Chinese NER sets: `B- M-* E-` or `S-`.
    Bmes,
}

/// An entity: `label` over tokens `start..end` (end exclusive).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Span {
    pub label: String,
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(label: impl Into<String>, start: usize, end: usize) -> Self {
        Self { label: label.into(), start, end }
    }
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Bio => "BIO",
            Scheme::Bioes => "BIOES",
            Scheme::Bmes => "BMES",
        }
    }

    /// Every tag of this scheme over `labels`: `O` first, then each label's tags in
    /// B, I/M, (E, S) order. The order a tagger's output layer can use.
    pub fn tag_set<S: AsRef<str>>(self, labels: &[S]) -> Vec<String> {
        let letters: &[&str] = match self {
            Scheme::Bio => &["B", "I"],
            Scheme::Bioes => &["B", "I", "E", "S"],
            Scheme::Bmes => &["B", "M", "E", "S"],
        };
        let mut tags = vec!["O".to_owned()];
        for label in labels {
            tags.extend(letters.iter().map(|l| format!("{l}-{}", label.as_ref())));
        }
        tags
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Splits a tag into its prefix and label: `"O"` is `(O, "")`; otherwise the prefix is what
/// stands before the first `-` (so labels may hold hyphens) and must be B, I, M, E or S, and
/// the label must not be empty.
pub fn parse_tag(tag: &str) -> Result<(Prefix, &str)> {
    if tag == "O" {
        return Ok((Prefix::O, ""));
    }
    let bad = || SequenceError::BadTag(tag.to_owned());
    let (prefix, label) = tag.split_once('-').ok_or_else(bad)?;
    if label.is_empty() {
        return Err(bad());
    }
    let prefix = match prefix {
        "B" => Prefix::B,
        "I" | "M" => Prefix::I,
        "E" => Prefix::E,
        "S" => Prefix::S,
        _ => return Err(bad()),
    };
    Ok((prefix, label))
}

/// The scheme a tag sequence (or a whole corpus's tags, chained) is written in: BMES if any
/// tag is `M-`, else BIOES if any is `E-` or `S-`, else BIO (also for all-`O` input).
pub fn scheme_of<I>(tags: I) -> Result<Scheme>
where
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    let (mut m, mut es) = (false, false);
    for tag in tags {
        let tag = tag.as_ref();
        match parse_tag(tag)?.0 {
            Prefix::I if tag.starts_with('M') => m = true,
            Prefix::E | Prefix::S => es = true,
            _ => {}
        }
    }
    Ok(if m {
        Scheme::Bmes
    } else if es {
        Scheme::Bioes
    } else {
        Scheme::Bio
    })
}

/// conlleval's `endOfChunk`: did a chunk end just before the current token?
fn end_of_chunk(prev: Prefix, tag: Prefix, prev_label: &str, label: &str) -> bool {
    use Prefix::*;
    matches!(prev, E | S) || matches!((prev, tag), (B | I, B | S | O)) || (prev != O && prev_label != label)
}

/// conlleval's `startOfChunk`: does a chunk start at the current token?
fn start_of_chunk(prev: Prefix, tag: Prefix, prev_label: &str, label: &str) -> bool {
    use Prefix::*;
    matches!(tag, B | S) || matches!((prev, tag), (E | S | O, E | I)) || (tag != O && prev_label != label)
}

/// The entity spans of one sentence's tags, in order, by conlleval's rules (see the module
/// doc). Fails only on a tag that [`parse_tag`] refuses.
pub fn spans<S: AsRef<str>>(tags: &[S]) -> Result<Vec<Span>> {
    let mut out = Vec::new();
    let (mut prev, mut prev_label) = (Prefix::O, "");
    let mut begin = 0;
    // One `O` past the end closes the last chunk, as the sentence break does in conlleval.
    for i in 0..=tags.len() {
        let (tag, label) = match tags.get(i) {
            Some(t) => parse_tag(t.as_ref())?,
            None => (Prefix::O, ""),
        };
        if end_of_chunk(prev, tag, prev_label, label) {
            out.push(Span::new(prev_label, begin, i));
        }
        if start_of_chunk(prev, tag, prev_label, label) {
            begin = i;
        }
        (prev, prev_label) = (tag, label);
    }
    Ok(out)
}

/// The well-formed tags of `scheme` for `spans` over a sentence of `len` tokens: the inverse
/// of [`spans`]. Spans may come in any order but must fit and must not overlap.
pub fn tags_of(spans: &[Span], len: usize, scheme: Scheme) -> Result<Vec<String>> {
    let mut tags = vec!["O".to_owned(); len];
    let mut taken = vec![false; len];
    let inside = if scheme == Scheme::Bmes { "M" } else { "I" };
    for span in spans {
        let Span { label, start, end } = span;
        if start >= end || *end > len || taken[*start..*end].iter().any(|&t| t) || label.is_empty() {
            return Err(SequenceError::BadSpan { label: label.clone(), start: *start, end: *end, len });
        }
        taken[*start..*end].iter_mut().for_each(|t| *t = true);
        for (i, tag) in tags[*start..*end].iter_mut().enumerate() {
            let at = start + i;
            let letter = match scheme {
                Scheme::Bio if at == *start => "B",
                Scheme::Bio => "I",
                _ if end - start == 1 => "S",
                _ if at == *start => "B",
                _ if at + 1 == *end => "E",
                _ => inside,
            };
            *tag = format!("{letter}-{label}");
        }
    }
    Ok(tags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(tags: &str) -> Vec<(String, usize, usize)> {
        let tags: Vec<&str> = tags.split_whitespace().collect();
        spans(&tags).unwrap().into_iter().map(|s| (s.label, s.start, s.end)).collect()
    }

    fn v(items: &[(&str, usize, usize)]) -> Vec<(String, usize, usize)> {
        items.iter().map(|&(l, s, e)| (l.to_owned(), s, e)).collect()
    }

    #[test]
    fn well_formed_bio() {
        assert_eq!(sp("B-PER I-PER O B-LOC"), v(&[("PER", 0, 2), ("LOC", 3, 4)]));
        assert_eq!(sp("O O O"), v(&[]));
        assert_eq!(sp(""), v(&[]));
        assert_eq!(sp("B-A B-A I-A"), v(&[("A", 0, 1), ("A", 1, 3)]));
        assert_eq!(sp("B-A I-A I-A"), v(&[("A", 0, 3)]));
    }

    #[test]
    fn ill_formed_bio_reads_as_conlleval() {
        // I- after O, at the start, or after another label opens a chunk.
        assert_eq!(sp("O I-PER I-PER"), v(&[("PER", 1, 3)]));
        assert_eq!(sp("I-PER O"), v(&[("PER", 0, 1)]));
        assert_eq!(sp("B-PER I-LOC I-LOC"), v(&[("PER", 0, 1), ("LOC", 1, 3)]));
        assert_eq!(sp("I-A I-B I-A"), v(&[("A", 0, 1), ("B", 1, 2), ("A", 2, 3)]));
        // B- of another label right after I-.
        assert_eq!(sp("I-A B-B I-B O I-A"), v(&[("A", 0, 1), ("B", 1, 3), ("A", 4, 5)]));
        // a chunk running to the end is closed.
        assert_eq!(sp("O B-A I-A"), v(&[("A", 1, 3)]));
    }

    #[test]
    fn bmes_and_bioes() {
        assert_eq!(sp("B-PER M-PER E-PER S-LOC O"), v(&[("PER", 0, 3), ("LOC", 3, 4)]));
        assert_eq!(sp("B-PER I-PER E-PER S-LOC O"), v(&[("PER", 0, 3), ("LOC", 3, 4)]));
        assert_eq!(sp("S-A S-A"), v(&[("A", 0, 1), ("A", 1, 2)]));
        assert_eq!(sp("B-A E-A B-A E-A"), v(&[("A", 0, 2), ("A", 2, 4)]));
        // M and I are the same letter: mixing them keeps one chunk.
        assert_eq!(sp("B-X M-X I-X E-X"), v(&[("X", 0, 4)]));
    }

    #[test]
    fn ill_formed_bmes_reads_as_seqeval() {
        // MSRA's sentences cut at 100 characters start inside an entity.
        assert_eq!(sp("M-PER E-PER O"), v(&[("PER", 0, 2)]));
        assert_eq!(sp("E-PER O"), v(&[("PER", 0, 1)]));
        // E- after E- or after S- opens a new chunk; so does I-/M- after E-.
        assert_eq!(sp("E-A E-A"), v(&[("A", 0, 1), ("A", 1, 2)]));
        assert_eq!(sp("S-A E-A"), v(&[("A", 0, 1), ("A", 1, 2)]));
        assert_eq!(sp("B-A E-A M-A E-A"), v(&[("A", 0, 2), ("A", 2, 4)]));
        // B- then B-: two; B- alone: one token; B- M- with no E-: runs to where it stops.
        assert_eq!(sp("B-A B-A E-A"), v(&[("A", 0, 1), ("A", 1, 3)]));
        assert_eq!(sp("B-A O"), v(&[("A", 0, 1)]));
        assert_eq!(sp("B-A M-A O B-A M-A"), v(&[("A", 0, 2), ("A", 3, 5)]));
        // S- ends what runs before it and is one token; label changes split.
        assert_eq!(sp("I-A S-A I-A"), v(&[("A", 0, 1), ("A", 1, 2), ("A", 2, 3)]));
        assert_eq!(sp("B-A E-B"), v(&[("A", 0, 1), ("B", 1, 2)]));
        assert_eq!(sp("B-A M-B E-A"), v(&[("A", 0, 1), ("B", 1, 2), ("A", 2, 3)]));
    }

    #[test]
    fn labels_may_hold_hyphens_and_dots() {
        assert_eq!(
            sp("B-fromloc.city-name I-fromloc.city-name B-x-y"),
            v(&[("fromloc.city-name", 0, 2), ("x-y", 2, 3)])
        );
    }

    #[test]
    fn bad_tags_are_refused() {
        for tag in ["B", "B-", "X-PER", "o", "", "O-PER", "b-PER"] {
            let err = spans(&["O", tag]).unwrap_err();
            assert!(matches!(&err, SequenceError::BadTag(t) if t == tag), "{tag:?}: {err}");
        }
    }

    #[test]
    fn scheme_detection() {
        assert_eq!(scheme_of(["O", "B-A", "I-A"]).unwrap(), Scheme::Bio);
        assert_eq!(scheme_of(["O", "O"]).unwrap(), Scheme::Bio);
        assert_eq!(scheme_of(Vec::<String>::new()).unwrap(), Scheme::Bio);
        assert_eq!(scheme_of(["B-A", "I-A", "E-A"]).unwrap(), Scheme::Bioes);
        assert_eq!(scheme_of(["S-A"]).unwrap(), Scheme::Bioes);
        assert_eq!(scheme_of(["B-A", "M-A", "E-A"]).unwrap(), Scheme::Bmes);
        assert_eq!(scheme_of(["B-A", "I-A", "M-A"]).unwrap(), Scheme::Bmes);
        // a label starting with M is not a BMES tag
        assert_eq!(scheme_of(["B-MISC", "I-MISC"]).unwrap(), Scheme::Bio);
        assert!(scheme_of(["B-A", "Q-A"]).is_err());
    }

    #[test]
    fn tags_of_inverts_spans() {
        let cases = [
            (Scheme::Bio, "B-A I-A O B-B B-B I-B O"),
            (Scheme::Bioes, "B-A I-A E-A O S-B S-B B-A E-A"),
            (Scheme::Bmes, "B-A M-A M-A E-A S-B O B-C E-C"),
        ];
        for (scheme, tags) in cases {
            let tags: Vec<String> = tags.split_whitespace().map(str::to_owned).collect();
            let found = spans(&tags).unwrap();
            assert_eq!(tags_of(&found, tags.len(), scheme).unwrap(), tags, "{scheme}");
            assert_eq!(scheme_of(&tags).unwrap(), scheme);
        }
        // ill-formed tags come back well formed with the same spans
        let ill: Vec<&str> = "I-A I-A O E-B E-B M-C".split(' ').collect();
        let found = spans(&ill).unwrap();
        let fixed = tags_of(&found, ill.len(), Scheme::Bmes).unwrap();
        assert_eq!(fixed, ["B-A", "E-A", "O", "S-B", "S-B", "S-C"]);
        assert_eq!(spans(&fixed).unwrap(), found);
    }

    #[test]
    fn tags_of_refuses_bad_spans() {
        let bad = [Span::new("A", 2, 2), Span::new("A", 3, 5), Span::new("", 0, 1)];
        for span in bad {
            assert!(tags_of(std::slice::from_ref(&span), 4, Scheme::Bio).is_err(), "{span:?}");
        }
        assert!(tags_of(&[Span::new("A", 0, 2), Span::new("B", 1, 3)], 4, Scheme::Bio).is_err());
    }

    #[test]
    fn tag_sets() {
        assert_eq!(Scheme::Bio.tag_set(&["PER"]), ["O", "B-PER", "I-PER"]);
        assert_eq!(Scheme::Bmes.tag_set(&["A", "B"]).len(), 9);
        assert_eq!(Scheme::Bioes.tag_set(&["A"])[4], "S-A");
    }
}
