// Which CPU kernel runs a qlora_matmul call: the one place that chooses, and the crossover table it
// reads. The binding layer (csrc/bindings/register_cpu.cpp) passes the table, with any environment
// overrides applied there; the kernels never read the environment.
#pragma once
#include <cstdint>

#include "common/qlora_params.h"
#include "cpu/cpu_isa.h"
#include "cpu/nf4_rowdot.h"

namespace lora_ops::cpu {

enum class CpuMatmulPath {
  kRowDot,  // forward, few rows: decode W rows into L1 and dot them with each x row
  kRowDotFused, // forward, few rows, AVX2 / AVX-512, K % blocksize == 0: codes decoded in registers (cpu/nf4_rowdot.h)
  kAxpy,    // dx, few rows: decode W row segments once, axpy them into each row's accumulator
  kGemm,     // cache-blocked dequantize-panel + 6x16 register-tiled GEMM
  kSlabGemm, // large M: W dequantized in bounded slabs, ATen's fp32 GEMM (MKL/oneDNN), LoRA folded into K;
             // runs in the binding layer (csrc/bindings/qlora_slab.cpp), the kernels stay torch-free
  kFloat64, // reference-grade float64 path (gradcheck)
};

// Largest M of each small-M path, smallest M of the slab GEMM (kGemm in between), per activation
// dtype and form (forward y / backward dx), and the slab path's budgets and GEMM kind.
struct CpuCrossover {
  int64_t row_dot_max_m;
  int64_t fused_row_dot_max_m_bytes; // kRowDotFused, its bf16 kernel (bf16, blocksize >= 64)
  int64_t fused_row_dot_max_m_other; // kRowDotFused, its vpermps kernel (fp16 / fp32, blocksize 32)
  int64_t axpy_max_m;
  int64_t slab_min_m_fwd_bf16; // bf16 activations, forward
  int64_t slab_min_m_dx_bf16;  // bf16 activations, dx
  int64_t slab_min_m_fwd_fp16; // fp16 activations, forward
  int64_t slab_min_m_dx_fp16;  // fp16 activations, dx
  int64_t slab_min_m_fwd_fp32; // fp32 activations, forward
  int64_t slab_min_m_dx_fp32;  // fp32 activations, dx
  int64_t slab_min_work;       // and M·N·K at least this (below, the GEMM call's fixed cost loses to kGemm)
  int64_t slab_bytes;          // W slab scratch of the slab path, in the GEMM's dtype (one slab, reused)
  int64_t slab_rows_bytes;     // activation copy of the slab path (M is chunked beyond it)
  bool slab_bf16_gemm;         // bf16 activations take ATen's bf16 GEMM in the slab path (else its fp32 one)
};

// "row_dot", "row_dot_fused", "axpy", "gemm", "slab" or "float64" (lora_ops._native.cpu_matmul_path).
constexpr const char* cpu_matmul_path_name(CpuMatmulPath path) {
  switch (path) {
  case CpuMatmulPath::kRowDot: return "row_dot";
  case CpuMatmulPath::kRowDotFused: return "row_dot_fused";
  case CpuMatmulPath::kAxpy: return "axpy";
  case CpuMatmulPath::kGemm: return "gemm";
  case CpuMatmulPath::kSlabGemm: return "slab";
  case CpuMatmulPath::kFloat64: return "float64";
  }
  return "?";
}

// A slab_min_m_* value that no M reaches: the slab path is off for that dtype and form.
constexpr int64_t kSlabNever = INT64_MAX;

// AVX2 (and portable) kernels. Measured on a 2-core AMD EPYC (Zen 1, AVX2; lscpu "AMD EPYC"), bf16 and
// fp32, 4096x4096 and 1024x1024: bench/notes_qlora_cpu.md. Row-dot / axpy up to M = 16. The fused row-dot
// (codes decoded in registers) beats the buffered one at every M <= 16 with bf16 byte tables and up to
// M = 4 with vpermps tables (fp32: 0.91x at M = 1..4, 1.5-1.9x slower at M = 6..16, where the buffered
// path's 4-row dot reuses each x load). The slab path (ATen's MKL sgemm; torch's bf16 GEMM is ~6x slower
// there) never beat the 6x16 AVX2 kernel consistently: 0.71-0.99x of its speed for M = 32..512 and 8192,
// 0.99-1.05x at M = 2048 (bench/results/cpu_crossover*/), so it is off on this CPU kind.
// Slab scratch: 4.25 MiB of W (fp32: 256 output columns of a 4096-long reduction plus the LoRA columns),
// 64 MiB of rows.
constexpr int64_t kCpuSlabBytes = (17 << 20) / 4;
constexpr CpuCrossover kCpuCrossoverAvx2{16,         16,         4,          16,         kSlabNever, kSlabNever,
                                         kSlabNever, kSlabNever, kSlabNever, kSlabNever, 0,          kCpuSlabBytes,
                                         64 << 20,   false};

// AVX-512 BF16 kernels (cpu_isa.h: kAvx512Bf16). Measured on a 2-core AMD EPYC with AVX-512 BF16 (Zen 4,
// lscpu family 25 model 17), 4096x4096, r = 16: bench/notes_qlora_cpu.md. The fused row-dot wins at every M <= 16 and
// dtype. The slab path with oneDNN's bf16 GEMM beats the kGemm tile for bf16 at every measured M from 17,
// forward (1.28-2.59x; 1.83x at M = 2048) and dx (1.19-1.41x up to M = 128, 1.95x at 2048;
// bench/results/cpu_crossover_avx512_bf16/; before the window decode's prefetch dx lost below M = 256:
// 0.57-0.92x); with the fp32 GEMM (fp32 and fp16 activations) it loses at every measured M (0.45-1.00x):
// off (bench/results/cpu_crossover_avx512/). Slab scratch as above: with the bf16 GEMM 512 output columns of
// a 4096-long reduction (at 2048 x 4096, r 16, slabs of 256, 448 and 512 columns took 1.03-1.18x a plain
// GEMM's time with no consistent order between them in interleaved runs; 512 makes the fewest calls).
// Small layers: a slab call costs ~0.1 ms however small (oneDNN's setup), so below M·N·K = 2^24 the kGemm
// tile wins (128x320 .. 512x512 at M = 17..128: slab 0.29-0.95x; at 2^24: 0.93-1.35x; from 20 Mi on
// 1.07-1.8x; back-to-back calls in one process per path, 2026-12-07, notes_qlora_cpu.md).
constexpr int64_t kCpuSlabMinWork = int64_t{1} << 24;
constexpr CpuCrossover kCpuCrossoverAvx512Bf16{16,         16,         16,         16,         17,
                                               17,         kSlabNever, kSlabNever, kSlabNever, kSlabNever,
                                               kCpuSlabMinWork, kCpuSlabBytes, 64 << 20, true};

// AVX-512 kernels without AVX512_BF16 (kAvx512: Skylake-SP, Cascade Lake, Ice Lake Xeons; no AMD CPU has
// AVX-512 without BF16). The fused row-dot is the vpermps kernel for every dtype (bf16 too): both limits 16,
// as the vpermps kernel measured on Zen 4 (every M <= 16 beat the buffered one). Large M: torch's bf16 GEMM
// has no native kernel there (a 2-core Ice Lake Xeon, family 6 model 106, 2026-12-07, 2048 x 4096 x 4096,
// 2 threads: fp32 MKL sgemm 305 GFLOP/s, bf16 63), so the slab path feeds ATen's fp32 GEMM for every
// dtype; the kGemm tile ran ~140 GFLOP/s there. The crossover M was not measured on that CPU: from M = 128,
// where on the Zen 4 the slab path's fixed cost was already amortized (docs/cpu_engines.md).
constexpr CpuCrossover kCpuCrossoverAvx512{16,  16,  16,  16,  128, 128, 128, 128, 128, 128, kCpuSlabMinWork,
                                           kCpuSlabBytes, 64 << 20, false};

// Overrides for tests and benchmarks (applied by the binding layer): LORA_OPS_GEMV_MAX_M,
// LORA_OPS_FUSED_ROWDOT_MAX_M, LORA_OPS_AXPY_MAX_M, LORA_OPS_SLAB_MIN_M, LORA_OPS_SLAB_BYTES,
// LORA_OPS_SLAB_ROWS_BYTES, LORA_OPS_SLAB_BF16_GEMM.

// The table of the kernels at this SIMD level.
constexpr const CpuCrossover& crossover_for(CpuIsa isa) {
  if (isa == CpuIsa::kAvx512Bf16)
    return kCpuCrossoverAvx512Bf16;
  return isa == CpuIsa::kAvx512 ? kCpuCrossoverAvx512 : kCpuCrossoverAvx2;
}

// isa: the SIMD level in use (cpu_isa()).
inline CpuMatmulPath choose_matmul_path(const QloraMatmulParams& p, const CpuCrossover& table, CpuIsa isa) {
  if (p.a_dtype == DType::kFloat64)
    return CpuMatmulPath::kFloat64;
  if (!p.transpose_w && p.m <= table.row_dot_max_m) {
    const int64_t fused_max_m = rowdot_byte_tables(p.weight, p.a_dtype) ? table.fused_row_dot_max_m_bytes
                                                                          : table.fused_row_dot_max_m_other;
    if (isa != CpuIsa::kPortable && rowdot_fused_applies(p.weight, p.k) && p.m <= fused_max_m)
      return CpuMatmulPath::kRowDotFused;
    return CpuMatmulPath::kRowDot;
  }
  if (p.transpose_w && p.m <= table.axpy_max_m)
    return CpuMatmulPath::kAxpy;
  const bool dx = p.transpose_w;
  const int64_t slab_min_m = p.a_dtype == DType::kBFloat16  ? (dx ? table.slab_min_m_dx_bf16 : table.slab_min_m_fwd_bf16)
                             : p.a_dtype == DType::kFloat16 ? (dx ? table.slab_min_m_dx_fp16 : table.slab_min_m_fwd_fp16)
                                                            : (dx ? table.slab_min_m_dx_fp32 : table.slab_min_m_fwd_fp32);
  // (in double: M·N·K can pass 2^63 for no real layer, but the comparison must not wrap)
  if (p.m >= slab_min_m && static_cast<double>(p.m) * p.n * p.k >= static_cast<double>(table.slab_min_work))
    return CpuMatmulPath::kSlabGemm;
  return CpuMatmulPath::kGemm;
}

} // namespace lora_ops::cpu
