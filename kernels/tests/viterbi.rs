//! The CPU Viterbi kernel against a textbook implementation and against enumeration of every
//! path, on seeded random CRFs; padding, ties and bad input.
mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::{path_score, viterbi_ref, Rng};
use concierge_kernels::viterbi::viterbi_decode;

struct Case {
    em: Vec<f32>,
    trans: Vec<f32>,
    start: Vec<f32>,
    end: Vec<f32>,
    lengths: Vec<usize>,
    l: usize,
    t: usize,
}

impl Case {
    fn random(rng: &mut Rng, lengths: Vec<usize>, l: usize, t: usize) -> Self {
        let b = lengths.len();
        Case {
            em: rng.floats(b * l * t, 3.0),
            trans: rng.floats(t * t, 2.0),
            start: rng.floats(t, 2.0),
            end: rng.floats(t, 2.0),
            lengths,
            l,
            t,
        }
    }

    fn decode(&self) -> Result<(Vec<Vec<u32>>, Vec<f32>)> {
        let (b, l, t) = (self.lengths.len(), self.l, self.t);
        let dev = Device::Cpu;
        Ok(viterbi_decode(
            &Tensor::from_slice(&self.em, (b, l, t), &dev)?,
            &self.lengths,
            &Tensor::from_slice(&self.trans, (t, t), &dev)?,
            &Tensor::from_slice(&self.start, t, &dev)?,
            &Tensor::from_slice(&self.end, t, &dev)?,
        )?)
    }

    /// Sequence s's emissions `[len][T]` and the transitions `[T][T]`.
    fn seq(&self, s: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let (l, t) = (self.l, self.t);
        let em = (0..self.lengths[s]).map(|i| self.em[(s * l + i) * t..(s * l + i + 1) * t].to_vec()).collect();
        let trans = self.trans.chunks(t).map(<[f32]>::to_vec).collect();
        (em, trans)
    }
}

#[test]
fn matches_textbook_viterbi_on_odd_sizes() -> Result<()> {
    let mut rng = Rng(0x5eed_0001);
    for &(ref lengths, l, t) in &[
        (vec![1usize], 1usize, 1usize),
        (vec![1, 1, 1], 1, 5),
        (vec![17, 3, 1], 17, 5),
        (vec![17], 17, 1),
        (vec![5, 17, 9], 17, 130),
        (vec![2, 1, 2, 1], 3, 2),
        (vec![40; 8], 40, 33),
    ] {
        let case = Case::random(&mut rng, lengths.clone(), l, t);
        let (paths, scores) = case.decode()?;
        for s in 0..lengths.len() {
            let (em, trans) = case.seq(s);
            let (want, want_score) = viterbi_ref(&em, &trans, &case.start, &case.end);
            assert_eq!(paths[s], want, "B={} L={l} T={t} seq {s}", lengths.len());
            assert_eq!(scores[s].to_bits(), want_score.to_bits(), "score, B={} L={l} T={t} seq {s}", lengths.len());
            let exact = path_score(&em, &trans, &case.start, &case.end, &paths[s]);
            assert!((scores[s] as f64 - exact).abs() <= 1e-5 * exact.abs().max(1.0), "{} vs {exact}", scores[s]);
        }
    }
    Ok(())
}

#[test]
fn equals_brute_force_enumeration() -> Result<()> {
    let mut rng = Rng(0x5eed_0002);
    for case_no in 0..60 {
        let t = 1 + case_no % 4;
        let b = 1 + rng.below(3);
        let lengths: Vec<usize> = (0..b).map(|_| 1 + rng.below(5)).collect();
        let l = lengths.iter().max().unwrap() + case_no % 2;
        let case = Case::random(&mut rng, lengths.clone(), l, t);
        let (paths, scores) = case.decode()?;
        for s in 0..b {
            let (em, trans) = case.seq(s);
            let n = lengths[s];
            let mut best = (f64::NEG_INFINITY, Vec::new());
            for mut code in 0..t.pow(n as u32) {
                let path: Vec<u32> = (0..n)
                    .map(|_| {
                        let tag = (code % t) as u32;
                        code /= t;
                        tag
                    })
                    .collect();
                let v = path_score(&em, &trans, &case.start, &case.end, &path);
                if v > best.0 {
                    best = (v, path);
                }
            }
            assert_eq!(paths[s], best.1, "case {case_no} seq {s}");
            assert!((scores[s] as f64 - best.0).abs() < 1e-4, "case {case_no} seq {s}: {} vs {}", scores[s], best.0);
        }
    }
    Ok(())
}

