//! Exact top-k by inner product: the queries of a batch are stacked into one matrix and the
//! collection's rows are scanned once per batch in L2-sized blocks (so concurrent searches share
//! the memory traffic that bounds a scan), split over the CPU pool. Each worker keeps a bounded
//! min-heap per query; the metadata filter and `min_score` are only checked for scores that
//! would enter a heap.
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;

use rayon::prelude::*;

use crate::collection::{Entry, Rows};

/// One search against one collection.
#[derive(Debug, Clone)]
pub struct Query {
    pub vector: Vec<f32>,
    pub top_k: usize,
    /// Leave out hits scoring below this; `None`: the collection's default.
    pub min_score: Option<f32>,
    /// Exact-match metadata: a hit must have every pair.
    pub filter: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct Hit {
    pub score: f32,
    pub entry: Arc<Entry>,
}

/// Rows per block: 256 x 384 f32 is 384 KiB, which stays in L2 while every query tile of the
/// batch passes over it.
const BLOCK_ROWS: usize = 256;
/// Below this many rows a search runs on one thread.
const PARALLEL_MIN_ROWS: usize = 4096;

#[derive(Clone, Copy)]
struct Scored {
    score: f32,
    row: u32,
}

// Order: better = higher score, then lower row (ties resolve the same way every time).
impl Ord for Scored {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.row.cmp(&self.row))
    }
}
impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Scored {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Scored {}

/// The k best seen so far: a min-heap whose top is the worst kept.
struct TopK {
    k: usize,
    heap: BinaryHeap<std::cmp::Reverse<Scored>>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self { k, heap: BinaryHeap::with_capacity(k.min(4096) + 1) }
    }

    /// Would `s` be kept?
    #[inline]
    fn admits(&self, s: Scored) -> bool {
        self.k > 0 && (self.heap.len() < self.k || self.heap.peek().is_some_and(|w| s > w.0))
    }

    #[inline]
    fn push(&mut self, s: Scored) {
        if self.heap.len() == self.k {
            self.heap.pop();
        }
        self.heap.push(std::cmp::Reverse(s));
    }
}

fn matches(entry: &Entry, filter: &[(String, String)]) -> bool {
    filter.iter().all(|(k, v)| entry.metadata.get(k) == Some(v))
}

pub(crate) fn top_k(rows: &Rows, d: usize, queries: &[&Query], default_min: Option<f32>) -> Vec<Vec<Hit>> {
    let n = rows.entries.len();
    let nq = queries.len();
    if n == 0 || nq == 0 {
        return vec![Vec::new(); nq];
    }
    let mut q = Vec::with_capacity(nq * d);
    for query in queries {
        assert_eq!(query.vector.len(), d, "query of the wrong dimension reached the scan");
        q.extend_from_slice(&query.vector);
    }
    let floors: Vec<f32> = queries.iter().map(|q| q.min_score.or(default_min).unwrap_or(f32::NEG_INFINITY)).collect();

    // One range of rows: scan it block by block into per-query heaps.
    let scan = |lo: usize, hi: usize| -> Vec<TopK> {
        let mut heaps: Vec<TopK> = queries.iter().map(|q| TopK::new(q.top_k)).collect();
        let mut scores = vec![0f32; nq * BLOCK_ROWS];
        let mut start = lo;
        while start < hi {
            let end = (start + BLOCK_ROWS).min(hi);
            let m = end - start;
            let out = &mut scores[..nq * m];
            concierge_kernels::dot::inner_products(&q, nq, &rows.vectors[start * d..end * d], d, out);
            for (i, heap) in heaps.iter_mut().enumerate() {
                let floor = floors[i];
                for (j, &score) in out[i * m..(i + 1) * m].iter().enumerate() {
                    let s = Scored { score, row: (start + j) as u32 };
                    if score >= floor && heap.admits(s) && matches(&rows.entries[start + j], &queries[i].filter) {
                        heap.push(s);
                    }
                }
            }
            start = end;
        }
        heaps
    };

    let parts: Vec<Vec<TopK>> = if n < PARALLEL_MIN_ROWS {
        vec![scan(0, n)]
    } else {
        concierge_kernels::on_cpu_pool(|| {
            let tasks = rayon::current_num_threads().max(1) * 4;
            let per = n.div_ceil(tasks).next_multiple_of(BLOCK_ROWS);
            (0..n.div_ceil(per)).into_par_iter().map(|t| scan(t * per, ((t + 1) * per).min(n))).collect()
        })
    };

    (0..nq)
        .map(|i| {
            let mut all: Vec<Scored> = parts.iter().flat_map(|p| p[i].heap.iter().map(|r| r.0)).collect();
            all.sort_unstable_by(|a, b| b.cmp(a));
            all.truncate(queries[i].top_k);
            all.into_iter().map(|s| Hit { score: s.score, entry: rows.entries[s.row as usize].clone() }).collect()
        })
        .collect()
}
