// The 6x16 register tile of the CPU GEMM (gemm_tile.h), portable and AVX2, and the per-level dispatch.
#include "cpu/gemm_tile.h"

#include "cpu/cpu_isa.h"
#include "cpu/gemm_ukernel_avx512.h"
#include "cpu/x86_target.h"

namespace lora_ops::cpu {
namespace {

// ---- micro-kernel: C[MR x 16] (+)= x[MR x kb] · P[kb x 16] -------------------------------------
// The kb products are summed from 0 and then added to C (accumulate): blocked summation over the
// reduction, whose fp32 error stays near a BLAS GEMM's (a chain over all of K had 3-7x that at K = 4096).
template <int MR>
void ukernel_portable(const float* x, int64_t ldx, const float* pw, int64_t kb, float* c, int64_t ldc,
                      bool accumulate) {
  float acc[MR][kNR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j)
      acc[i][j] = 0.0f;
  for (int64_t k = 0; k < kb; ++k) {
    const float* wk = pw + k * kNR;
    for (int i = 0; i < MR; ++i) {
      const float xv = x[i * ldx + k];
      for (int j = 0; j < kNR; ++j)
        acc[i][j] += xv * wk[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j)
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
}

#ifdef LORA_OPS_X86
// 12 ymm accumulators (6 rows x 2 vectors), 2 weight loads and 6 broadcasts per k: FMA-bound. The
// accumulators are named variables (an array of __m256 made gcc spill them to the stack every k).
#define LORA_UK_ROW(i)                                                                                                 \
  if constexpr (MR > i) {                                                                                              \
    const __m256 xv = _mm256_broadcast_ss(x + i * ldx + k);                                                            \
    c##i##0 = _mm256_fmadd_ps(xv, w0, c##i##0);                                                                        \
    c##i##1 = _mm256_fmadd_ps(xv, w1, c##i##1);                                                                        \
  }
#define LORA_UK_INIT(i) __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps();
#define LORA_UK_STORE(i)                                                                                               \
  if constexpr (MR > i) {                                                                                              \
    _mm256_storeu_ps(c + i * ldc, accumulate ? _mm256_add_ps(_mm256_loadu_ps(c + i * ldc), c##i##0) : c##i##0);       \
    _mm256_storeu_ps(c + i * ldc + 8, accumulate ? _mm256_add_ps(_mm256_loadu_ps(c + i * ldc + 8), c##i##1) : c##i##1); \
  }
template <int MR>
LORA_AVX2 void ukernel_avx2(const float* x, int64_t ldx, const float* pw, int64_t kb, float* c, int64_t ldc,
                            bool accumulate) {
  LORA_UK_INIT(0)
  LORA_UK_INIT(1) LORA_UK_INIT(2) LORA_UK_INIT(3) LORA_UK_INIT(4) LORA_UK_INIT(5) for (int64_t k = 0; k < kb; ++k) {
    const __m256 w0 = _mm256_load_ps(pw + k * kNR);
    const __m256 w1 = _mm256_load_ps(pw + k * kNR + 8);
    LORA_UK_ROW(0) LORA_UK_ROW(1) LORA_UK_ROW(2) LORA_UK_ROW(3) LORA_UK_ROW(4) LORA_UK_ROW(5)
  }
  LORA_UK_STORE(0) LORA_UK_STORE(1) LORA_UK_STORE(2) LORA_UK_STORE(3) LORA_UK_STORE(4) LORA_UK_STORE(5)
}
#undef LORA_UK_ROW
#undef LORA_UK_INIT
#undef LORA_UK_STORE
#endif

template <int MR>
void ukernel(const float* x, int64_t ldx, const float* pw, int64_t kb, float* c, int64_t ldc, bool accumulate) {
#ifdef LORA_OPS_X86
  if (cpu_isa() >= CpuIsa::kAvx2)
    return ukernel_avx2<MR>(x, ldx, pw, kb, c, ldc, accumulate);
#endif
  ukernel_portable<MR>(x, ldx, pw, kb, c, ldc, accumulate);
}

} // namespace

// Rows per register tile at the SIMD level in use (ukernel_rows takes up to this many).
int64_t tile_rows() { return cpu_isa() >= CpuIsa::kAvx512 ? kMrAvx512 : kMR; }

void ukernel_rows(int mr, const float* x, int64_t ldx, const float* pw, int64_t kb, float* c, int64_t ldc,
                  bool accumulate) {
#ifdef LORA_OPS_X86
  if (cpu_isa() >= CpuIsa::kAvx512)
    return ukernel_avx512(mr, x, ldx, pw, kb, c, ldc, accumulate);
#endif
  switch (mr) {
  case 1:
    return ukernel<1>(x, ldx, pw, kb, c, ldc, accumulate);
  case 2:
    return ukernel<2>(x, ldx, pw, kb, c, ldc, accumulate);
  case 3:
    return ukernel<3>(x, ldx, pw, kb, c, ldc, accumulate);
  case 4:
    return ukernel<4>(x, ldx, pw, kb, c, ldc, accumulate);
  case 5:
    return ukernel<5>(x, ldx, pw, kb, c, ldc, accumulate);
  default:
    return ukernel<6>(x, ldx, pw, kb, c, ldc, accumulate);
  }
}

} // namespace lora_ops::cpu
