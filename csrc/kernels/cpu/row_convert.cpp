// The AVX2 row converters of row_convert.h.
#include "cpu/row_convert.h"

namespace lora_ops::cpu {

#ifdef LORA_OPS_X86
LORA_AVX2 void fp16_row_to_float_avx2(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i)
    dst[i] = fp16_to_float(src[i]);
}
// bf16 -> fp32 is exact: the 16 bits become the high half of the fp32 bits.
LORA_AVX2 void bf16_row_to_float_avx2(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; i < n; ++i)
    dst[i] = bf16_to_float(src[i]);
}
#endif

} // namespace lora_ops::cpu
