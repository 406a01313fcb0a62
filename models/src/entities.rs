//! Entity extraction: a BiLSTM-CRF tagger over words, and the bookkeeping that turns its tag
//! paths into character spans of the caller's text.
//!
//! Two kinds of tagger (see [`crate::tagger`]):
//! - **encoder input** (English, BERT-BiLSTM-CRF): a word's features are the text encoder's state
//!   of the word's first sub-token, words being the tokenizer's pre-tokenisation (whitespace and
//!   punctuation); by default the last layer's state, or the states of several layers side by
//!   side (`encoder_layers` in its config). The encoder pass is the one the text lane already runs for embeddings, so a
//!   message needing both pays for one pass.
//! - **embeddings input** (Chinese): one token per character, the tagger's own embedding table.
//!
//! Spans come back as byte ranges of the input; the server turns them into character offsets.
use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::sequence::spans::spans;
use crate::tagger::{BiLstmCrf, InputKind};
use crate::encoder::{TextEncoder, TokenStates};
use crate::tokenize::TokenizedText;

/// The words of one tokenised text: per word, its first token and its byte range in the text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Words {
    pub first_token: Vec<usize>,
    pub bytes: Vec<(usize, usize)>,
}

impl Words {
    pub fn len(&self) -> usize {
        self.first_token.len()
    }
    pub fn is_empty(&self) -> bool {
        self.first_token.is_empty()
    }
}

/// Groups a text's tokens into the tokenizer's words (special tokens belong to none).
pub fn words_of(t: &TokenizedText) -> Words {
    let mut w = Words::default();
    let mut current: Option<u32> = None;
    for (i, (&word, &(s, e))) in t.words.iter().zip(&t.offsets).enumerate() {
        match word {
            Some(id) if Some(id) == current => {
                let last = w.bytes.last_mut().expect("a word is open");
                last.1 = last.1.max(e);
            }
            Some(id) => {
                current = Some(id);
                w.first_token.push(i);
                w.bytes.push((s, e));
            }
            None => current = None,
        }
    }
    w
}

/// Byte ranges of `words` joined by single spaces (the text a pre-tokenised sentence becomes).
pub fn joined(words: &[String]) -> (String, Vec<(usize, usize)>) {
    let mut text = String::new();
    let mut ranges = Vec::with_capacity(words.len());
    for (i, w) in words.iter().enumerate() {
        if i > 0 {
            text.push(' ');
        }
        ranges.push((text.len(), text.len() + w.len()));
        text.push_str(w);
    }
    (text, ranges)
}

/// For each tokenizer word, the index of the source word (`source` byte ranges) it starts in.
/// A source word the tokenizer splits (`o'clock`, `st.`) owns several tokenizer words.
pub fn source_of(words: &Words, source: &[(usize, usize)]) -> Vec<usize> {
    words
        .bytes
        .iter()
        .map(|&(s, _)| source.iter().position(|&(a, b)| a <= s && s < b).unwrap_or_else(|| source.len().saturating_sub(1)))
        .collect()
}

/// Source-word tags carried onto tokenizer words: the first piece of a source word keeps its
/// tag, later pieces continue the entity (`B-X` -> `I-X`, BMES `B-`/`M-` -> `M-X`, `E-`/`S-` stay
/// as the entity's end), so spans over pieces cover exactly the source word's span.
pub fn project_tags(source_tags: &[String], source_of: &[usize]) -> Vec<String> {
    let mut out = Vec::with_capacity(source_of.len());
    for (j, &k) in source_of.iter().enumerate() {
        let tag = &source_tags[k];
        let first = j == 0 || source_of[j - 1] != k;
        let last = j + 1 == source_of.len() || source_of[j + 1] != k;
        if first && last {
            out.push(tag.clone());
            continue;
        }
        let (prefix, label) = match tag.split_once('-') {
            Some((p, l)) => (p, l),
            None => {
                out.push(tag.clone());
                continue;
            }
        };
        let piece = match (prefix, first, last) {
            ("B", true, _) | ("I", _, _) => tag.clone(),
            ("B", false, _) => format!("I-{label}"),
            ("S", true, _) => format!("B-{label}"),
            ("S", false, false) | ("M", _, _) => format!("M-{label}"),
            ("S", false, true) => format!("E-{label}"),
            ("E", _, false) => format!("M-{label}"),
            _ => tag.clone(),
        };
        out.push(piece);
    }
    out
}

