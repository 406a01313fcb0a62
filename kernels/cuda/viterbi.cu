// Batched Viterbi decode of a linear-chain CRF (src/viterbi.rs is the CPU reference and the
// caller). One block per sequence, threads over the tags `to`; the running scores live in
// shared memory (two rows of T floats), back-pointers in a global scratch buffer [B, L, T].
// Every candidate is computed as (score[from] + trans[from][to]) + em[t][to], in that order,
// and the first (lowest) `from` wins a tie, exactly as the CPU code: the two agree bit for bit.
#include <stdint.h>

extern "C" __global__ void viterbi_f32(
    const float* __restrict__ em,         // [B, L, T]
    const float* __restrict__ params,     // [T + 2, T]: start, end, then transitions[from][to]
    const uint32_t* __restrict__ lengths, // [B], each in 1..=L
    uint32_t* __restrict__ back,          // [B, L, T] scratch: best `from` for each (t, to)
    uint32_t* __restrict__ out,           // [B, L + 1]: tags (0 past the length), score's bits
    uint32_t L, uint32_t T) {
    extern __shared__ float smem[];  // 2 * T floats
    const uint32_t b = blockIdx.x;
    const uint32_t len = lengths[b];
    const float* start = params;
    const float* end = params + T;
    const float* trans = params + 2 * T;
    const float* e = em + (size_t)b * L * T;
    uint32_t* bp = back + (size_t)b * L * T;
    float* cur = smem;
    float* nxt = smem + T;

    for (uint32_t j = threadIdx.x; j < T; j += blockDim.x) cur[j] = e[j] + start[j];
    __syncthreads();
    for (uint32_t t = 1; t < len; ++t) {
        const float* et = e + (size_t)t * T;
        for (uint32_t j = threadIdx.x; j < T; j += blockDim.x) {
            const float ej = et[j];
            float best = (cur[0] + trans[j]) + ej;
            uint32_t arg = 0;
            for (uint32_t i = 1; i < T; ++i) {
                const float v = (cur[i] + trans[(size_t)i * T + j]) + ej;
                if (v > best) {
                    best = v;
                    arg = i;
                }
            }
            nxt[j] = best;
            bp[(size_t)t * T + j] = arg;
        }
        __syncthreads();
        float* tmp = cur;
        cur = nxt;
        nxt = tmp;
    }

    uint32_t* o = out + (size_t)b * (L + 1);
    for (uint32_t t = len + threadIdx.x; t < L; t += blockDim.x) o[t] = 0;
    if (threadIdx.x != 0) return;
    // The back-pointers written by other threads are visible to thread 0: the loop's last
    // __syncthreads() came after them.
    float best = cur[0] + end[0];
    uint32_t tag = 0;
    for (uint32_t j = 1; j < T; ++j) {
        const float v = cur[j] + end[j];
        if (v > best) {
            best = v;
            tag = j;
        }
    }
    o[L] = __float_as_uint(best);
    o[len - 1] = tag;
    for (uint32_t t = len - 1; t > 0; --t) {
        tag = bp[(size_t)t * T + tag];
        o[t - 1] = tag;
    }
}
