//! Fused kernels for the hot paths of the encoders, each a candle custom op.
//! Every op has a CPU implementation (the reference a CUDA one is tested against).
pub mod activation;
pub mod attention;
pub mod embedding;
pub mod gemm;
pub mod linear;
pub mod norm;
