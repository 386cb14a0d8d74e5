// The CPU dx with few rows (kAxpy); see qlora_cpu_kernels.h.
#include <algorithm>
#include <vector>

#include "cpu/cpu_isa.h"
#include "cpu/nf4_decode_segment.h"
#include "cpu/qlora_cpu_kernels.h"
#include "cpu/qlora_epilogue.h"
#include "cpu/x86_target.h"

namespace lora_ops::cpu {
namespace {

// dx with few rows: out[m, k] = Σ_n a[m, n] · W[n, k]. Threads own column ranges of W (kAxpyCols wide)
// and stream every W row segment once, decoding it into an L1 buffer and adding a[m, n] times it to
// each row's fp32 accumulator (an axpy; no transposition of W, long contiguous decode runs).
constexpr int64_t kAxpyCols = 512;
// W rows summed from 0 before their sum joins the accumulator: one chain over all N (4096..14336 terms)
// had several times the fp32 error of torch's matmul (tests/test_qlora_cpu_accuracy.py).
constexpr int64_t kAxpyRun = 256;

void axpy_portable(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    y[i] += a * x[i];
}
#ifdef LORA_OPS_X86
LORA_AVX2 void axpy_avx2(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i)
    y[i] += a * x[i];
}
#endif
void axpy(float a, const float* x, float* y, int64_t n) {
#ifdef LORA_OPS_X86
  if (cpu_isa() >= CpuIsa::kAvx2)
    return axpy_avx2(a, x, y, n);
#endif
  axpy_portable(a, x, y, n);
}

} // namespace

void matmul_axpy_transposed(const QloraMatmulParams& p) {
  const int64_t K = p.k, N = p.n, M = p.m;
  const std::vector<float> a32 = rows_to_f32(p, N);
  const Epilogue ep(p);
  const int64_t n_tasks = (K + kAxpyCols - 1) / kAxpyCols;
#pragma omp parallel if (worth_threads(p))
  {
    AlignedBuffer wrow(kAxpyCols);
    std::vector<float> acc(static_cast<size_t>(M * kAxpyCols));
    std::vector<float> part(static_cast<size_t>(M * kAxpyCols)); // the sum over the current run of W rows
    std::vector<float> lw(static_cast<size_t>(std::max<int64_t>(p.rank, 1) * kPanel));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int64_t k0 = task * kAxpyCols;
      const int64_t kw = std::min(kAxpyCols, K - k0);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t n0 = 0; n0 < N; n0 += kAxpyRun) { // blocked summation over n (as the GEMM tile's over K)
        std::fill(part.begin(), part.end(), 0.0f);
        for (int64_t n = n0; n < std::min(N, n0 + kAxpyRun); ++n) {
          decode_segment(p.weight, p.a_dtype, n * K + k0, kw, wrow.ptr);
          for (int64_t m = 0; m < M; ++m) {
            const float av = a32[m * N + n];
            if (av != 0.0f)
              axpy(av, wrow.ptr, part.data() + m * kAxpyCols, kw);
          }
        }
        for (int64_t m = 0; m < M; ++m)
          axpy(1.0f, part.data() + m * kAxpyCols, acc.data() + m * kAxpyCols, kw);
      }
      for (int64_t o0 = k0; o0 < k0 + kw; o0 += kPanel) {
        const int64_t ow = std::min<int64_t>(kPanel, k0 + kw - o0);
        if (p.rank > 0)
          ep.load_lora_panel(o0, ow, lw.data());
        for (int64_t m = 0; m < M; ++m)
          ep.finish_row(m, o0, ow, acc.data() + m * kAxpyCols + (o0 - k0), lw.data());
      }
    }
  }
}

} // namespace lora_ops::cpu
