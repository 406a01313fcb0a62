//! A linear-chain conditional random field (Lafferty, McCallum and Pereira, 2001, "Conditional
//! Random Fields: Probabilistic Models for Segmenting and Labeling Sequence Data") over batched,
//! padded emission scores, with pytorch-crf's parameters and semantics (github.com/kmkurn/pytorch-crf).
//!
//! Everything that carries a gradient is plain candle tensor ops, so it runs on any device and
//! trains through candle's autograd: the forward algorithm (log partition), the gold path score,
//! and so the negative log-likelihood. Viterbi (no gradient) is the kernels crate's custom op on
//! the CPU and tensor ops on other devices. Scores are in f32 whatever the emissions' dtype: a
//! log-sum-exp chain in half precision loses too much.
//!
//! Shapes: emissions `[B, L, T]` (batch, padded length, tags), one length per sequence with
//! `1 <= length <= L`; positions at or past a sequence's length are padding and never change its
//! result (pytorch-crf's mask with its first column all on; a mask is a prefix, as here).
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::error::{ModelError, Result};

/// The best tag sequence for one input and its unnormalised score (the sum of start, emission,
/// transition and end scores along the path).
#[derive(Debug, Clone, PartialEq)]
pub struct TagPath {
    pub tags: Vec<u32>,
    pub score: f32,
}

/// How [`Crf::nll`] reduces the per-sequence losses, as pytorch-crf's `reduction`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Reduction {
    /// Sum over the batch (pytorch-crf's default).
    Sum,
    /// Mean over the batch's sequences: the loss scale does not grow with the batch size.
    #[default]
    Mean,
    /// Sum over the batch divided by the number of real tokens in it.
    TokenMean,
}

/// The CRF's parameters: `transitions[i][j]` scores moving from tag `i` to tag `j`;
/// `start_transitions[j]` a path starting at `j`, `end_transitions[i]` one ending at `i`.
#[derive(Debug, Clone)]
pub struct Crf {
    transitions: Tensor,
    start: Tensor,
    end: Tensor,
    num_tags: usize,
    /// Set by [`Self::constrain`]: [`FORBIDDEN`] where the tag scheme rules a step out, else 0,
    /// added to the three score tensors when decoding.
    forbidden: Option<[Tensor; 3]>,
}

/// The score a constrained decoder adds to a start, step or end its tag scheme rules out:
/// far below any learned score, yet finite, so exp-space sums underflow to zero without NaN.
pub const FORBIDDEN: f32 = -10_000.0;

/// Which starts, steps and ends the scheme of `tags` allows (BIO, BIOES or BMES, from the tag
/// names): `(transitions [i * T + j], start [j], end [i])`. A chunk's inside (`I-`/`M-`) or
/// `E-` tag only follows `B-` or an inside tag of the same label, and never starts a sequence;
/// in BIOES and BMES, whose chunks close themselves, a `B-` or inside tag must be followed by
/// its chunk's continuation and cannot end a sequence.
pub fn allowed_steps(tags: &[String]) -> Result<(Vec<bool>, Vec<bool>, Vec<bool>)> {
    use crate::sequence::{parse_tag, scheme_of, Prefix, Scheme};
    let bad = |e: crate::sequence::SequenceError| {
        ModelError::Unsupported(format!("constrained decoding needs BIO, BIOES or BMES tags: {e}"))
    };
    let parsed = tags.iter().map(|t| parse_tag(t)).collect::<std::result::Result<Vec<_>, _>>().map_err(bad)?;
    let closing = scheme_of(tags).map_err(bad)? != Scheme::Bio;
    let open = |p: Prefix| closing && matches!(p, Prefix::B | Prefix::I);
    let continues = |p: Prefix| matches!(p, Prefix::I | Prefix::E);
    let n = tags.len();
    let mut steps = vec![true; n * n];
    for (i, &(pi, li)) in parsed.iter().enumerate() {
        for (j, &(pj, lj)) in parsed.iter().enumerate() {
            steps[i * n + j] = if continues(pj) { matches!(pi, Prefix::B | Prefix::I) && li == lj } else { !open(pi) };
        }
    }
    let start = parsed.iter().map(|&(p, _)| !continues(p)).collect();
    let end = parsed.iter().map(|&(p, _)| !open(p)).collect();
    Ok((steps, start, end))
}