/// Tokenizer-word tags back onto source words: each source word takes its first piece's tag.
pub fn back_project(piece_tags: &[String], source_of: &[usize], n_source: usize) -> Vec<String> {
    let mut out = vec![String::from("O"); n_source];
    for (j, &k) in source_of.iter().enumerate() {
        if j == 0 || source_of[j - 1] != k {
            out[k] = piece_tags[j].clone();
        }
    }
    out
}

/// The states after `layers` of one pass, concatenated along features in that order (f32);
/// None: the last layer's. What a tagger without fine-tuned layers reads (training uses it
/// before a tagger exists; serving goes through [`tagger_states`]).
pub fn layer_states(encoder: &TextEncoder, inputs: &[&TokenizedText], layers: Option<&[usize]>) -> Result<TokenStates> {
    Ok(match layers {
        None => encoder.token_states(inputs)?,
        Some(layers) => {
            let (last, taps) = encoder.token_states_taps(inputs, layers)?;
            TokenStates { hidden: concat_taps(&taps)?, lens: last.lens }
        }
    })
}

/// The token states `tagger` (encoder input) reads from one pass of `encoder`: the states after
/// its `encoder_layers` side by side (or the last layer's), those above its `branch_from` from
/// its own fine-tuned layers.
pub fn tagger_states(encoder: &TextEncoder, inputs: &[&TokenizedText], tagger: &BiLstmCrf) -> Result<TokenStates> {
    let n = encoder.num_layers();
    let taps = encoder_taps(tagger, n);
    let (last, tapped) = encoder.token_states_taps(inputs, &taps)?;
    Ok(match features_from_taps(tagger, n, tapped, &last.lens)? {
        None => last,
        Some(hidden) => TokenStates { hidden, lens: last.lens },
    })
}

/// The taps `tagger` asks of a shared pass of an encoder with `num_layers` layers, for
/// [`features_from_taps`]: its `encoder_layers`; with fine-tuned layers, those at or below
/// `branch_from` and then `branch_from` itself (where its layers start). Empty: it reads the
/// last layer's states, which the pass returns anyway.
pub fn encoder_taps(tagger: &BiLstmCrf, num_layers: usize) -> Vec<usize> {
    let cfg = tagger.config();
    match (cfg.branch_from, &cfg.encoder_layers) {
        (None, None) => Vec::new(),
        (None, Some(layers)) => layers.clone(),
        (Some(k), _) => cfg.reads_layers(num_layers).into_iter().filter(|&l| l <= k).chain([k]).collect(),
    }
}

/// The tagger's token features `[T, features_width]` (f32) from the taps [`encoder_taps`]
/// asked for, in that order, running its fine-tuned layers if it has them (an ensemble's
/// members each their own, side by side); None when it reads the last layer's states as they
/// are.
pub fn features_from_taps(tagger: &BiLstmCrf, num_layers: usize, mut taps: Vec<Tensor>, lens: &[usize]) -> Result<Option<Tensor>> {
    let cfg = tagger.config();
    let Some(k) = cfg.branch_from else {
        return match taps.is_empty() {
            true => Ok(None),
            false => concat_taps(&taps).map(Some),
        };
    };
    let from = taps.pop().ok_or_else(|| ModelError::Unsupported("no states at the tagger's branch_from layer".into()))?;
    let layers = cfg.reads_layers(num_layers);
    let above: Vec<usize> = layers.iter().filter(|&&l| l > k).map(|&l| l - k).collect();
    let mut members = Vec::with_capacity(tagger.num_members());
    for member in tagger.each_member() {
        let branch = member
            .branch()
            .ok_or_else(|| ModelError::Unsupported("the tagger's config has branch_from but its fine-tuned layers are not loaded".into()))?;
        let (_, upper) = branch.layers().forward_taps(&from, lens, &above)?;
        let (mut fixed, mut upper) = (taps.iter().cloned(), upper.into_iter());
        let parts = layers
            .iter()
            .map(|&l| if l <= k { fixed.next() } else { upper.next() })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ModelError::Unsupported("the taps do not match the tagger's layers".into()))?;
        members.push(concat_taps(&parts)?);
    }
    Ok(Some(match members.len() {
        1 => members.remove(0),
        _ => Tensor::cat(&members, 1)?,
    }))
}

