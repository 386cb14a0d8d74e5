// Which CUDA kernel runs a qlora_matmul call: the one place that chooses, and the crossover table it
// reads. Host-only and torch-free; the binding layer (csrc/bindings/register_cuda.cpp) passes the
// device's compute capability and any forced path it parsed from the environment.
#pragma once
#include <cstdint>

#include "common/qlora_params.h"
#include "cuda/qlora_cuda.h"

namespace lora_ops::cuda {

enum class CudaMatmulPath { kDecode, kTensorCore, kFfma };

// Largest M of the decode kernel, per form (larger M -> tensor-core kernel, or FFMA where it can't).
struct CudaCrossover {
  int64_t decode_max_m;   // forward
  int64_t decode_max_m_t; // transposed (dx)
};

// NOT YET MEASURED ON A GPU: these follow the kernels' design limits (the decode kernel keeps M <= 16
// accumulator rows per lane, its transposed form M <= 4), not timings. bench/bench_qlora.py on a GPU
// must set them; the measured table goes to bench/dispatch_qlora.md.
constexpr CudaCrossover kCudaCrossover{16, 4};
static_assert(kCudaCrossover.decode_max_m <= kDecodeMaxRows, "the decode kernel supports at most 16 rows");
static_assert(kCudaCrossover.decode_max_m_t <= kDecodeMaxRowsT, "the transposed decode kernel supports 4 rows");

// `forced` (tests, benchmarks) wins when the kernel supports the call; otherwise the table decides.
inline CudaMatmulPath choose_matmul_path(const QloraMatmulParams& p, const CudaCrossover& table, int cc_major,
                                         const CudaMatmulPath* forced) {
  const bool tc_ok = p.a_dtype != DType::kFloat32 && cc_major >= 8 && qlora_mma_supported(p);
  const bool decode_ok = qlora_decode_supported(p);
  if (forced != nullptr) {
    if (*forced == CudaMatmulPath::kDecode && decode_ok)
      return CudaMatmulPath::kDecode;
    if (*forced == CudaMatmulPath::kTensorCore && tc_ok)
      return CudaMatmulPath::kTensorCore;
    if (*forced == CudaMatmulPath::kFfma)
      return CudaMatmulPath::kFfma;
  }
  if (decode_ok && p.m <= (p.transpose_w ? table.decode_max_m_t : table.decode_max_m))
    return CudaMatmulPath::kDecode;
  return tc_ok ? CudaMatmulPath::kTensorCore : CudaMatmulPath::kFfma;
}

} // namespace lora_ops::cuda