impl Crf {
    /// From the three tensors, cast to f32.
    pub fn new(transitions: Tensor, start_transitions: Tensor, end_transitions: Tensor) -> Result<Self> {
        let num_tags = start_transitions.dims1()?;
        if num_tags == 0 || transitions.dims() != [num_tags, num_tags] || end_transitions.dims() != [num_tags] {
            return Err(candle_core::Error::Msg(format!(
                "crf tensors must be transitions [T, T], start_transitions [T] and end_transitions [T] with T > 0; \
                 got {:?}, {:?} and {:?}",
                transitions.dims(),
                start_transitions.dims(),
                end_transitions.dims()
            ))
            .into());
        }
        Ok(Self {
            transitions: transitions.to_dtype(DType::F32)?,
            start: start_transitions.to_dtype(DType::F32)?,
            end: end_transitions.to_dtype(DType::F32)?,
            num_tags,
            forbidden: None,
        })
    }

    /// From now on decoding (Viterbi, marginals) only considers the tag paths the scheme of
    /// `tags` (the tag names in id order) allows: [`allowed_steps`], each ruled-out start, step
    /// and end scoring [`FORBIDDEN`] more. The likelihood that training maximises
    /// ([`Self::nll`], [`Self::log_partition`]) stays over every path, as pytorch-crf's.
    pub fn constrain(&mut self, tags: &[String]) -> Result<()> {
        if tags.len() != self.num_tags {
            return Err(ModelError::Unsupported(format!("{} tag names for a crf of {} tags", tags.len(), self.num_tags)));
        }
        let (steps, start, end) = allowed_steps(tags)?;
        let dev = self.start.device();
        let score = |ok: Vec<bool>| ok.into_iter().map(|a| if a { 0f32 } else { FORBIDDEN }).collect::<Vec<_>>();
        let n = self.num_tags;
        self.forbidden = Some([
            Tensor::from_vec(score(steps), (n, n), dev)?,
            Tensor::from_vec(score(start), n, dev)?,
            Tensor::from_vec(score(end), n, dev)?,
        ]);
        Ok(())
    }

    /// Whether [`Self::constrain`] applies.
    pub fn is_constrained(&self) -> bool {
        self.forbidden.is_some()
    }

    /// The transition, start and end scores decoding uses: the parameters, plus the
    /// constraints' penalties when set.
    fn decoding_scores(&self) -> Result<[Tensor; 3]> {
        let own = [&self.transitions, &self.start, &self.end];
        Ok(match &self.forbidden {
            None => own.map(|t| t.clone()),
            Some(f) => [(own[0] + &f[0])?, (own[1] + &f[1])?, (own[2] + &f[2])?],
        })
    }

    /// `transitions`, `start_transitions` and `end_transitions` under `vb` (pytorch-crf's names),
    /// kept in f32. A fresh parameter (a `VarMap` builder) starts uniform in [-0.1, 0.1], as
    /// pytorch-crf's `reset_parameters`.
    pub fn load(vb: &VarBuilder, num_tags: usize) -> Result<Self> {
        let init = Init::Uniform { lo: -0.1, up: 0.1 };
        let t = |shape: &[usize], name: &str| vb.get_with_hints_dtype(shape, name, init, DType::F32);
        Self::new(
            t(&[num_tags, num_tags], "transitions")?,
            t(&[num_tags], "start_transitions")?,
            t(&[num_tags], "end_transitions")?,
        )
    }

    pub fn num_tags(&self) -> usize {
        self.num_tags
    }
    pub fn transitions(&self) -> &Tensor {
        &self.transitions
    }
    pub fn start_transitions(&self) -> &Tensor {
        &self.start
    }
    pub fn end_transitions(&self) -> &Tensor {
        &self.end
    }

    /// The emissions in f32 on the parameters' device, and the `[B, L]` 0/1 mask of `lengths`.
    fn prepare(&self, emissions: &Tensor, lengths: &[usize]) -> Result<(Tensor, Tensor)> {
        let l = self.check(emissions, lengths)?;
        let mask = length_mask(lengths, l, self.start.device())?;
        Ok((emissions.to_dtype(DType::F32)?, mask))
    }

    /// That `emissions` `[B, L, T]` has this CRF's tags and `lengths` fit it; returns L.
    fn check(&self, emissions: &Tensor, lengths: &[usize]) -> Result<usize> {
        let (b, l, t) = emissions.dims3()?;
        if t != self.num_tags {
            return Err(ModelError::InvalidInput(format!(
                "emissions have {t} tags in their last dimension; the crf has {}",
                self.num_tags
            )));
        }
        check_lengths(lengths, b, l)?;
        Ok(l)
    }

