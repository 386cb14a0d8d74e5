// AVX-512 GEMM register tile (gemm_ukernel_avx512.h): one zmm accumulator per x row, the x value
// broadcast into each FMA from memory; per k one load of the 16-column weight vector. On CPUs with two
// 512-bit FMA ports (Xeon) this doubles the AVX2 tile's multiply-adds per cycle; on Zen 4 (512-bit
// operations in two halves) it halves the instructions.
#include "cpu/gemm_ukernel_avx512.h"

#include <cstdlib>

#include "cpu/x86_target.h"

namespace lora_ops::cpu {
#ifdef LORA_OPS_X86
namespace {

// Named accumulators (an array of vectors made gcc keep them on the stack in the AVX2 tile).
#define LORA_UK512_INIT(i) __m512 c##i = _mm512_setzero_ps();
#define LORA_UK512_ROW(i)                                                                                              \
  if constexpr (MR > i)                                                                                                \
    c##i = _mm512_fmadd_ps(_mm512_set1_ps(x[i * ldx + k]), w, c##i);
#define LORA_UK512_STORE(i)                                                                                            \
  if constexpr (MR > i)                                                                                                \
    _mm512_storeu_ps(c + i * ldc, accumulate ? _mm512_add_ps(_mm512_loadu_ps(c + i * ldc), c##i) : c##i);

template <int MR>
LORA_AVX512 void tile(const float* x, int64_t ldx, const float* pw, int64_t kb, float* c, int64_t ldc,
                      bool accumulate) {
  LORA_UK512_INIT(0) LORA_UK512_INIT(1) LORA_UK512_INIT(2) LORA_UK512_INIT(3) LORA_UK512_INIT(4) LORA_UK512_INIT(5)
  LORA_UK512_INIT(6) LORA_UK512_INIT(7) LORA_UK512_INIT(8) LORA_UK512_INIT(9) LORA_UK512_INIT(10) LORA_UK512_INIT(11)
  for (int64_t k = 0; k < kb; ++k) {
    const __m512 w = _mm512_load_ps(pw + k * 16);
    LORA_UK512_ROW(0) LORA_UK512_ROW(1) LORA_UK512_ROW(2) LORA_UK512_ROW(3) LORA_UK512_ROW(4) LORA_UK512_ROW(5)
    LORA_UK512_ROW(6) LORA_UK512_ROW(7) LORA_UK512_ROW(8) LORA_UK512_ROW(9) LORA_UK512_ROW(10) LORA_UK512_ROW(11)
  }
  LORA_UK512_STORE(0) LORA_UK512_STORE(1) LORA_UK512_STORE(2) LORA_UK512_STORE(3) LORA_UK512_STORE(4)
  LORA_UK512_STORE(5) LORA_UK512_STORE(6) LORA_UK512_STORE(7) LORA_UK512_STORE(8) LORA_UK512_STORE(9)
  LORA_UK512_STORE(10) LORA_UK512_STORE(11)
}
#undef LORA_UK512_INIT
#undef LORA_UK512_ROW
#undef LORA_UK512_STORE

} // namespace

void ukernel_avx512(int mr, const float* x, int64_t ldx, const float* pw, int64_t kb, float* c, int64_t ldc,
                    bool accumulate) {
  switch (mr) {
  case 1: return tile<1>(x, ldx, pw, kb, c, ldc, accumulate);
  case 2: return tile<2>(x, ldx, pw, kb, c, ldc, accumulate);
  case 3: return tile<3>(x, ldx, pw, kb, c, ldc, accumulate);
  case 4: return tile<4>(x, ldx, pw, kb, c, ldc, accumulate);
  case 5: return tile<5>(x, ldx, pw, kb, c, ldc, accumulate);
  case 6: return tile<6>(x, ldx, pw, kb, c, ldc, accumulate);
  case 7: return tile<7>(x, ldx, pw, kb, c, ldc, accumulate);
  case 8: return tile<8>(x, ldx, pw, kb, c, ldc, accumulate);
  case 9: return tile<9>(x, ldx, pw, kb, c, ldc, accumulate);
  case 10: return tile<10>(x, ldx, pw, kb, c, ldc, accumulate);
  case 11: return tile<11>(x, ldx, pw, kb, c, ldc, accumulate);
  default: return tile<12>(x, ldx, pw, kb, c, ldc, accumulate);
  }
}
#else
// Not an x86 build: cpu_isa() is never kAvx512, so no caller gets here.
void ukernel_avx512(int, const float*, int64_t, const float*, int64_t, float*, int64_t, bool) { std::abort(); }
#endif
} // namespace lora_ops::cpu
