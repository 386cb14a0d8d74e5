// Which CPU kernel runs a qlora_matmul call: the one place that chooses, and the crossover table it
// reads. The binding layer (csrc/bindings/register_cpu.cpp) passes the table, with any environment
// overrides applied there; the kernels never read the environment.
#pragma once
#include <cstdint>

#include "common/qlora_params.h"

namespace lora_ops::cpu {

enum class CpuMatmulPath {
  kRowDot,  // forward, few rows: decode W rows into L1 and dot them with each x row
  kAxpy,    // dx, few rows: decode W row segments once, axpy them into each row's accumulator
  kGemm,    // cache-blocked dequantize-panel + 6x16 register-tiled GEMM
  kFloat64, // reference-grade float64 path (gradcheck)
};

// Largest M of each small-M path (larger M -> kGemm).
struct CpuCrossover {
  int64_t row_dot_max_m;
  int64_t axpy_max_m;
};

// Measured on a 2-core AMD EPYC (AVX2), bf16, 4096x4096: bench/notes_qlora_cpu.md. Override for
// benchmarks with LORA_OPS_GEMV_MAX_M / LORA_OPS_AXPY_MAX_M (read by the binding layer).
constexpr CpuCrossover kCpuCrossover{16, 16};

inline CpuMatmulPath choose_matmul_path(const QloraMatmulParams& p, const CpuCrossover& table) {
  if (p.a_dtype == DType::kFloat64)
    return CpuMatmulPath::kFloat64;
  if (!p.transpose_w && p.m <= table.row_dot_max_m)
    return CpuMatmulPath::kRowDot;
  if (p.transpose_w && p.m <= table.axpy_max_m)
    return CpuMatmulPath::kAxpy;
  return CpuMatmulPath::kGemm;
}

} // namespace lora_ops::cpu