    /// The forward algorithm's `alpha_t` for every position (`[B, L, T]`: the log-sum of the
    /// scores of all partial paths ending in each tag at t; carried unchanged through padding)
    /// and the log partition `[B]`.
    fn forward_alphas(&self, em: &Tensor, mask: &Tensor, scores: &[Tensor; 3]) -> Result<(Tensor, Tensor)> {
        let [transitions, start, end] = scores;
        let l = em.dim(1)?;
        // logsumexp_i(alpha_i + trans_ij) as a matrix product in exp space, shifted for
        // stability: exp(alpha - max_b(alpha)) @ exp(trans - max(trans)). O(B T^2) multiply-adds
        // in one GEMM instead of a [B, T, T] tensor per step (and its backward), which made
        // training with a hundred-odd tags crawl.
        let t_max = transitions.max_keepdim(0)?.max_keepdim(1)?;
        let exp_trans = transitions.broadcast_sub(&t_max)?.exp()?;
        let mut alpha = em.i((.., 0, ..))?.broadcast_add(start)?;
        let mut alphas = vec![alpha.clone()];
        for t in 1..l {
            let a_max = alpha.max_keepdim(1)?.detach();
            let summed = alpha.broadcast_sub(&a_max)?.exp()?.matmul(&exp_trans)?;
            // A floor keeps log and its gradient finite if every way into a tag underflows.
            let next = summed
                .maximum(1e-30)?
                .log()?
                .broadcast_add(&a_max)?
                .broadcast_add(&t_max)?
                .add(&em.i((.., t, ..))?)?;
            alpha = blend(&mask.i((.., t))?, &next, &alpha)?;
            alphas.push(alpha.clone());
        }
        let log_z = alpha.broadcast_add(end)?.log_sum_exp(1)?;
        Ok((Tensor::stack(&alphas, 1)?, log_z))
    }

    /// log Z per sequence, `[B]`, f32: the log-sum-exp of the scores of every tag path of the
    /// sequence's length (pytorch-crf's `_compute_normalizer`). Differentiable.
    pub fn log_partition(&self, emissions: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (em, mask) = self.prepare(emissions, lengths)?;
        let own = [self.transitions.clone(), self.start.clone(), self.end.clone()];
        Ok(self.forward_alphas(&em, &mask, &own)?.1)
    }

    /// The score of the given tag path per sequence, `[B]`, f32 (pytorch-crf's `_compute_score`).
    /// `tags[b]` has sequence b's length and sets it. Differentiable.
    pub fn path_score(&self, emissions: &Tensor, tags: &[Vec<u32>]) -> Result<Tensor> {
        let lengths: Vec<usize> = tags.iter().map(Vec::len).collect();
        let (em, mask) = self.prepare(emissions, &lengths)?;
        let (b, l, nt) = em.dims3()?;
        let dev = em.device();
        // Host-built flat indices into the emissions ([B*L*T]) and transitions ([T*T]); padded
        // positions point at element 0 and are masked out.
        let mut em_idx = vec![0u32; b * l];
        let mut tr_idx = vec![0u32; b * l.saturating_sub(1)];
        let (mut first, mut last) = (Vec::with_capacity(b), Vec::with_capacity(b));
        for (s, seq) in tags.iter().enumerate() {
            if let Some(&bad) = seq.iter().find(|&&t| t as usize >= nt) {
                return Err(ModelError::InvalidInput(format!("tag id {bad} in sequence {s}; the crf has {nt} tags")));
            }
            for (t, &tag) in seq.iter().enumerate() {
                em_idx[s * l + t] = ((s * l + t) * nt) as u32 + tag;
                if t > 0 {
                    tr_idx[s * (l - 1) + t - 1] = seq[t - 1] * nt as u32 + tag;
                }
            }
            first.push(seq[0]);
            last.push(*seq.last().expect("lengths are checked to be positive"));
        }
        let em_idx = Tensor::from_vec(em_idx, (b * l,), dev)?;
        let emitted = (em.flatten_all()?.index_select(&em_idx, 0)?.reshape((b, l))? * &mask)?.sum(1)?;
        let start = self.start.index_select(&Tensor::new(first, dev)?, 0)?;
        let end = self.end.index_select(&Tensor::new(last, dev)?, 0)?;
        let mut score = ((start + emitted)? + end)?;
        if l > 1 {
            let tr_idx = Tensor::from_vec(tr_idx, (b * (l - 1),), dev)?;
            let moved = self.transitions.flatten_all()?.index_select(&tr_idx, 0)?.reshape((b, l - 1))?;
            score = (score + (moved * mask.narrow(1, 1, l - 1)?)?.sum(1)?)?;
        }
        Ok(score)
    }

