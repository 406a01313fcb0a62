# Sourced by the training scripts (train-msra.sh, train-atis-ensemble.sh): glibc allocator
# settings that cut the kernel time of `concierge train-tagger` runs (candle allocates a fresh
# buffer for every tensor). Measured 2026-12-06 on a 2-core AMD EPYC, same losses to the last
# digit: MSRA stage 2 probe 61 s -> 55-57 s, ATIS default recipe 84-91 s -> 72-78 s, MPNet
# fine-tuning probe 75 s -> 59 s; the saved weights byte for byte the same (benches/RESULTS.md).
# Values already in the environment win.
: "${MALLOC_MMAP_THRESHOLD_=4294967296}"
: "${MALLOC_TRIM_THRESHOLD_=4294967296}"
: "${MALLOC_TOP_PAD_=268435456}"
export MALLOC_MMAP_THRESHOLD_ MALLOC_TRIM_THRESHOLD_ MALLOC_TOP_PAD_
