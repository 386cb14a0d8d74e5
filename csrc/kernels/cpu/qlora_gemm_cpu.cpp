// The CPU GEMM path (kGemm): W panels dequantized into L2-resident scratch, swept by the register tile
// (gemm_tile.h); see qlora_cpu.cpp's design note.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/cpu_isa.h"
#include "cpu/gemm_tile.h"
#include "cpu/nf4_decode_segment.h"
#include "cpu/qlora_cpu_kernels.h"
#include "cpu/qlora_epilogue.h"
#include "cpu/row_convert.h"
#include "cpu/x86_target.h"

namespace lora_ops::cpu {
namespace {

constexpr int64_t kKB = 256; // reduction block: 4 x [256 x 16] fp32 = 64 KiB scratch
// Rows of x converted to fp32 at a time (an M-block; bounds every buffer): as many as fit kX32Bytes,
// within [kMBMin, kMBMax]. Each M-block decodes all of W once more: with 256-row blocks that decode was
// ~9 % of a 2048 x 4096 x 4096 fp32 forward on Zen 4 (perf); 768 or 1024 rows took 7 % less time.
constexpr int64_t kMBMin = 256, kMBMax = 1024;
constexpr int64_t kX32Bytes = int64_t{12} << 20;

#ifdef LORA_OPS_X86
// Transposes an 8x8 fp32 tile: rows src[r * lds .. +8] -> rows dst[c * ldd .. +8].
LORA_AVX2 inline void transpose8x8_avx2(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i)
    r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}
#endif

// Dequantizes the W panel for output columns [o0, o0 + ow) and reduction indices [i0, i0 + kb) into 4
// micro-panels [kKB][16] (columns beyond ow are zero).
void dequant_panel(const QloraMatmulParams& p, int64_t o0, int64_t ow, int64_t i0, int64_t kb, float* scratch,
                   float* tmp) {
  const int64_t K = p.k;
  const int n_micro = static_cast<int>((ow + kNR - 1) / kNR);
#ifdef LORA_OPS_X86
  if (!p.transpose_w && cpu_isa() >= CpuIsa::kAvx2) {
    // 8 W rows are decoded into tmp [8][kKB], then 8x8 tiles are transposed into the micro-panel.
    for (int64_t t0 = 0; t0 < n_micro * kNR; t0 += 8) {
      for (int64_t rr = 0; rr < 8; ++rr) {
        float* row = tmp + rr * kKB;
        if (t0 + rr < ow)
          decode_segment(p.weight, p.a_dtype, (o0 + t0 + rr) * K + i0, kb, row);
        else
          std::fill(row, row + kb, 0.0f);
      }
      float* dst = scratch + (t0 / kNR) * kKB * kNR + (t0 % kNR);
      int64_t kk = 0;
      for (; kk + 8 <= kb; kk += 8)
        transpose8x8_avx2(tmp + kk, kKB, dst + kk * kNR, kNR);
      for (; kk < kb; ++kk)
        for (int64_t rr = 0; rr < 8; ++rr)
          dst[kk * kNR + rr] = tmp[rr * kKB + kk];
    }
    return;
  }
#endif
  if (!p.transpose_w) {
    // Output column o is W row o; the reduction runs along that row (contiguous codes): decode the
    // row segment, then scatter it into column o % 16 of its micro-panel.
    for (int64_t t = 0; t < n_micro * kNR; ++t) {
      float* dst = scratch + (t / kNR) * kKB * kNR + (t % kNR);
      if (t < ow) {
        decode_segment(p.weight, p.a_dtype, (o0 + t) * K + i0, kb, tmp);
        for (int64_t kk = 0; kk < kb; ++kk)
          dst[kk * kNR] = tmp[kk];
      } else {
        for (int64_t kk = 0; kk < kb; ++kk)
          dst[kk * kNR] = 0.0f;
      }
    }
  } else {
    // Output column o is W column o; reduction index n is W row n, whose codes for [o0, o0 + ow) are
    // contiguous: decode and copy 16-wide chunks (no transposed copy of W exists anywhere).
    for (int64_t kk = 0; kk < kb; ++kk) {
      decode_segment(p.weight, p.a_dtype, (i0 + kk) * K + o0, ow, tmp);
      for (int64_t t = ow; t < n_micro * kNR; ++t)
        tmp[t] = 0.0f;
      for (int j = 0; j < n_micro; ++j)
        std::memcpy(scratch + j * kKB * kNR + kk * kNR, tmp + j * kNR, kNR * sizeof(float));
    }
  }
}

} // namespace

