//! With the `cuda` feature, compiles each `cuda/*.cu` into a fatbin in OUT_DIR that the crate
//! embeds (`src/cuda.rs`); without it, does nothing (a CPU build never needs nvcc).
//!
//! Why build time and why a fatbin rather than run-time NVRTC or PTX: a kernel that does not
//! compile fails the build here, on a machine without a GPU, instead of at the first request on
//! the server; the binary needs no CUDA headers at run time; and the fatbin holds a cubin for
//! `CUDA_COMPUTE_CAP` (default 90: H100/H200), which the driver loads as it is. Its PTX copy
//! (same architecture) is only JIT-compiled by the driver on newer GPUs, and that PTX comes from
//! the build's nvcc, never from a run-time NVRTC that could be newer than the driver.
//!
//! nvcc: `$CUDA_ROOT/bin/nvcc` (or `CUDA_PATH`, `CUDA_HOME`), else `nvcc` on PATH.
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Err(e) = build() {
        panic!("concierge-kernels: {e}");
    }
}

fn build() -> Result<(), String> {
    for var in ["CUDA_COMPUTE_CAP", "CUDA_ROOT", "CUDA_PATH", "CUDA_HOME", "NVCC_CCBIN"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rerun-if-changed=cuda");
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let cap = compute_cap()?;
    let nvcc = nvcc();
    let mut sources: Vec<PathBuf> = std::fs::read_dir("cuda")
        .map_err(|e| format!("cannot list kernels/cuda: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo::rerun-if-changed={}", src.display());
        let stem = src.file_stem().and_then(|s| s.to_str()).ok_or("bad .cu file name")?;
        compile(&nvcc, src, &out.join(format!("{stem}.fatbin")), cap)?;
    }
    for header in std::fs::read_dir("cuda").map_err(|e| e.to_string())?.flatten() {
        if header.path().extension().is_some_and(|x| x == "cuh") {
            println!("cargo::rerun-if-changed={}", header.path().display());
        }
    }
    Ok(())
}

/// `CUDA_COMPUTE_CAP` as candle reads it ("90", "9.0", "90a", "sm_90"), default 90. The digits
/// set the architecture; an `a` suffix is dropped: these kernels use no arch-specific features,
/// and a plain sm_90 cubin also loads on later 9.x parts.
fn compute_cap() -> Result<u32, String> {
    let raw = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let digits: String = raw.chars().filter(char::is_ascii_digit).collect();
    match digits.parse::<u32>() {
        Ok(cap) if cap >= 70 => Ok(cap),
        _ => Err(format!("CUDA_COMPUTE_CAP={raw:?}: expected a compute capability of 70 or more, e.g. 90")),
    }
}

fn nvcc() -> PathBuf {
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = std::env::var_os(var) {
            let p = Path::new(&root).join("bin").join("nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    PathBuf::from("nvcc")
}

fn compile(nvcc: &Path, src: &Path, dst: &Path, cap: u32) -> Result<(), String> {
    let mut cmd = Command::new(nvcc);
    cmd.arg("--fatbin")
        .arg(format!("--generate-code=arch=compute_{cap},code=[sm_{cap},compute_{cap}]"))
        .args(["-O3", "-std=c++17", "-Icuda", "-o"])
        .arg(dst)
        .arg(src);
    if let Some(ccbin) = std::env::var_os("NVCC_CCBIN") {
        cmd.arg("-ccbin").arg(ccbin);
    }
    let status = cmd.status().map_err(|e| {
        format!(
            "cannot run {} ({e}): the `cuda` feature needs nvcc (put it on PATH or set CUDA_ROOT; \
             scripts/cuda-toolchain.sh installs one)",
            nvcc.display()
        )
    })?;
    if !status.success() {
        return Err(format!("nvcc failed on {} ({status})", src.display()));
    }
    Ok(())
}
