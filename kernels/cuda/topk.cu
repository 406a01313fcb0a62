// Top-k of each row of a score matrix (src/topk.rs is the CPU reference and the caller).
//
// Every element gets a distinct 64-bit key: the high 32 bits order the float (larger first,
// -0 equal to +0, NaN below everything), the low 32 bits are ~index (so a lower index is the
// larger key on a tie). The top k of a row are then the k largest keys, found by a radix select
// on 8 bits at a time (a shared-memory histogram per pass; it stops as soon as the bucket that
// holds the k-th key is taken whole), gathered into shared memory and sorted there by a
// bitonic sort. One block per row; k <= TOPK_MAX_K (the shared buffer's size).
#include <stdint.h>

#define TOPK_MAX_K 1024

__device__ __forceinline__ uint32_t order_key(float f) {
    uint32_t u = __float_as_uint(f);
    if (f != f) return 0;          // NaN ranks last
    if (u == 0x80000000u) u = 0;  // -0 ties with +0
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ uint64_t full_key(const float* row, uint32_t i) {
    return ((uint64_t)order_key(row[i]) << 32) | (uint64_t)(~i);
}

// blockDim.x: a power of two, 32..1024. out: [Q, k] indices, best first.
extern "C" __global__ void topk_f32(const float* __restrict__ scores, uint32_t N, uint32_t k,
                                    uint32_t* __restrict__ out) {
    __shared__ uint32_t hist[256];
    __shared__ unsigned long long buf[TOPK_MAX_K];
    __shared__ unsigned long long s_prefix;
    __shared__ uint32_t s_need, s_done, s_count;
    const float* row = scores + (size_t)blockIdx.x * N;
    const uint32_t tid = threadIdx.x;

    if (tid == 0) {
        s_prefix = 0;
        s_need = k;
        s_done = 0;
        s_count = 0;
    }
    uint64_t mask = 0;
    for (int shift = 56; shift >= 0; shift -= 8) {
        for (uint32_t i = tid; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        const uint64_t prefix = s_prefix;
        for (uint32_t i = tid; i < N; i += blockDim.x) {
            const uint64_t key = full_key(row, i);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xff], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            // The bucket (from the top) where the count of larger keys reaches `need`.
            uint32_t need = s_need, above = 0;
            int bucket = 255;
            for (; bucket > 0; --bucket) {
                if (above + hist[bucket] >= need) break;
                above += hist[bucket];
            }
            need -= above;
            s_prefix = prefix | ((uint64_t)bucket << shift);
            s_need = need;
            s_done = hist[bucket] == need;
        }
        __syncthreads();
        mask |= (uint64_t)0xff << shift;
        if (s_done) break;
    }
    // Keys >= the threshold are exactly k: every key above the chosen buckets and the whole of
    // the last one (the keys are distinct, so at the last pass the bucket holds one key).
    const uint64_t threshold = s_prefix;
    for (uint32_t i = tid; i < N; i += blockDim.x) {
        const uint64_t key = full_key(row, i);
        if (key >= threshold) buf[atomicAdd(&s_count, 1u)] = key;
    }
    uint32_t cap = 1;
    while (cap < k) cap <<= 1;
    __syncthreads();
    // Key 0 would be a NaN at index 2^32 - 1, which N < 2^32 - 1 rules out: padding sorts last.
    for (uint32_t i = k + tid; i < cap; i += blockDim.x) buf[i] = 0;
    __syncthreads();
    // Bitonic sort of buf[0..cap], descending.
    for (uint32_t size = 2; size <= cap; size <<= 1) {
        for (uint32_t stride = size >> 1; stride > 0; stride >>= 1) {
            for (uint32_t i = tid; i < cap; i += blockDim.x) {
                const uint32_t j = i ^ stride;
                if (j > i) {
                    const unsigned long long a = buf[i], c = buf[j];
                    const bool descending = (i & size) == 0;
                    if (descending ? (a < c) : (a > c)) {
                        buf[i] = c;
                        buf[j] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
    uint32_t* o = out + (size_t)blockIdx.x * k;
    for (uint32_t i = tid; i < k; i += blockDim.x) o[i] = ~(uint32_t)buf[i];
}
