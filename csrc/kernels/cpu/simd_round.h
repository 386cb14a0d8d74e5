// Rounding of fp32 SIMD vectors to the compute dtype and back, bit-identical to the scalar rule
// (round_to_compute in qlora_cpu.cpp): the weight-value contract of qlora_params.h, shared by the AVX2
// kernels that build per-block decode tables.
#pragma once

#include "common/dtype.h"
#include "cpu/x86_target.h"

namespace lora_ops::cpu {

#ifdef LORA_OPS_X86
// Rounds 8 fp32 values to the compute dtype and back (RNE), matching round_to_compute bit for bit.
LORA_AVX2 inline __m256 round_to_compute_avx2(__m256 v, DType t) {
  if (t == DType::kBFloat16) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  if (t == DType::kFloat16)
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return v;
}
#endif

} // namespace lora_ops::cpu
