// LoRA dropout mask: a counter-based generator shared by CPU and CUDA kernels and restated in
// lora_ops/reference.py (dropout_keep). The mask is a pure function of (seed, offset, i, j), so the
// backward pass regenerates it instead of storing it, and every kernel (any tiling, any thread
// order, any device) sees the same mask.
//
//   element (i, j) of x viewed as [M, K] (leading dims flattened, row-major):
//     ctr      = offset + i * K + j                       (uint64, wraps)
//     lo, hi   = low / high 32 bits of ctr
//     key      = mix32(seed_lo ^ mix32(seed_hi ^ 0x85EBCA6B))            (once per call)
//     hi_key   = mix32(hi + key)                          (constant for 2^32 consecutive counters)
//     h        = mix32(mix32(lo ^ key) ^ hi_key)
//     keep     = (h >> 8) >= threshold,   threshold = floor(p * 2^24)
//   drop(x)[i, j] = keep ? x[i, j] * keep_scale : 0,   keep_scale = float(1 / (1 - p)) (double, rounded once)
//
// mix32 is the "lowbias32" xorshift-multiply finalizer (constants 0x7feb352d, 0x846ca68b published
// by C. Wellons' hash-prospector); a bijection on 32 bits with near-ideal avalanche. Two chained
// rounds keyed by the seed decorrelate neighbouring counters; the keep decision uses the top 24 bits,
// so P(keep) = 1 - threshold / 2^24 (within 2^-24 of 1 - p). This is a hash, not a cryptographic
// generator: it is meant for dropout masks only.
//
// Every step is 32-bit unsigned arithmetic (wrapping multiplies), which the reference reproduces
// with 16-bit limb products in int64 torch tensors (no int64 overflow).
#pragma once
#include <cstdint>

#include "common/macros.h"

namespace lora_ops {

// Multiplier constants of mix32 and the seed-hash salt (stated once; reference.py repeats them).
constexpr uint32_t kMix32Mul1 = 0x7feb352dU;
constexpr uint32_t kMix32Mul2 = 0x846ca68bU;
constexpr uint32_t kDropoutSeedSalt = 0x85EBCA6BU;
// The keep test compares the top kDropoutBits bits of the hash with the threshold.
constexpr int kDropoutBits = 24;

LORA_HD uint32_t rng_mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMix32Mul1;
  x ^= x >> 15;
  x *= kMix32Mul2;
  x ^= x >> 16;
  return x;
}

// Per-call key from the 64-bit seed.
LORA_HD uint32_t dropout_key(uint64_t seed) {
  const uint32_t lo = static_cast<uint32_t>(seed);
  const uint32_t hi = static_cast<uint32_t>(seed >> 32);
  return rng_mix32(lo ^ rng_mix32(hi ^ kDropoutSeedSalt));
}

// Key of the high counter word; recompute only when ctr >> 32 changes.
LORA_HD uint32_t dropout_hi_key(uint32_t key, uint32_t ctr_hi) { return rng_mix32(ctr_hi + key); }

// The 32-bit hash of one counter value.
LORA_HD uint32_t dropout_hash(uint32_t key, uint32_t hi_key, uint32_t ctr_lo) {
  return rng_mix32(rng_mix32(ctr_lo ^ key) ^ hi_key);
}

// True if the element with this hash is kept.
LORA_HD bool dropout_keep_hash(uint32_t h, uint32_t threshold) { return (h >> (32 - kDropoutBits)) >= threshold; }

// drop(v) of one element: v * (keep ? keep_scale : 0). A multiply, never a select, so a NaN/Inf at a
// dropped position propagates like torch's x * mask / (1 - p) (NaN * 0 = NaN) instead of vanishing.
template <typename T> LORA_HD T dropout_apply(bool keep, T v, T keep_scale) { return v * (keep ? keep_scale : T(0)); }

// threshold = floor(p * 2^24) for p in [0, 1); p * 2^24 is exact in double, so host and device agree.
LORA_HD uint32_t dropout_threshold(double p) {
  return p <= 0.0 ? 0u : static_cast<uint32_t>(p * static_cast<double>(1u << kDropoutBits));
}

// Everything a kernel needs to apply the mask of x ([M, K] view) at element (i, j).
struct DropoutParams {
  uint32_t threshold = 0;  // floor(p * 2^24); 0 means no dropout (every element kept, keep_scale 1)
  float keep_scale = 1.0f; // float(1 / (1 - p)), multiplies kept elements
  uint64_t seed = 0;       // 64-bit seed (from the op's rng tensor, element 0)
  uint64_t offset = 0;     // counter offset (rng tensor element 1): advance it to reuse a seed
  int64_t cols = 0;        // K, the row length of x: counter of (i, j) is offset + i * cols + j

  LORA_HD bool enabled() const { return threshold != 0; }
};

// keep(i, j) for one element; kernels that walk many elements hoist key / hi_key out of the loop.
LORA_HD bool dropout_keep(const DropoutParams& d, int64_t i, int64_t j) {
  const uint64_t ctr = d.offset + static_cast<uint64_t>(i) * static_cast<uint64_t>(d.cols) + static_cast<uint64_t>(j);
  const uint32_t key = dropout_key(d.seed);
  const uint32_t h =
      dropout_hash(key, dropout_hi_key(key, static_cast<uint32_t>(ctr >> 32)), static_cast<uint32_t>(ctr));
  return dropout_keep_hash(h, d.threshold);
}

} // namespace lora_ops