    /// Negative log-likelihood per sequence, `[B]`: log Z - the gold path's score (>= 0).
    pub fn nll_per_sequence(&self, emissions: &Tensor, tags: &[Vec<u32>]) -> Result<Tensor> {
        let lengths: Vec<usize> = tags.iter().map(Vec::len).collect();
        let gold = self.path_score(emissions, tags)?;
        Ok((self.log_partition(emissions, &lengths)? - gold)?)
    }

    /// The training loss: the negative log-likelihood of the gold paths, a scalar reduced as
    /// `reduction` says (pytorch-crf's `forward` negated). Differentiable.
    pub fn nll(&self, emissions: &Tensor, tags: &[Vec<u32>], reduction: Reduction) -> Result<Tensor> {
        let per_seq = self.nll_per_sequence(emissions, tags)?;
        Ok(match reduction {
            Reduction::Sum => per_seq.sum_all()?,
            Reduction::Mean => per_seq.mean_all()?,
            Reduction::TokenMean => (per_seq.sum_all()? / tags.iter().map(Vec::len).sum::<usize>() as f64)?,
        })
    }

    /// Viterbi: the highest-scoring tag path of each sequence and its score (pytorch-crf's
    /// `_viterbi_decode`, with the score it leaves out). Exact ties go where the device's argmax puts them.
    ///
    /// On the CPU this runs `concierge_kernels::viterbi::viterbi_decode`, one pass over the
    /// emissions with the same sums in the same order and the same tie rule (the lowest tag) as
    /// [`Self::decode_tensor_ops`], so the same paths and scores. On other devices it runs the
    /// tensor ops: the kernel's CUDA version has not been run on a GPU yet.
    pub fn decode(&self, emissions: &Tensor, lengths: &[usize]) -> Result<Vec<TagPath>> {
        if !(emissions.device().is_cpu() && self.start.device().is_cpu()) {
            return self.decode_tensor_ops(emissions, lengths);
        }
        self.check(emissions, lengths)?;
        let [transitions, start, end] = self.decoding_scores()?;
        let (paths, scores) = concierge_kernels::viterbi::viterbi_decode(
            &emissions.detach(),
            lengths,
            &transitions.detach(),
            &start.detach(),
            &end.detach(),
        )?;
        Ok(paths.into_iter().zip(scores).map(|(tags, score)| TagPath { tags, score }).collect())
    }

    /// [`Self::decode`] in candle tensor ops, on any device: per position a `[B, T, T]` tensor of
    /// candidates, its argmax and a gather; only the back-pointers come to the host, for the
    /// trace-back.
    pub fn decode_tensor_ops(&self, emissions: &Tensor, lengths: &[usize]) -> Result<Vec<TagPath>> {
        let (em, mask) = self.prepare(&emissions.detach(), lengths)?;
        let (b, l, _) = em.dims3()?;
        let [transitions, start, end] = self.decoding_scores()?;
        let trans = transitions.detach().unsqueeze(0)?;
        let mut score = em.i((.., 0, ..))?.broadcast_add(&start.detach())?;
        let mut history = Vec::with_capacity(l.saturating_sub(1));
        for t in 1..l {
            let next = score.unsqueeze(2)?.broadcast_add(&trans)?.broadcast_add(&em.i((.., t, ..))?.unsqueeze(1)?)?;
            // argmax then a gather of it, so the kept score is exactly the chosen candidate's.
            let best_from = next.argmax_keepdim(1)?;
            let best = next.gather(&best_from, 1)?.squeeze(1)?;
            score = blend(&mask.i((.., t))?, &best, &score)?;
            history.push(best_from.squeeze(1)?);
        }
        let score = score.broadcast_add(&end.detach())?;
        let last_tag = score.argmax_keepdim(1)?;
        let best_score = score.gather(&last_tag, 1)?.squeeze(1)?.to_vec1::<f32>()?;
        let last_tag = last_tag.squeeze(1)?.to_vec1::<u32>()?;
        let history = if history.is_empty() { Vec::new() } else { Tensor::stack(&history, 0)?.to_vec3::<u32>()? };
        Ok((0..b)
            .map(|s| {
                let mut tags = vec![last_tag[s]];
                // history[t - 1][s][j]: the best tag at t - 1 given tag j at t.
                for step in history[..lengths[s] - 1].iter().rev() {
                    tags.push(step[s][*tags.last().unwrap() as usize]);
                }
                tags.reverse();
                TagPath { tags, score: best_score[s] }
            })
            .collect())
    }