/// A tagger's features from the taps of its layers (see [`tagger_states`]): `[T, H * n]` f32.
pub fn concat_taps(taps: &[Tensor]) -> Result<Tensor> {
    Ok(Tensor::cat(taps, 1)?.to_dtype(DType::F32)?)
}

/// Word features `[words, hidden]` of one input: the state of each word's first token.
pub fn word_features(states: &Tensor, words: &Words) -> Result<Tensor> {
    let idx: Vec<u32> = words.first_token.iter().map(|&i| i as u32).collect();
    let idx = Tensor::from_vec(idx, words.len(), states.device())?;
    Ok(states.index_select(&idx, 0)?)
}

/// Pads per-input `[len_i, dim]` features to `[B, max_len, dim]` (zeros past each length).
pub fn pad_batch(features: &[Tensor], dim: usize, device: &Device) -> Result<Tensor> {
    let max = features.iter().map(|f| f.dim(0).unwrap_or(0)).max().unwrap_or(0).max(1);
    let rows = features
        .iter()
        .map(|f| {
            let n = f.dim(0)?;
            let f = f.to_dtype(DType::F32)?;
            if n == max {
                Ok(f)
            } else if n == 0 {
                Ok(Tensor::zeros((max, dim), DType::F32, device)?)
            } else {
                Ok(Tensor::cat(&[f, Tensor::zeros((max - n, dim), DType::F32, device)?], 0)?)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

/// One entity found in a text: `[start, end)` as byte offsets of the text.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    pub label: String,
    pub start: usize,
    pub end: usize,
    /// The smallest marginal probability (CRF forward-backward) of the path's tag over the
    /// entity's words: how sure the model is of the whole span.
    pub confidence: f32,
}

/// Turns each sequence's best path into entities over `units` (byte ranges of words or
/// characters), with confidences from the marginals `[B, L, T]`.
fn entities_of(tagger: &BiLstmCrf, emissions: &Tensor, lengths: &[usize], units: &[Vec<(usize, usize)>]) -> Result<Vec<Vec<Entity>>> {
    let paths = tagger.crf().decode(emissions, lengths)?;
    let marg: Vec<Vec<Vec<f32>>> = tagger.crf().marginals(emissions, lengths)?.to_vec3()?;
    let mut out = Vec::with_capacity(paths.len());
    for (b, path) in paths.iter().enumerate() {
        let names = tagger.tag_names(&path.tags);
        let found = spans(&names).map_err(|e| ModelError::Unsupported(format!("the tagger's tag set: {e}")))?;
        out.push(
            found
                .into_iter()
                .map(|s| {
                    let confidence =
                        (s.start..s.end).map(|t| marg[b][t][path.tags[t] as usize]).fold(1.0f32, f32::min);
                    Entity { label: s.label, start: units[b][s.start].0, end: units[b][s.end - 1].1, confidence }
                })
                .collect(),
        );
    }
    Ok(out)
}

/// Entities for a batch from the encoder's token states of the same batch (encoder input).
/// `states_of(i)` gives input `i`'s `[len, hidden]` states.
pub fn extract_from_states(
    tagger: &BiLstmCrf,
    inputs: &[&TokenizedText],
    states_of: impl Fn(usize) -> Result<Tensor>,
) -> Result<Vec<Vec<Entity>>> {
    if tagger.config().input != InputKind::Encoder {
        return Err(ModelError::Unsupported("this tagger reads characters, not encoder states".into()));
    }
    let words: Vec<Words> = inputs.iter().map(|t| words_of(t)).collect();
    let feats = (0..inputs.len())
        .map(|i| word_features(&states_of(i)?, &words[i]))
        .collect::<Result<Vec<_>>>()?;
    let dim = tagger.features_width();
    let device = feats.first().map(|f| f.device().clone()).unwrap_or(Device::Cpu);
    let lengths: Vec<usize> = words.iter().map(Words::len).collect();
    let mut out = vec![Vec::new(); inputs.len()];
    // Texts with no words (only punctuation the tokenizer drops) have no entities.
    let live: Vec<usize> = (0..inputs.len()).filter(|&i| lengths[i] > 0).collect();
    if live.is_empty() {
        return Ok(out);
    }
    let x = pad_batch(&live.iter().map(|&i| feats[i].clone()).collect::<Vec<_>>(), dim, &device)?;
    let live_lens: Vec<usize> = live.iter().map(|&i| lengths[i]).collect();
    let emissions = tagger.forward_emissions(&x, &live_lens)?;
    let units: Vec<Vec<(usize, usize)>> = live.iter().map(|&i| words[i].bytes.clone()).collect();
    for (k, ents) in entities_of(tagger, &emissions, &live_lens, &units)?.into_iter().enumerate() {
        out[live[k]] = ents;
    }
    Ok(out)
}

/// Entities for a batch of texts, one token per character (embeddings input).
pub fn extract_from_chars(tagger: &BiLstmCrf, texts: &[&str], device: &Device) -> Result<Vec<Vec<Entity>>> {
    let units: Vec<Vec<(usize, usize)>> =
        texts.iter().map(|t| t.char_indices().map(|(i, c)| (i, i + c.len_utf8())).collect()).collect();
    let mut out = vec![Vec::new(); texts.len()];
    let live: Vec<usize> = (0..texts.len()).filter(|&i| !units[i].is_empty()).collect();
    if live.is_empty() {
        return Ok(out);
    }
    let live_texts: Vec<&str> = live.iter().map(|&i| texts[i]).collect();
    let (ids, lengths) = tagger.char_ids(&live_texts, device)?;
    let emissions = tagger.forward_emissions(&ids, &lengths)?;
    let live_units: Vec<Vec<(usize, usize)>> = live.iter().map(|&i| units[i].clone()).collect();
    for (k, ents) in entities_of(tagger, &emissions, &lengths, &live_units)?.into_iter().enumerate() {
        out[live[k]] = ents;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn pieces_continue_the_source_words_entity_and_come_back() {
        // source words: [fly, o'clock, boston]; the tokenizer splits o'clock into o, ', clock.
        let src = s(&["O", "B-time", "B-city"]);
        let source_of = vec![0, 1, 1, 1, 2];
        let pieces = project_tags(&src, &source_of);
        assert_eq!(pieces, s(&["O", "B-time", "I-time", "I-time", "B-city"]));
        assert_eq!(back_project(&pieces, &source_of, 3), src);
        let bmes = project_tags(&s(&["S-LOC", "B-PER", "E-PER"]), &[0, 0, 1, 2, 2]);
        assert_eq!(bmes, s(&["B-LOC", "E-LOC", "B-PER", "M-PER", "E-PER"]));
    }

    #[test]
    fn joined_words_have_their_byte_ranges() {
        let (text, r) = joined(&s(&["größe", "42", "☕"]));
        assert_eq!(text, "größe 42 ☕");
        assert_eq!(r.iter().map(|&(a, b)| &text[a..b]).collect::<Vec<_>>(), vec!["größe", "42", "☕"]);
    }
}
