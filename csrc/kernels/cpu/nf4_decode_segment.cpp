// NF4 decode of weight element runs into fp32 (nf4_decode_segment.h): portable and AVX2.
#include "cpu/nf4_decode_segment.h"

#include <algorithm>
#include <cstring>

#include "common/nf4_format.h"
#include "cpu/cpu_isa.h"
#include "cpu/float_convert.h"
#include "cpu/nf4_cpu.h"
#include "cpu/simd_round.h"
#include "cpu/x86_target.h"

namespace lora_ops::cpu {
namespace {

constexpr float kCodebook[16] = {LORA_OPS_NF4_VALUES};

// The weight value rule (spec section 4): the fp32 product rounded once to the compute dtype.
inline float round_to_compute(float v, DType t) {
  switch (t) {
  case DType::kFloat16:
    return fp16_to_float(float_to_fp16(v));
  case DType::kBFloat16:
    return bf16_to_float(float_to_bf16(v));
  default:
    return v; // fp32 and the fp64 path use the exact fp32 product
  }
}

} // namespace

// ---- NF4 decode of a run of consecutive (flattened) weight elements into fp32 ------------------
void decode_segment_portable(const Nf4Weight& w, DType t, int64_t f, int64_t len, float* dst) {
  const int64_t bs = w.blocksize;
  const int64_t end = f + len;
  float tab[16];
  while (f < end) {
    const int64_t b = f / bs;
    const int64_t run_end = std::min(end, (b + 1) * bs);
    const float amax = nf4_block_absmax(w, b);
    for (int c = 0; c < 16; ++c)
      tab[c] = round_to_compute(nf4_decode(kCodebook[c], amax), t);
    for (; f < run_end; ++f) {
      const uint8_t byte = w.packed[f >> 1];
      *dst++ = tab[(f & 1) ? nf4_low(byte) : nf4_high(byte)];
    }
  }
}

#ifdef LORA_OPS_X86
namespace {
// 8 codes per step: the 4 packed bytes are broadcast to 8 lanes and shifted so lane i holds code i
// (element 2j = high nibble of byte j: shifts 4,0,12,8,...); vpermps looks codes 0-7 and 8-15 up in
// two 8-entry tables and bit 3 (moved to the sign bit) selects between them.
LORA_AVX2 void decode_segment_avx2(const Nf4Weight& w, DType t, int64_t f, int64_t len, float* dst) {
  const int64_t bs = w.blocksize;
  const int64_t end = f + len;
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  const __m256i low4 = _mm256_set1_epi32(0xF);
  const __m256 cb_lo = _mm256_loadu_ps(kCodebook);
  const __m256 cb_hi = _mm256_loadu_ps(kCodebook + 8);
  alignas(32) float tab[16];
  while (f < end) {
    const int64_t b = f / bs;
    const int64_t run_end = std::min(end, (b + 1) * bs);
    const __m256 amax = _mm256_set1_ps(nf4_block_absmax(w, b));
    // One fp32 product per code (exactly nf4_decode), then one rounding to the compute dtype.
    const __m256 t_lo = round_to_compute_avx2(_mm256_mul_ps(cb_lo, amax), t);
    const __m256 t_hi = round_to_compute_avx2(_mm256_mul_ps(cb_hi, amax), t);
    if (f & 1) { // odd start: the low nibble of a byte, then the run is byte-aligned
      _mm256_store_ps(tab, t_lo);
      _mm256_store_ps(tab + 8, t_hi);
      *dst++ = tab[nf4_low(w.packed[f >> 1])];
      ++f;
    }
    for (; f + 8 <= run_end; f += 8, dst += 8) {
      uint32_t u;
      std::memcpy(&u, w.packed + (f >> 1), 4);
      const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(u)), shifts), low4);
      const __m256 lo = _mm256_permutevar8x32_ps(t_lo, idx);
      const __m256 hi = _mm256_permutevar8x32_ps(t_hi, idx);
      _mm256_storeu_ps(dst, _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))));
    }
    if (f < run_end) {
      _mm256_store_ps(tab, t_lo);
      _mm256_store_ps(tab + 8, t_hi);
      for (; f < run_end; ++f) {
        const uint8_t byte = w.packed[f >> 1];
        *dst++ = tab[(f & 1) ? nf4_low(byte) : nf4_high(byte)];
      }
    }
  }
}
} // namespace
#endif

void decode_segment(const Nf4Weight& w, DType t, int64_t f, int64_t len, float* dst) {
#ifdef LORA_OPS_X86
  if (cpu_isa() >= CpuIsa::kAvx2)
    return decode_segment_avx2(w, t, f, len, dst);
#endif
  decode_segment_portable(w, t, f, len, dst);
}

} // namespace lora_ops::cpu
