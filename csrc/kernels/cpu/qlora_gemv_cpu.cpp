// The CPU forward with few rows (kRowDot, kRowDotFused); see qlora_cpu_kernels.h.
#include <algorithm>
#include <vector>

#include "cpu/cpu_isa.h"
#include "cpu/nf4_decode_segment.h"
#include "cpu/nf4_rowdot.h"
#include "cpu/qlora_cpu_kernels.h"
#include "cpu/qlora_epilogue.h"
#include "cpu/row_convert.h"
#include "cpu/x86_target.h"

namespace lora_ops::cpu {
namespace {

// ---- dot product (GEMV path) ------------------------------------------------------------------
float dot_portable(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j)
      acc[j] += a[i + j] * b[i + j];
  float s = 0.0f;
  for (int j = 0; j < 8; ++j)
    s += acc[j];
  for (; i < n; ++i)
    s += a[i] * b[i];
  return s;
}

#ifdef LORA_OPS_X86
LORA_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8)
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  const __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, s);
  float r = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; i < n; ++i)
    r += a[i] * b[i];
  return r;
}
#endif

#ifdef LORA_OPS_X86
// out[j] = x · w_j for 4 weight rows at once: one x load feeds 4 FMAs; 2-way unrolled so 8 independent
// accumulator chains cover the FMA latency.
LORA_AVX2 void dot4_avx2(const float* x, const float* w, int64_t ldw, int64_t n, float* out) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j)
    a[j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
    for (int j = 0; j < 4; ++j) {
      a[j] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w + j * ldw + i), a[j]);
      a[4 + j] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w + j * ldw + i + 8), a[4 + j]);
    }
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 x0 = _mm256_loadu_ps(x + i);
    for (int j = 0; j < 4; ++j)
      a[j] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w + j * ldw + i), a[j]);
  }
  for (int j = 0; j < 4; ++j) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_add_ps(a[j], a[4 + j]));
    float r = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (int64_t t = i; t < n; ++t)
      r += x[t] * w[j * ldw + t];
    out[j] = r;
  }
}
#endif

float dot(const float* a, const float* b, int64_t n) {
#ifdef LORA_OPS_X86
  if (cpu_isa() >= CpuIsa::kAvx2)
    return dot_avx2(a, b, n);
#endif
  return dot_portable(a, b, n);
}

} // namespace

std::vector<float> rows_to_f32(const QloraMatmulParams& p, int64_t cols) {
  std::vector<float> out(static_cast<size_t>(p.m * cols));
  for (int64_t m = 0; m < p.m; ++m)
    load_row(p.a, p.a_dtype, m * p.a_row_stride, p.a_col_stride, cols, out.data() + m * cols);
  return out;
}

// Forward with few rows: each thread takes 64 W rows (output columns) at a time and either decodes them in
// registers straight into the dot products (kRowDotFused, nf4_rowdot.h) or decodes 4 rows at a time into
// an L1 buffer and dots them with each x row (kRowDot).
void matmul_gemv(const QloraMatmulParams& p, CpuMatmulPath path) {
  const int64_t K = p.k, N = p.n, M = p.m;
  std::vector<float> x32 = rows_to_f32(p, K);
  const Epilogue ep(p);
  constexpr int64_t kRows = kPanel; // W rows per task: the epilogue works on 64 columns at a time
  const int64_t n_tasks = (N + kRows - 1) / kRows;
  const bool fused = path == CpuMatmulPath::kRowDotFused; // codes decoded in registers
  if (fused)
    rowdot_prepare_x(p.weight, p.a_dtype, M, K, x32.data());
#pragma omp parallel if (worth_threads(p))
  {
    AlignedBuffer wrow(fused ? 0 : 4 * K);
    std::vector<float> lw(static_cast<size_t>(std::max<int64_t>(p.rank, 1) * kPanel));
    std::vector<float> c(static_cast<size_t>(M * kPanel));
#pragma omp for schedule(static)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int64_t o0 = task * kRows;
      const int64_t ow = std::min(kRows, N - o0);
      int64_t t = 0;
      ep.prefetch_lora_panel(o0, ow);
#ifdef LORA_OPS_X86
      if (fused) {
        rowdot_fused(p.weight, p.a_dtype, K, o0, ow, x32.data(), M, c.data(), kPanel);
        t = ow;
      }
      if (cpu_isa() >= CpuIsa::kAvx2) {
        for (; t + 4 <= ow; t += 4) {
          decode_segment(p.weight, p.a_dtype, (o0 + t) * K, 4 * K, wrow.ptr); // 4 consecutive W rows
          float d[4];
          for (int64_t m = 0; m < M; ++m) {
            dot4_avx2(x32.data() + m * K, wrow.ptr, K, K, d);
            for (int j = 0; j < 4; ++j)
              c[m * kPanel + t + j] = d[j];
          }
        }
      }
#endif
      for (; t < ow; ++t) {
        decode_segment(p.weight, p.a_dtype, (o0 + t) * K, K, wrow.ptr);
        for (int64_t m = 0; m < M; ++m)
          c[m * kPanel + t] = dot(x32.data() + m * K, wrow.ptr, K);
      }
      if (p.rank > 0)
        ep.load_lora_panel(o0, ow, lw.data());
      for (int64_t m = 0; m < M; ++m)
        ep.finish_row(m, o0, ow, c.data() + m * kPanel, lw.data());
    }
  }
}

} // namespace lora_ops::cpu