    /// Per-token marginals `[B, L, T]`, f32: p(tag at t = j | sequence) by forward-backward; each
    /// real position sums to 1, padded positions are all zero. Differentiable.
    pub fn marginals(&self, emissions: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (em, mask) = self.prepare(emissions, lengths)?;
        let (b, l, _) = em.dims3()?;
        let scores = self.decoding_scores()?;
        let (alphas, log_z) = self.forward_alphas(&em, &mask, &scores)?;
        let [transitions, _, end] = &scores;
        // beta_t[i]: log-sum of the scores of all path continuations after tag i at t, the end
        // transition included; at a sequence's last position (and past it) just end[i].
        // logsumexp_j(trans_ij + ahead_j) as the forward pass does it: one exp-space product per
        // step with the transposed transitions, shifted for stability, instead of a [B, T, T]
        // log-sum-exp (which cost ten times the rest of the tagger at 159 tags).
        let t_max = transitions.max_keepdim(0)?.max_keepdim(1)?;
        let exp_trans_t = transitions.broadcast_sub(&t_max)?.exp()?.t()?.contiguous()?;
        let end = end.unsqueeze(0)?.broadcast_as((b, self.num_tags))?.contiguous()?;
        let mut beta = end.clone();
        let mut betas = vec![beta.clone()];
        for t in (0..l.saturating_sub(1)).rev() {
            let ahead = em.i((.., t + 1, ..))?.add(&beta)?;
            let a_max = ahead.max_keepdim(1)?.detach();
            let summed = ahead.broadcast_sub(&a_max)?.exp()?.matmul(&exp_trans_t)?;
            let next = summed.maximum(1e-30)?.log()?.broadcast_add(&a_max)?.broadcast_add(&t_max)?;
            beta = blend(&mask.i((.., t + 1))?, &next, &end)?;
            betas.push(beta.clone());
        }
        betas.reverse();
        let betas = Tensor::stack(&betas, 1)?;
        let log_p = (alphas + betas)?.broadcast_sub(&log_z.reshape((b, 1, 1))?)?;
        Ok(log_p.exp()?.broadcast_mul(&mask.unsqueeze(2)?)?)
    }
}

/// `m * on + (1 - m) * off` with `m` a `[B]` 0/1 mask over `[B, T]` rows: where_cond without
/// its u8 mask, differentiable in both branches.
fn blend(m: &Tensor, on: &Tensor, off: &Tensor) -> Result<Tensor> {
    let m = m.unsqueeze(1)?;
    let keep = m.affine(-1.0, 1.0)?;
    Ok((on.broadcast_mul(&m)? + off.broadcast_mul(&keep)?)?)
}

/// The `[B, L]` f32 mask, 1 before each sequence's length.
pub(crate) fn length_mask(lengths: &[usize], padded: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = lengths.iter().flat_map(|&n| (0..padded).map(move |t| if t < n { 1.0 } else { 0.0 })).collect();
    Ok(Tensor::from_vec(mask, (lengths.len(), padded), device)?)
}

/// One length per sequence of a `[batch, padded, ..]` tensor, each in `1..=padded`.
pub(crate) fn check_lengths(lengths: &[usize], batch: usize, padded: usize) -> Result<()> {
    if lengths.len() != batch {
        return Err(ModelError::InvalidInput(format!("{} lengths for a batch of {batch}", lengths.len())));
    }
    if let Some((i, n)) = lengths.iter().enumerate().find(|(_, &n)| n == 0 || n > padded) {
        return Err(ModelError::InvalidInput(format!(
            "sequence {i} has length {n}; lengths must be between 1 and the padded length {padded}"
        )));
    }
    Ok(())
}
