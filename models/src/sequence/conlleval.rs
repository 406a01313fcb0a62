//! Entity-level scores as conlleval (the CoNLL-2000 evaluation script) computes them: a
//! predicted entity counts only if a gold entity has the same label, start and end; precision,
//! recall and F1 are micro-averaged over all entities, and each label gets its own line.
//! Token accuracy compares whole tags. Spans come from [`super::spans::spans`], so ill-formed
//! predictions are read as conlleval reads them. Held to seqeval's conlleval-compatible mode by
//! `models/tests/conlleval.rs` (fixtures from `scripts/make_conlleval_fixture.py`).
use std::collections::BTreeMap;
use std::fmt;

use super::spans::{spans, Span};
use super::{Result, SequenceError};

/// Entity counts for one label, or for all of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Gold entities (conlleval's "phrases"; seqeval's "support").
    pub gold: usize,
    /// Predicted entities (conlleval's "found").
    pub found: usize,
    /// Predicted entities that match a gold one exactly.
    pub correct: usize,
}

impl Counts {
    /// correct / found, 0 when nothing was found (as conlleval and seqeval do).
    pub fn precision(&self) -> f64 {
        ratio(self.correct, self.found)
    }

    /// correct / gold, 0 when there is no gold entity.
    pub fn recall(&self) -> f64 {
        ratio(self.correct, self.gold)
    }

    /// Harmonic mean of precision and recall, 0 when both are.
    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }

    fn add(&mut self, other: Counts) {
        self.gold += other.gold;
        self.found += other.found;
        self.correct += other.correct;
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// One line of the per-label table.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelScore {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Gold entities of this label.
    pub support: usize,
    pub counts: Counts,
}

/// Running conlleval totals: feed it sentence by sentence with [`Evaluation::add`], or build it
/// at once with [`evaluate`]; read the scores at any time.
#[derive(Clone, Debug, Default)]
pub struct Evaluation {
    pub tokens: usize,
    pub correct_tags: usize,
    pub sentences: usize,
    by_label: BTreeMap<String, Counts>,
}

impl Evaluation {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sentence: its gold tags and the predicted ones, of the same length.
    pub fn add<G: AsRef<str>, P: AsRef<str>>(&mut self, gold: &[G], pred: &[P]) -> Result<()> {
        if gold.len() != pred.len() {
            return Err(SequenceError::LengthMismatch { index: self.sentences, gold: gold.len(), pred: pred.len() });
        }
        let (gold_spans, pred_spans) = (spans(gold)?, spans(pred)?);
        self.sentences += 1;
        self.tokens += gold.len();
        self.correct_tags += gold.iter().zip(pred).filter(|&(g, p)| g.as_ref() == p.as_ref()).count();
        for span in &gold_spans {
            self.entry(&span.label).gold += 1;
        }
        for span in &pred_spans {
            let hit = matches(&gold_spans, span);
            let entry = self.entry(&span.label);
            entry.found += 1;
            entry.correct += usize::from(hit);
        }
        Ok(())
    }

    fn entry(&mut self, label: &str) -> &mut Counts {
        if !self.by_label.contains_key(label) {
            self.by_label.insert(label.to_owned(), Counts::default());
        }
        self.by_label.get_mut(label).expect("just inserted")
    }

    /// Totals over all labels.
    pub fn counts(&self) -> Counts {
        let mut all = Counts::default();
        self.by_label.values().for_each(|c| all.add(*c));
        all
    }

    /// Micro-averaged entity precision.
    pub fn precision(&self) -> f64 {
        self.counts().precision()
    }

    /// Micro-averaged entity recall.
    pub fn recall(&self) -> f64 {
        self.counts().recall()
    }

    /// Micro-averaged entity F1 (conlleval's FB1, as a fraction).
    pub fn f1(&self) -> f64 {
        self.counts().f1()
    }

    /// Share of tokens whose predicted tag is the gold tag, 0 for no tokens.
    pub fn accuracy(&self) -> f64 {
        ratio(self.correct_tags, self.tokens)
    }

    /// Every label seen in gold or prediction, sorted by name.
    pub fn per_label(&self) -> Vec<LabelScore> {
        self.by_label
            .iter()
            .map(|(label, c)| LabelScore {
                label: label.clone(),
                precision: c.precision(),
                recall: c.recall(),
                f1: c.f1(),
                support: c.gold,
                counts: *c,
            })
            .collect()
    }
}

/// Whether `span` is among `gold`: spans of one sentence are ordered and disjoint, so at most
/// one gold span starts where it does.
fn matches(gold: &[Span], span: &Span) -> bool {
    gold.binary_search_by_key(&span.start, |g| g.start).is_ok_and(|i| gold[i] == *span)
}

