// Masked mean pooling over packed sequences, then (optionally) L2 normalisation of each row
// (src/pool.rs is the CPU reference and the caller). Inputs f32, f16 or bf16; sums and the
// output are f32 whatever the input.
//
// masked_mean_*: grid (B, ceil(H / 32)), block (32, 8). Each block owns 32 columns of one
// sequence; its 8 thread rows stride over the sequence's rows (a warp reads 32 consecutive
// values of one row), then the 8 partial sums are added in a fixed order.
// l2_normalize_rows: one block per row, a shared-memory tree sum of squares, then
// x / max(||x||, eps).
#include <stdint.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define TILE_COLS 32
#define TILE_ROWS 8

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ void masked_mean(const T* __restrict__ x, const uint32_t* __restrict__ starts,
                            float* __restrict__ out, uint32_t H) {
    __shared__ float partial[TILE_ROWS][TILE_COLS + 1];
    const uint32_t b = blockIdx.x;
    const uint32_t col = blockIdx.y * TILE_COLS + threadIdx.x;
    const uint32_t lo = starts[b], hi = starts[b + 1];
    float acc = 0.0f;
    if (col < H) {
        for (uint32_t r = lo + threadIdx.y; r < hi; r += TILE_ROWS) acc += to_f32(x[(size_t)r * H + col]);
    }
    partial[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < H) {
        float sum = partial[0][threadIdx.x];
        for (int y = 1; y < TILE_ROWS; ++y) sum += partial[y][threadIdx.x];
        out[(size_t)b * H + col] = sum / (float)(hi - lo);
    }
}

extern "C" __global__ void masked_mean_f32(const float* x, const uint32_t* starts, float* out, uint32_t H) {
    masked_mean(x, starts, out, H);
}
extern "C" __global__ void masked_mean_f16(const __half* x, const uint32_t* starts, float* out, uint32_t H) {
    masked_mean(x, starts, out, H);
}
extern "C" __global__ void masked_mean_bf16(const __nv_bfloat16* x, const uint32_t* starts, float* out, uint32_t H) {
    masked_mean(x, starts, out, H);
}

// blockDim.x must be a power of two, at most 1024.
extern "C" __global__ void l2_normalize_rows(float* __restrict__ rows, uint32_t H, float eps) {
    __shared__ float sums[1024];
    float* row = rows + (size_t)blockIdx.x * H;
    float acc = 0.0f;
    for (uint32_t c = threadIdx.x; c < H; c += blockDim.x) acc += row[c] * row[c];
    sums[threadIdx.x] = acc;
    __syncthreads();
    for (uint32_t s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sums[threadIdx.x] += sums[threadIdx.x + s];
        __syncthreads();
    }
    const float norm = fmaxf(sqrtf(sums[0]), eps);
    for (uint32_t c = threadIdx.x; c < H; c += blockDim.x) row[c] = row[c] / norm;
}
