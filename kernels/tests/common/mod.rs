//! Pieces the kernel tests share: a seeded generator and plain-loop references.
#![allow(dead_code)]

/// A small deterministic generator (xorshift64*), so every case is reproducible.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-scale, scale).
    pub fn float(&mut self, scale: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }
    pub fn floats(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.float(scale)).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Textbook Viterbi for one sequence (`em[t][j]`, `trans[i][j]`), f32, first maximum wins:
/// the path and its score.
pub fn viterbi_ref(em: &[Vec<f32>], trans: &[Vec<f32>], start: &[f32], end: &[f32]) -> (Vec<u32>, f32) {
    let t = start.len();
    let mut score: Vec<f32> = (0..t).map(|j| em[0][j] + start[j]).collect();
    let mut back: Vec<Vec<usize>> = Vec::new();
    for e in &em[1..] {
        let mut next = vec![0f32; t];
        let mut bp = vec![0usize; t];
        for j in 0..t {
            let mut best = f32::NEG_INFINITY;
            for i in 0..t {
                let v = score[i] + trans[i][j] + e[j];
                if i == 0 || v > best {
                    best = v;
                    bp[j] = i;
                }
            }
            next[j] = best;
        }
        score = next;
        back.push(bp);
    }
    let mut tag = 0;
    for j in 1..t {
        if score[j] + end[j] > score[tag] + end[tag] {
            tag = j;
        }
    }
    let best = score[tag] + end[tag];
    let mut path = vec![tag as u32];
    for bp in back.iter().rev() {
        tag = bp[tag];
        path.push(tag as u32);
    }
    path.reverse();
    (path, best)
}

/// A path's score in f64.
pub fn path_score(em: &[Vec<f32>], trans: &[Vec<f32>], start: &[f32], end: &[f32], path: &[u32]) -> f64 {
    let p = |i: usize| path[i] as usize;
    let mut s = start[p(0)] as f64 + end[p(path.len() - 1)] as f64;
    for i in 0..path.len() {
        s += em[i][p(i)] as f64;
        if i > 0 {
            s += trans[p(i - 1)][p(i)] as f64;
        }
    }
    s
}

/// Mean of each sequence's rows (in f64), then over max(norm, 1e-12) if `normalize`.
pub fn pool_ref(x: &[f32], h: usize, lens: &[usize], normalize: bool) -> Vec<f32> {
    let mut out = Vec::with_capacity(lens.len() * h);
    let mut start = 0;
    for &len in lens {
        let mut row = vec![0f64; h];
        for r in start..start + len {
            for c in 0..h {
                row[c] += x[r * h + c] as f64;
            }
        }
        row.iter_mut().for_each(|v| *v /= len as f64);
        if normalize {
            let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
            row.iter_mut().for_each(|v| *v /= norm);
        }
        out.extend(row.iter().map(|&v| v as f32));
        start += len;
    }
    out
}

/// The indices of a row's best k by a full sort with an explicit comparator: larger first,
/// -0.0 == +0.0, NaN after everything, ties by lower index.
pub fn topk_ref(row: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        let (x, y) = (row[a as usize], row[b as usize]);
        let by_value = match (x.is_nan(), y.is_nan()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            (false, false) => y.partial_cmp(&x).unwrap(),
        };
        by_value.then(a.cmp(&b))
    });
    idx.truncate(k);
    idx
}

/// Scores with many exact ties, NaNs, infinities and signed zeros.
pub fn nasty_scores(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.below(20) {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            3 => 0.0,
            4 => -0.0,
            5..=9 => (rng.below(5) as f32 - 2.0) * 0.5,
            _ => rng.float(10.0),
        })
        .collect()
}