/// Scores predicted tag sequences against gold ones, sentence by sentence.
pub fn evaluate<G, P, S, T>(gold: &[G], pred: &[P]) -> Result<Evaluation>
where
    G: AsRef<[S]>,
    P: AsRef<[T]>,
    S: AsRef<str>,
    T: AsRef<str>,
{
    if gold.len() != pred.len() {
        return Err(SequenceError::CountMismatch { gold: gold.len(), pred: pred.len() });
    }
    let mut eval = Evaluation::new();
    for (g, p) in gold.iter().zip(pred) {
        eval.add(g.as_ref(), p.as_ref())?;
    }
    Ok(eval)
}

/// conlleval's report, with each label's gold count added at the end of its line.
impl fmt::Display for Evaluation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all = self.counts();
        writeln!(
            f,
            "processed {} tokens with {} phrases; found: {} phrases; correct: {}.",
            self.tokens, all.gold, all.found, all.correct
        )?;
        writeln!(
            f,
            "accuracy: {:6.2}%; precision: {:6.2}%; recall: {:6.2}%; FB1: {:6.2}",
            100.0 * self.accuracy(),
            100.0 * all.precision(),
            100.0 * all.recall(),
            100.0 * all.f1()
        )?;
        for s in self.per_label() {
            writeln!(
                f,
                "{:>17}: precision: {:6.2}%; recall: {:6.2}%; FB1: {:6.2}  {}  (gold {})",
                s.label,
                100.0 * s.precision,
                100.0 * s.recall,
                100.0 * s.f1,
                s.counts.found,
                s.support
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(text: &str) -> Vec<Vec<&str>> {
        text.split('|').map(|s| s.split_whitespace().collect()).collect()
    }

    #[test]
    fn conlleval_numbers_by_hand() {
        // gold: PER[0,2) LOC[3,4) | ORG[0,1) ; pred: PER[0,2) LOC[2,4) | ORG[0,1) PER[1,2)
        let gold = seqs("B-PER I-PER O B-LOC | B-ORG O");
        let pred = seqs("B-PER I-PER B-LOC I-LOC | B-ORG I-PER");
        let e = evaluate(&gold, &pred).unwrap();
        assert_eq!(e.counts(), Counts { gold: 3, found: 4, correct: 2 });
        assert_eq!((e.tokens, e.correct_tags, e.sentences), (6, 3, 2));
        assert!((e.precision() - 0.5).abs() < 1e-12);
        assert!((e.recall() - 2.0 / 3.0).abs() < 1e-12);
        assert!((e.f1() - 4.0 / 7.0).abs() < 1e-12);
        let per = e.per_label();
        let names: Vec<&str> = per.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(names, ["LOC", "ORG", "PER"]);
        assert_eq!(per[0].counts, Counts { gold: 1, found: 1, correct: 0 });
        assert_eq!(per[2].counts, Counts { gold: 1, found: 2, correct: 1 });
        assert_eq!(per[2].support, 1);
        assert!((per[2].precision - 0.5).abs() < 1e-12 && per[2].recall == 1.0);
    }

    #[test]
    fn a_label_only_predicted_scores_zero_not_nan() {
        let e = evaluate(&seqs("O O"), &seqs("B-X O")).unwrap();
        let x = &e.per_label()[0];
        assert_eq!((x.precision, x.recall, x.f1, x.support), (0.0, 0.0, 0.0, 0));
        let empty = evaluate::<Vec<&str>, Vec<&str>, &str, &str>(&[], &[]).unwrap();
        assert_eq!((empty.precision(), empty.recall(), empty.f1(), empty.accuracy()), (0.0, 0.0, 0.0, 0.0));
    }

    #[test]
    fn same_span_other_label_is_wrong() {
        let e = evaluate(&seqs("B-A I-A"), &seqs("B-B I-B")).unwrap();
        assert_eq!(e.counts(), Counts { gold: 1, found: 1, correct: 0 });
    }

    #[test]
    fn mismatched_lengths_are_errors() {
        assert!(matches!(
            evaluate(&seqs("O O | O"), &seqs("O O | O O")),
            Err(SequenceError::LengthMismatch { index: 1, gold: 1, pred: 2 })
        ));
        assert!(matches!(evaluate(&seqs("O"), &seqs("O | O")), Err(SequenceError::CountMismatch { .. })));
    }

    #[test]
    fn report_reads_like_conlleval() {
        let e = evaluate(&seqs("B-PER I-PER O B-LOC"), &seqs("B-PER I-PER O O")).unwrap();
        let report = e.to_string();
        let lines: Vec<&str> = report.lines().collect();
        assert_eq!(lines[0], "processed 4 tokens with 2 phrases; found: 1 phrases; correct: 1.");
        assert_eq!(lines[1], "accuracy:  75.00%; precision: 100.00%; recall:  50.00%; FB1:  66.67");
        assert_eq!(lines[2], "              LOC: precision:   0.00%; recall:   0.00%; FB1:   0.00  0  (gold 1)");
        assert_eq!(lines[3], "              PER: precision: 100.00%; recall: 100.00%; FB1: 100.00  1  (gold 1)");
    }
}
