//! Spans and conlleval scores held to seqeval 1.2.2's default (conlleval-compatible) mode, on
//! the cases of `models/tests/fixtures/conlleval/*.json` (hand-picked ill-formed sequences and
//! seeded random corpora, written by `scripts/make_conlleval_fixture.py`): counts and spans
//! exactly, ratios within 1e-9.
use std::path::Path;

use concierge_models::sequence::{evaluate, scheme_of, spans, Scheme};
use serde_json::Value;

const TOL: f64 = 1e-9;

fn strings(v: &Value) -> Vec<Vec<String>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_owned()).collect())
        .collect()
}

fn spans_of(v: &Value) -> Vec<Vec<(String, usize, usize)>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    let at = |i: usize| t[i].as_u64().unwrap() as usize;
                    (t[0].as_str().unwrap().to_owned(), at(1), at(2))
                })
                .collect()
        })
        .collect()
}

fn ours(tags: &[Vec<String>]) -> Vec<Vec<(String, usize, usize)>> {
    tags.iter().map(|t| spans(t).unwrap().into_iter().map(|s| (s.label, s.start, s.end)).collect()).collect()
}

fn usize_at(v: &Value, key: &str) -> usize {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} missing")) as usize
}

/// seqeval leaves a ratio out where it is undefined (no token, no entity); ours is 0 there.
fn close(what: &str, ours: f64, expected: Option<f64>) {
    let expected = expected.unwrap_or(0.0);
    assert!((ours - expected).abs() <= TOL, "{what}: ours {ours}, seqeval {expected}");
}

fn check_file(name: &str, scheme: Scheme) -> usize {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/conlleval").join(name);
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    for case in cases {
        let what = format!("{name} / {}", case["name"].as_str().unwrap());
        let (gold, pred) = (strings(&case["gold"]), strings(&case["pred"]));
        let exp = &case["expected"];
        assert_eq!(ours(&gold), spans_of(&exp["gold_spans"]), "{what}: gold spans");
        assert_eq!(ours(&pred), spans_of(&exp["pred_spans"]), "{what}: predicted spans");

        let e = evaluate(&gold, &pred).unwrap();
        let c = e.counts();
        assert_eq!(e.tokens, usize_at(exp, "tokens"), "{what}");
        assert_eq!(e.correct_tags, usize_at(exp, "correct_tags"), "{what}");
        let counts = |v: &Value| (usize_at(v, "gold"), usize_at(v, "found"), usize_at(v, "correct"));
        assert_eq!((c.gold, c.found, c.correct), counts(exp), "{what}");
        close(&format!("{what}: accuracy"), e.accuracy(), exp["accuracy"].as_f64());
        close(&format!("{what}: precision"), e.precision(), exp["precision"].as_f64());
        close(&format!("{what}: recall"), e.recall(), exp["recall"].as_f64());
        close(&format!("{what}: f1"), e.f1(), exp["f1"].as_f64());

        let per = e.per_label();
        let expected = exp["per_label"].as_array().map(Vec::as_slice).unwrap_or_default();
        let names: Vec<&str> = per.iter().map(|s| s.label.as_str()).collect();
        let exp_names: Vec<&str> = expected.iter().map(|s| s["label"].as_str().unwrap()).collect();
        assert_eq!(names, exp_names, "{what}: labels");
        for (s, x) in per.iter().zip(expected) {
            let w = format!("{what}: {}", s.label);
            assert_eq!(s.support, usize_at(x, "support"), "{w}");
            assert_eq!((s.counts.gold, s.counts.found, s.counts.correct), counts(x), "{w}");
            close(&format!("{w}: precision"), s.precision, x["precision"].as_f64());
            close(&format!("{w}: recall"), s.recall, x["recall"].as_f64());
            close(&format!("{w}: f1"), s.f1, x["f1"].as_f64());
        }

        // Random corpora use every letter of their scheme, so detection must find it.
        if case["name"].as_str().unwrap().starts_with("random") {
            assert_eq!(scheme_of(gold.iter().chain(&pred).flatten()).unwrap(), scheme, "{what}");
        }
    }
    cases.len()
}

#[test]
fn bio_matches_seqeval() {
    assert!(check_file("bio.json", Scheme::Bio) >= 20);
}

#[test]
fn bioes_matches_seqeval() {
    assert!(check_file("bioes.json", Scheme::Bioes) >= 20);
}

#[test]
fn bmes_matches_seqeval_with_m_as_i() {
    assert!(check_file("bmes.json", Scheme::Bmes) >= 20);
}
