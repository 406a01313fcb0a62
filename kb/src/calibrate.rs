//! Choosing a collection's default `min_score` from labelled pairs: the threshold that best
//! separates relevant (query, document) pairs from the rest, by F1.

/// A chosen threshold and how it does on the pairs it was chosen from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    pub min_score: f32,
    pub precision: f32,
    pub recall: f32,
    pub f1: f32,
}

/// The threshold `t` (a hit is kept when `score >= t`) with the highest F1 over `pairs`
/// (score, relevant). It lies halfway between the last kept score and the next one, so small
/// score noise does not flip the pairs at the edge. Ties in F1 go to the higher threshold.
/// None when no pair is relevant (there is nothing to keep) or a score is not finite.
pub fn calibrate(pairs: &[(f32, bool)]) -> Option<Calibration> {
    let positives = pairs.iter().filter(|p| p.1).count();
    if positives == 0 || pairs.iter().any(|p| !p.0.is_finite()) {
        return None;
    }
    let mut sorted = pairs.to_vec();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut best: Option<(f32, usize, usize)> = None; // (f1, kept, true positives)
    let (mut kept, mut tp) = (0, 0);
    let mut i = 0;
    while i < sorted.len() {
        // Pairs with equal scores are kept or dropped together.
        let s = sorted[i].0;
        while i < sorted.len() && sorted[i].0 == s {
            kept += 1;
            tp += sorted[i].1 as usize;
            i += 1;
        }
        let f1 = 2.0 * tp as f32 / (kept + positives) as f32;
        if best.is_none_or(|b| f1 > b.0) {
            best = Some((f1, kept, tp));
        }
    }
    let (f1, kept, tp) = best?;
    let last_kept = sorted[kept - 1].0;
    let min_score = match sorted.get(kept) {
        Some(next) => (last_kept + next.0) / 2.0,
        None => last_kept,
    };
    Some(Calibration { min_score, precision: tp as f32 / kept as f32, recall: tp as f32 / positives as f32, f1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against trying every threshold there is.
    #[test]
    fn matches_brute_force() {
        let mut seed = 11u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32
        };
        for case in 0..200 {
            let n = 1 + case % 17;
            let pairs: Vec<(f32, bool)> = (0..n)
                .map(|_| {
                    let rel = next() < 0.4;
                    // Relevant pairs score higher on average; some scores repeat.
                    let s = ((next() + if rel { 0.3 } else { 0.0 }) * 8.0).round() / 8.0;
                    (s, rel)
                })
                .collect();
            let got = calibrate(&pairs);
            if !pairs.iter().any(|p| p.1) {
                assert!(got.is_none());
                continue;
            }
            let got = got.unwrap();
            let f1_at = |t: f32| {
                let tp = pairs.iter().filter(|p| p.1 && p.0 >= t).count();
                let kept = pairs.iter().filter(|p| p.0 >= t).count();
                let pos = pairs.iter().filter(|p| p.1).count();
                2.0 * tp as f32 / (kept + pos) as f32
            };
            let best = pairs.iter().map(|p| f1_at(p.0)).fold(0f32, f32::max);
            assert!((got.f1 - best).abs() < 1e-6, "case {case}: {got:?} vs best f1 {best}");
            assert!((f1_at(got.min_score) - got.f1).abs() < 1e-6, "case {case}: the threshold does not give its f1");
        }
    }

    #[test]
    fn separable_pairs_get_a_threshold_between_them() {
        let c = calibrate(&[(0.9, true), (0.8, true), (0.5, false), (0.3, false)]).unwrap();
        assert_eq!((c.precision, c.recall, c.f1), (1.0, 1.0, 1.0));
        assert!((c.min_score - 0.65).abs() < 1e-6);
        assert!(calibrate(&[(0.5, false)]).is_none());
    }
}
