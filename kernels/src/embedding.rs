//! BERT's input embeddings `word[ids] + position[positions] + token_type[types]` in one pass,
//! as a candle custom op (CPU, f32) over the three tables.
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::linear::contiguous_f32;

struct EmbeddingSum {
    ids: Vec<u32>,
    positions: Vec<u32>,
    types: Vec<u32>,
}

/// Tables `[rows, h]` each; index lists of equal length `t`; result `[t, h]`.
pub fn embedding_sum(
    word: &Tensor,
    position: &Tensor,
    token_type: &Tensor,
    ids: &[u32],
    positions: &[u32],
    types: &[u32],
) -> Result<Tensor> {
    if ids.len() != positions.len() || ids.len() != types.len() {
        candle_core::bail!("embedding-sum: {} ids, {} positions, {} types", ids.len(), positions.len(), types.len());
    }
    let op = EmbeddingSum { ids: ids.to_vec(), positions: positions.to_vec(), types: types.to_vec() };
    word.apply_op3_no_bwd(position, token_type, &op)
}

impl CustomOp3 for EmbeddingSum {
    fn name(&self) -> &'static str {
        "embedding-sum"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (w, p, y) = (
            contiguous_f32(s1, l1, "embedding-sum")?,
            contiguous_f32(s2, l2, "embedding-sum")?,
            contiguous_f32(s3, l3, "embedding-sum")?,
        );
        let (_, h) = l1.shape().dims2()?;
        for (l, name) in [(l2, "position"), (l3, "token type")] {
            if l.shape().dims2()?.1 != h {
                candle_core::bail!("embedding-sum: {name} table is {:?}, word table {:?}", l.shape(), l1.shape());
            }
        }
        let row = |table: &'static str, t: &[f32], i: u32| -> Result<usize> {
            let i = i as usize;
            if (i + 1) * h > t.len() {
                candle_core::bail!("embedding-sum: {table} index {i} out of range ({} rows)", t.len() / h);
            }
            Ok(i * h)
        };
        let n = self.ids.len();
        let mut out = vec![0f32; n * h];
        for (t, o) in out.chunks_exact_mut(h).enumerate() {
            let (a, b, c) = (
                row("word", w, self.ids[t])?,
                row("position", p, self.positions[t])?,
                row("token type", y, self.types[t])?,
            );
            for (((o, &a), &b), &c) in o.iter_mut().zip(&w[a..a + h]).zip(&p[b..b + h]).zip(&y[c..c + h]) {
                *o = a + b + c;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, h))))
    }
}
