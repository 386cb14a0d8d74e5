// The kernels of the CPU matmul paths (CpuMatmulPath, qlora_cpu_path.h) that qlora_matmul (qlora_cpu.cpp)
// dispatches to, one file each, and the helpers they share.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/qlora_params.h"
#include "cpu/qlora_cpu_path.h"

namespace lora_ops::cpu {

// kRowDot / kRowDotFused: forward with few rows (qlora_gemv_cpu.cpp).
void matmul_gemv(const QloraMatmulParams& p, CpuMatmulPath path);
// kAxpy: dx with few rows (qlora_axpy_cpu.cpp).
void matmul_axpy_transposed(const QloraMatmulParams& p);
// kGemm: cache-blocked dequantize-panel + register-tiled GEMM (qlora_gemm_cpu.cpp).
void matmul_gemm(const QloraMatmulParams& p);
// kFloat64: reference-grade float64 (qlora_f64_cpu.cpp).
void matmul_f64(const QloraMatmulParams& p);

// ---- 64-byte aligned scratch ---------------------------------------------------------------------
struct AlignedBuffer {
  std::vector<float> storage;
  float* ptr = nullptr;
  explicit AlignedBuffer(int64_t n) : storage(static_cast<size_t>(n + 16), 0.0f) {
    auto addr = reinterpret_cast<uintptr_t>(storage.data());
    ptr = storage.data() + ((64 - addr % 64) % 64) / sizeof(float);
  }
};

// All M rows of a ([M, cols], any strides and dtype) as one contiguous fp32 block: the small-M paths
// read each row once per W row, so they convert up front.
std::vector<float> rows_to_f32(const QloraMatmulParams& p, int64_t cols);

// Why a work threshold on the matmul kernels' OpenMP regions: a region costs a fork/join even on an idle
// machine, and when another process holds a core, a wait for a descheduled thread (milliseconds, measured
// by bench/bench_call_overhead.py on a loaded 2-core box); below this many multiply-adds plus weight
// decodes one thread is faster. Results do not depend on it: every output element is computed by one
// thread in every kernel below.
inline bool worth_threads(const QloraMatmulParams& p) { return (p.m + 1) * p.n * p.k > (int64_t{1} << 17); }

} // namespace lora_ops::cpu