void matmul_gemm(const QloraMatmulParams& p) {
  const int64_t n_in = p.transpose_w ? p.n : p.k;
  const int64_t n_out = p.transpose_w ? p.k : p.n;
  const int64_t n_panels = (n_out + kPanel - 1) / kPanel;
  // Row pitch padded off multiples of 4 KiB so the 6 rows a micro-kernel reads do not alias in L1.
  // Without dropout the LoRA term joins the reduction as r more terms (LoRA folded into K): x rows get
  // s [m, :] after their n_in values, the panel r more rows scale·lw[o, :], and the micro-kernel does
  // the rest (a separate term per output row cost half as much as the K = 128 product itself). With
  // dropout the term is masked per output element, so it stays in the epilogue.
  const bool fold = p.rank > 0 && !p.dropout.enabled();
  const int64_t n_fold = fold ? p.rank : 0;
  const int64_t ldx = ((n_in + n_fold + 15) / 16) * 16 + 16;
  const int64_t block_rows = std::clamp<int64_t>(kX32Bytes / (4 * ldx), kMBMin, kMBMax);
  const int64_t mb_max = std::min(block_rows, p.m);
  std::vector<float> x32(static_cast<size_t>(mb_max * ldx));
  const Epilogue ep(p);
  const bool parallel = worth_threads(p);
  const int64_t n_threads = parallel ? omp_get_max_threads() : 1;
  const int64_t mr_max = tile_rows();
  for (int64_t m0 = 0; m0 < p.m; m0 += block_rows) {
    const int64_t mb = std::min(block_rows, p.m - m0);
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t m = 0; m < mb; ++m) {
      load_row(p.a, p.a_dtype, (m0 + m) * p.a_row_stride, p.a_col_stride, n_in, x32.data() + m * ldx);
      if (fold)
        std::memcpy(x32.data() + m * ldx + n_in, static_cast<const float*>(p.lora_s) + (m0 + m) * p.lora_s_row_stride,
                    static_cast<size_t>(n_fold) * sizeof(float));
    }
    // Fewer panels than 4 per thread (small N, as in the demo's k/v projections: one panel) would leave
    // threads idle or unevenly loaded: the rows are then split into parts too, a task being (panel, part). Parts of
    // one panel re-decode it, unless one thread runs them back to back with the whole reduction in
    // one block (the scratch still holds it).
    const int64_t n_parts =
        std::clamp<int64_t>((4 * n_threads + n_panels - 1) / n_panels, 1, (mb + mr_max - 1) / mr_max);
    const int64_t part_rows = ((mb + n_parts - 1) / n_parts + mr_max - 1) / mr_max * mr_max;
    const int64_t n_tasks = n_panels * n_parts;
#pragma omp parallel if (parallel)
    {
      AlignedBuffer scratch(kKB * kPanel);
      std::vector<float> tmp(static_cast<size_t>(8 * kKB));
      AlignedBuffer c(mb * kPanel);
      std::vector<float> lw(static_cast<size_t>(std::max<int64_t>(p.rank, 1) * kPanel));
      AlignedBuffer lora_panel(n_fold * kPanel); // fold: micro-panels [r][16] of scale·lw
      int64_t in_scratch = -1; // the panel whose whole reduction the scratch holds (n_in <= kKB)
      const auto run_task = [&](int64_t task) {
        const int64_t panel = task / n_parts, r0 = (task % n_parts) * part_rows;
        const int64_t r1 = std::min(mb, r0 + part_rows);
        if (r0 >= r1)
          return;
        const int64_t o0 = panel * kPanel;
        const int64_t ow = std::min<int64_t>(kPanel, n_out - o0);
        const int n_micro = static_cast<int>((ow + kNR - 1) / kNR);
        for (int64_t i0 = 0; i0 < n_in; i0 += kKB) {
          const int64_t kb = std::min(kKB, n_in - i0);
          if (!(n_in <= kKB && in_scratch == panel))
            dequant_panel(p, o0, ow, i0, kb, scratch.ptr, tmp.data());
          in_scratch = n_in <= kKB ? panel : -1;
          for (int64_t mg = r0; mg < r1; mg += mr_max) {
            const int mr = static_cast<int>(std::min<int64_t>(mr_max, r1 - mg));
            for (int j = 0; j < n_micro; ++j)
              ukernel_rows(mr, x32.data() + mg * ldx + i0, ldx, scratch.ptr + j * kKB * kNR, kb,
                           c.ptr + mg * kPanel + j * kNR, kPanel, i0 > 0);
          }
        }
        if (p.rank > 0)
          ep.load_lora_panel(o0, ow, lw.data());
        if (fold) {
          const float scale = static_cast<float>(p.scale);
          for (int j = 0; j < n_micro; ++j)
            for (int64_t q = 0; q < n_fold; ++q)
              for (int cc = 0; cc < kNR; ++cc)
                lora_panel.ptr[(j * n_fold + q) * kNR + cc] = scale * lw[q * kPanel + j * kNR + cc];
          for (int64_t mg = r0; mg < r1; mg += mr_max) {
            const int mr = static_cast<int>(std::min<int64_t>(mr_max, r1 - mg));
            for (int j = 0; j < n_micro; ++j)
              ukernel_rows(mr, x32.data() + mg * ldx + n_in, ldx, lora_panel.ptr + j * n_fold * kNR, n_fold,
                           c.ptr + mg * kPanel + j * kNR, kPanel, true);
          }
        }
        for (int64_t m = r0; m < r1; ++m)
          ep.finish_row(m0 + m, o0, ow, c.ptr + m * kPanel, fold ? nullptr : lw.data());
      };
      if (n_parts > 1) { // contiguous task runs per thread: a panel's parts mostly on one thread
#pragma omp for schedule(static)
        for (int64_t task = 0; task < n_tasks; ++task)
          run_task(task);
      } else {
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < n_tasks; ++task)
          run_task(task);
      }
    }
  }
}

} // namespace lora_ops::cpu
