//! The readers on the real data sets that `scripts/fetch-tagger-data.sh` unpacks into
//! model-store/data (or `$CONCIERGE_TEST_DATA_DIR`). Each test says plainly that it skips when
//! its file is not there. Counts and entity numbers were checked with a separate Python reader
//! and seqeval 1.2.2 (M- read as I-) when this was written.
use std::collections::BTreeMap;
use std::path::PathBuf;

use concierge_models::sequence::{
    evaluate, read_atis, read_msra, repo_data_dir, scheme_of, spans, Scheme, Sentence, Span,
};

fn data_file(rel: &str) -> Option<PathBuf> {
    let path = repo_data_dir().join(rel);
    if path.is_file() {
        Some(path)
    } else {
        eprintln!("SKIPPED: {} is not there; run scripts/fetch-tagger-data.sh to test on it", path.display());
        None
    }
}

/// Entities per label, as conlleval reads the tags.
fn entities(sentences: &[Sentence]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for s in sentences {
        for span in spans(&s.tags).unwrap() {
            *out.entry(span.label).or_insert(0) += 1;
        }
    }
    out
}

fn tokens(sentences: &[Sentence]) -> usize {
    sentences.iter().map(|s| s.tokens.len()).sum()
}

/// Gold against itself: every entity found, every tag right, no error on the real tag set.
fn scores_perfectly_against_itself(sentences: &[Sentence]) {
    let tags: Vec<&Vec<String>> = sentences.iter().map(|s| &s.tags).collect();
    let e = evaluate(&tags, &tags).unwrap();
    assert_eq!((e.f1(), e.accuracy()), (1.0, 1.0));
    assert_eq!(e.tokens, tokens(sentences));
}

#[test]
fn atis_train_dev() {
    let Some(path) = data_file("atis/train_dev") else { return };
    let s = read_atis(&path).unwrap();
    assert_eq!(s.len(), 4_978);
    assert_eq!(tokens(&s), 56_200);
    assert!(s.iter().all(|s| s.tokens.len() == s.tags.len() && s.intent.is_some()));
    let ents = entities(&s);
    assert_eq!((ents.values().sum::<usize>(), ents.len()), (16_560, 79));
    assert_eq!(ents["toloc.city_name"], 4_343);
    assert_eq!(ents["fromloc.city_name"], 4_326);
    assert_eq!(scheme_of(s.iter().flat_map(|s| &s.tags)).unwrap(), Scheme::Bio);
    let intents: std::collections::BTreeSet<&str> = s.iter().map(|s| s.intent.as_deref().unwrap()).collect();
    assert_eq!(intents.len(), 22);
    assert!(intents.contains("atis_flight;atis_airfare"));

    // line 1: i:O want:O to:O fly:O from:O baltimore:B-fromloc.city_name to:O dallas:B-toloc.city_name
    //         round:B-round_trip trip:I-round_trip <=> atis_flight
    let first = &s[0];
    assert_eq!(first.tokens.join(" "), "i want to fly from baltimore to dallas round trip");
    assert_eq!(first.intent.as_deref(), Some("atis_flight"));
    assert_eq!(
        spans(&first.tags).unwrap(),
        [Span::new("fromloc.city_name", 5, 6), Span::new("toloc.city_name", 7, 8), Span::new("round_trip", 8, 10)]
    );
    let last = s.last().unwrap();
    assert_eq!(last.tokens.len(), 16);
    assert_eq!((last.tokens[7].as_str(), last.tags[7].as_str()), ("new", "B-fromloc.state_name"));
    scores_perfectly_against_itself(&s);
}

#[test]
fn atis_test() {
    let Some(path) = data_file("atis/test") else { return };
    let s = read_atis(&path).unwrap();
    assert_eq!(s.len(), 893);
    assert_eq!(tokens(&s), 9_164);
    let ents = entities(&s);
    assert_eq!((ents.values().sum::<usize>(), ents.len()), (2_837, 69));
    assert_eq!((ents["toloc.city_name"], ents["fromloc.city_name"]), (716, 704));
    let intents: std::collections::BTreeSet<&str> = s.iter().map(|s| s.intent.as_deref().unwrap()).collect();
    assert_eq!(intents.len(), 20);
    // line 893: find me a flight that flies from memphis to tacoma <=> atis_flight
    let last = s.last().unwrap();
    assert_eq!(last.tokens.join(" "), "find me a flight that flies from memphis to tacoma");
    assert_eq!(spans(&last.tags).unwrap(), [Span::new("fromloc.city_name", 7, 8), Span::new("toloc.city_name", 9, 10)]);
    scores_perfectly_against_itself(&s);
}

fn by_label(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|&(l, n)| (l.to_owned(), n)).collect()
}

#[test]
fn msra_train() {
    let Some(path) = data_file("msra/msra_train.txt") else { return };
    let s = read_msra(&path).unwrap();
    assert_eq!(s.len(), 50_289);
    assert_eq!(tokens(&s), 2_153_462);
    assert!(s.iter().all(|s| s.intent.is_none() && s.tokens.iter().all(|t| t.chars().count() == 1)));
    assert_eq!(s.iter().map(|s| s.tokens.len()).max(), Some(100));
    assert_eq!(scheme_of(s.iter().flat_map(|s| &s.tags)).unwrap(), Scheme::Bmes);
    // seqeval with M- as I- finds the same: 74,444 entities
    assert_eq!(entities(&s), by_label(&[("LOC", 36_430), ("ORG", 20_487), ("PER", 17_527)]));
    assert!(s[0].tokens.concat().starts_with("当希望工程救助的百万儿童成长起来"));
    let third = &s[2];
    assert_eq!(third.tokens.len(), 38);
    assert!(third.tokens.concat().starts_with("因有关日寇在京掠夺文物详情"));
    assert_eq!(
        spans(&third.tags).unwrap(),
        [Span::new("LOC", 3, 4), Span::new("LOC", 6, 7), Span::new("LOC", 27, 29)]
    );
    // sentences cut at 100 characters may start inside an entity: tags kept as given
    assert_eq!(s.iter().filter(|s| s.tags[0].starts_with("M-") || s.tags[0].starts_with("E-")).count(), 6);
    scores_perfectly_against_itself(&s);
}

#[test]
fn msra_test() {
    let Some(path) = data_file("msra/msra_test.txt") else { return };
    let s = read_msra(&path).unwrap();
    assert_eq!(s.len(), 5_000);
    assert_eq!(tokens(&s), 189_018);
    assert_eq!(entities(&s), by_label(&[("LOC", 2_964), ("ORG", 1_418), ("PER", 2_075)]));
    assert_eq!(s[0].tokens.concat(), "因为，形象问题是一个综合概念。");
    assert!(s[0].tags.iter().all(|t| t == "O"));
    // sentence 8: 问题是这种『柏拉图』式的兴趣爱好… with 柏拉图 B-PER M-PER E-PER
    assert_eq!(&s[7].tags[6..9], ["B-PER", "M-PER", "E-PER"]);
    assert_eq!(spans(&s[7].tags).unwrap(), [Span::new("PER", 6, 9)]);
    assert_eq!(s[7].tokens[6..9].concat(), "柏拉图");
    assert!(s.last().unwrap().tokens.concat().ends_with("对瓦西里斯幸福的家庭充满赞誉。"));
    assert_eq!(s.iter().filter(|s| s.tags[0].starts_with("M-") || s.tags[0].starts_with("E-")).count(), 11);
    scores_perfectly_against_itself(&s);
}
