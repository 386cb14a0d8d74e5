// Internals shared by the fused row-dot kernels (nf4_rowdot.cpp: AVX2, nf4_rowdot_avx512.cpp: AVX-512):
// the NF4 codebook, the block scale decode, and the AVX-512 entry points nf4_rowdot.cpp dispatches to.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/dtype.h"
#include "common/nf4_format.h"
#include "common/nf4_params.h"

namespace lora_ops::cpu::rowdot_detail {

constexpr float kCodebook[16] = {LORA_OPS_NF4_VALUES};
constexpr int64_t kAbsmaxRun = 64; // block scales (and tables) decoded ahead at a time: stack arrays

// The float32 absmax of blocks [b0, b0 + n), nested form decoded (spec section 3).
inline void block_absmax(const Nf4Weight& w, int64_t b0, int64_t n, float* out) {
  if (!w.nested()) {
    std::memcpy(out, w.absmax + b0, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  const float offset = *w.offset;
  for (int64_t i = 0; i < n;) { // per run of blocks sharing a second-level scale: loaded once (out may alias it)
    const int64_t g = (b0 + i) / kNestedBlocksize, end = std::min(n, (g + 1) * kNestedBlocksize - b0);
    const float absmax2 = w.absmax2[g];
    for (; i < end; ++i)
      out[i] = nf4_nested_absmax(w.nested_code[w.qabsmax[b0 + i]], absmax2, offset);
  }
}

// AVX-512 twins of rowdot_prepare_x / rowdot_fused (nf4_rowdot.h), same contracts; cpu_isa() >= kAvx512
// (nf4_rowdot_avx512.cpp). They pass bf16 weights of blocksize >= 64 to the _bf16 pair at kAvx512Bf16.
void rowdot_prepare_x_avx512(const Nf4Weight& w, DType value_dtype, int64_t m, int64_t k, float* x32);
void rowdot_avx512(const Nf4Weight& w, DType value_dtype, int64_t k, int64_t o0, int64_t rows, const float* x32,
                   int64_t m, float* out, int64_t ldo);

// The vdpbf16ps kernels' weights: bf16 values, blocksize >= 64 (one 64-column chunk within a block).
inline bool rowdot_bf16_pairs_applies(const Nf4Weight& w, DType t) {
  return t == DType::kBFloat16 && w.blocksize >= 64;
}

// The vdpbf16ps kernels (nf4_rowdot_avx512_bf16.cpp): cpu_isa() == kAvx512Bf16 and
// rowdot_bf16_pairs_applies only.
void rowdot_prepare_x_avx512_bf16(const Nf4Weight& w, DType value_dtype, int64_t m, int64_t k, float* x32);
void rowdot_avx512_bf16(const Nf4Weight& w, DType value_dtype, int64_t k, int64_t o0, int64_t rows, const float* x32,
                        int64_t m, float* out, int64_t ldo);

} // namespace lora_ops::cpu::rowdot_detail
