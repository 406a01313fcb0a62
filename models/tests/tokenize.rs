//! Token -> word and token -> byte-offset maps on tricky text (accents, CJK, emoji), which the
//! word-level heads use to give character spans back.
mod common;

use concierge_models::{ModelSource, TextEncoder};

#[test]
fn offsets_are_char_boundaries_and_words_cover_the_text() {
    let enc = TextEncoder::load(&ModelSource::Dir(common::default_model_dir()), &candle_core::Device::Cpu, candle_core::DType::F32, None).unwrap();
    for text in ["Größe 42, café ☕ in Zürich?", "订单号 A-1029 还没到 😀😀", "  spaces\tand\nnew lines  ", "e\u{301}clair (decomposed)"] {
        let t = enc.tokenize(0, text, false).unwrap();
        assert_eq!(t.words.len(), t.len());
        assert_eq!(t.offsets.len(), t.len());
        assert_eq!((t.words[0], t.words[t.len() - 1]), (None, None), "[CLS] and [SEP] have no word");
        let mut last_word = None;
        for (i, (&w, &(s, e))) in t.words.iter().zip(&t.offsets).enumerate().skip(1).take(t.len() - 2) {
            let w = w.unwrap_or_else(|| panic!("{text:?}: token {i} has no word"));
            assert!(last_word.is_none_or(|l| w >= l), "{text:?}: words go backwards at token {i}");
            last_word = Some(w);
            assert!(s < e && text.is_char_boundary(s) && text.is_char_boundary(e), "{text:?}: token {i} at {s}..{e}");
            assert!(!text[s..e].trim().is_empty(), "{text:?}: token {i} covers only whitespace");
        }
        // Every non-space character of the text is covered by some token.
        for (b, c) in text.char_indices().filter(|(_, c)| !c.is_whitespace()) {
            assert!(t.offsets.iter().any(|&(s, e)| s <= b && b < e), "{text:?}: {c:?} at byte {b} is in no token");
        }
    }
}