#[test]
fn padding_never_matters() -> Result<()> {
    let mut rng = Rng(0x5eed_0003);
    let mut case = Case::random(&mut rng, vec![3, 11, 1], 11, 7);
    let clean = case.decode()?;
    // Poison every padded position: NaN, infinities, huge values.
    let poison = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30];
    for (s, &n) in case.lengths.clone().iter().enumerate() {
        for i in n..case.l {
            for j in 0..case.t {
                case.em[(s * case.l + i) * case.t + j] = poison[(i + j) % poison.len()];
            }
        }
    }
    let dirty = case.decode()?;
    assert_eq!(clean.0, dirty.0);
    assert_eq!(
        clean.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        dirty.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(dirty.0.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 11, 1]);
    Ok(())
}

#[test]
fn ties_go_to_the_lowest_tag() -> Result<()> {
    // Everything zero: every path scores 0, the all-zero path wins.
    let case = Case {
        em: vec![0.0; 2 * 4 * 3],
        trans: vec![0.0; 9],
        start: vec![0.0; 3],
        end: vec![0.0; 3],
        lengths: vec![4, 2],
        l: 4,
        t: 3,
    };
    let (paths, scores) = case.decode()?;
    assert_eq!(paths, vec![vec![0, 0, 0, 0], vec![0, 0]]);
    assert_eq!(scores, vec![0.0, 0.0]);
    // Tags 1 and 2 tie above tag 0 at every step: tag 1 everywhere.
    let em = [[0.0f32, 1.0, 1.0]; 3].concat();
    let case = Case { em, trans: vec![0.0; 9], start: vec![0.0; 3], end: vec![0.0; 3], lengths: vec![3], l: 3, t: 3 };
    let (paths, scores) = case.decode()?;
    assert_eq!((paths[0].clone(), scores[0]), (vec![1, 1, 1], 3.0));
    Ok(())
}

#[test]
fn half_precision_emissions_are_decoded_in_f32() -> Result<()> {
    let mut rng = Rng(0x5eed_0004);
    let case = Case::random(&mut rng, vec![6, 4], 6, 5);
    let dev = Device::Cpu;
    let em16 = Tensor::from_slice(&case.em, (2, 6, 5), &dev)?.to_dtype(DType::F16)?;
    let rounded = Case { em: em16.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, ..case };
    let t = |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, &dev);
    let got = viterbi_decode(
        &em16,
        &rounded.lengths,
        &t(&rounded.trans, &[5, 5])?,
        &t(&rounded.start, &[5])?,
        &t(&rounded.end, &[5])?,
    )?;
    assert_eq!(got, rounded.decode()?);
    Ok(())
}

#[test]
fn bad_input_is_an_error_that_says_what() -> Result<()> {
    let dev = Device::Cpu;
    let em = Tensor::zeros((2, 3, 4), DType::F32, &dev)?;
    let tr = Tensor::zeros((4, 4), DType::F32, &dev)?;
    let v = Tensor::zeros(4, DType::F32, &dev)?;
    let err = |r: candle_core::Result<(Vec<Vec<u32>>, Vec<f32>)>| r.unwrap_err().to_string();
    assert!(err(viterbi_decode(&em, &[3], &tr, &v, &v)).contains("1 lengths for a batch of 2"));
    assert!(err(viterbi_decode(&em, &[3, 0], &tr, &v, &v)).contains("sequence 1 has length 0"));
    assert!(err(viterbi_decode(&em, &[4, 1], &tr, &v, &v)).contains("sequence 0 has length 4"));
    let tr3 = Tensor::zeros((3, 4), DType::F32, &dev)?;
    assert!(err(viterbi_decode(&em, &[3, 1], &tr3, &v, &v)).contains("transitions is [3, 4]"));
    let v5 = Tensor::zeros(5, DType::F32, &dev)?;
    assert!(err(viterbi_decode(&em, &[3, 1], &tr, &v, &v5)).contains("end is [5]"));
    assert!(err(viterbi_decode(&em.flatten_all()?, &[3, 1], &tr, &v, &v)).contains("[batch, length, tags]"));
    let ids = Tensor::zeros((2, 3, 4), DType::U32, &dev)?;
    assert!(err(viterbi_decode(&ids, &[3, 1], &tr, &v, &v)).contains("float dtype"));
    let (paths, scores) = viterbi_decode(&Tensor::zeros((0, 3, 4), DType::F32, &dev)?, &[], &tr, &v, &v)?;
    assert!(paths.is_empty() && scores.is_empty());
    Ok(())
}
