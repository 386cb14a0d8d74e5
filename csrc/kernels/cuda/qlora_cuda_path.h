// Which CUDA kernel runs a qlora_matmul call: the one place that chooses, and the crossover table it
// reads. Host-only and torch-free; the binding layer (csrc/bindings/register_cuda.cpp) passes the
// device's compute capability and any forced path it parsed from the environment.
#pragma once
#include <cstdint>

#include "common/qlora_params.h"
#include "cuda/qlora_cuda.h"

namespace lora_ops::cuda {

enum class CudaMatmulPath { kTcDecode, kDecode, kTensorCore, kSlabGemm, kFfma };

// The crossover table, keyed on M, the reduction length and dtype / layout (larger M -> the 64 x 64-tile
// tensor-core kernel, or FFMA where it can't).
struct CudaCrossover {
  int64_t tc_decode_max_m;   // forward, fp16 / bf16: the tensor-core weight-streaming kernel
  int64_t tc_decode_max_m_t; // transposed (dx), fp16 / bf16
  int64_t tc_decode_min_red; // reduction length (K forward, N dx) below which most of the tc kernels' 8
                             // warps would idle (each takes 256 columns / 16 rows per step)
  int64_t decode_max_m;      // forward, other dtypes (fp32) or layouts the tc kernel refuses
  int64_t decode_max_m_t;    // transposed (dx)
  int64_t slab_min_m_fp32;   // fp32 activations from this M on: W slabs + cuBLAS (instead of the FFMA kernel)
  int64_t slab_min_m_bf16;   // bf16 activations from this M on: bf16 W slabs + cuBLAS's bf16 GEMM (instead of
                             // the 64 x 64-tile mma kernel)
};

// NOT YET MEASURED ON A GPU: these follow the kernels' design limits (the tc decode kernels cover M <= 64
// with up to 8 n8 tiles, forward and dx; the CUDA-core decode kernel keeps M <= 16 accumulator rows per
// lane, its transposed form M <= 4) and their SASS instruction counts per weight (scripts/sass_report.py:
// the tc kernel issues about 3.5 per weight at M = 1 where the CUDA-core decode issued 12, and 3.6 at
// M = 16 where it issued 32), not timings. The tc kernel's crossover against the 64 x 64-tile mma kernel
// for 16 < M <= 64 depends on N and K (a 4096-wide layer gives the mma kernel only 64 CTAs);
// scripts/gpu_microbench.py on a GPU must set these from measurements. fp32 activations past the decode
// sizes go to the slab path (cuBLAS sgemm, or TF32 where torch.backends.cuda.matmul.allow_tf32 allows
// it) rather than the CUDA-core FFMA kernel. bf16 activations from M = 256 go to the slab path's bf16 GEMM
// kind (qlora_slab.cpp): an estimate, not a measurement -- per 4096 x 4096 layer on an H100 the slab costs
// a ~10 us window decode (32 MiB of bf16 written, L2-resident for the GEMM) on top of cuBLAS, against the
// mma kernel's ~190-250 TFLOP/s ceiling (issue 11's SASS reading), which puts the break-even near
// M = 128-256. fp16 stays on the mma kernel (the slab's 16-bit GEMM kind is bf16's: hi + lo bf16 splits of
// the fp32 LoRA operands).
// dx stops at 16 rows: there the tc kernel's lanes hold only U = 16 / NT bytes per row per step and its
// per-row overhead dominates (SASS per weight element on sm_90a: 5.8 at M <= 8, 9.6 at <= 16, 21 at <= 32,
// 57 at <= 64, against 13.9 for the mma kernel's k-tile loop at any M <= 64).
constexpr CudaCrossover kCudaCrossover{64, 16, 128, 16, 4, 17, 256};
static_assert(kCudaCrossover.tc_decode_max_m <= kTcDecodeMaxRows && kCudaCrossover.tc_decode_max_m_t <= kTcDecodeMaxRows,
              "the tc decode kernels support at most 64 rows");
static_assert(kCudaCrossover.decode_max_m <= kDecodeMaxRows, "the decode kernel supports at most 16 rows");
static_assert(kCudaCrossover.decode_max_m_t <= kDecodeMaxRowsT, "the transposed decode kernel supports 4 rows");

// `forced` (tests, benchmarks) wins when the kernel supports the call; otherwise the table decides.
inline CudaMatmulPath choose_matmul_path(const QloraMatmulParams& p, const CudaCrossover& table, int cc_major,
                                         const CudaMatmulPath* forced) {
  const bool tc_ok = p.a_dtype != DType::kFloat32 && cc_major >= 8 && qlora_mma_supported(p);
  const bool decode_ok = qlora_decode_supported(p);
  const bool tc_decode_ok = cc_major >= 8 && qlora_tc_decode_supported(p);
  // The slab loop keeps a dropout-masked LoRA term (dx) out of its GEMM and has no CUDA epilogue for it;
  // its bf16 GEMM wants bf16 tensor cores (sm80+).
  const bool slab_ok = (p.a_dtype == DType::kFloat32 || (p.a_dtype == DType::kBFloat16 && cc_major >= 8)) &&
                       !(p.transpose_w && p.rank > 0 && p.dropout.enabled());
  if (forced != nullptr) {
    if (*forced == CudaMatmulPath::kTcDecode && tc_decode_ok)
      return CudaMatmulPath::kTcDecode;
    if (*forced == CudaMatmulPath::kDecode && decode_ok)
      return CudaMatmulPath::kDecode;
    if (*forced == CudaMatmulPath::kTensorCore && tc_ok)
      return CudaMatmulPath::kTensorCore;
    if (*forced == CudaMatmulPath::kSlabGemm && slab_ok)
      return CudaMatmulPath::kSlabGemm;
    if (*forced == CudaMatmulPath::kFfma)
      return CudaMatmulPath::kFfma;
  }
  const int64_t reduction = p.transpose_w ? p.n : p.k;
  if (tc_decode_ok && p.m <= (p.transpose_w ? table.tc_decode_max_m_t : table.tc_decode_max_m) &&
      reduction >= table.tc_decode_min_red)
    return CudaMatmulPath::kTcDecode;
  if (decode_ok && p.m <= (p.transpose_w ? table.decode_max_m_t : table.decode_max_m))
    return CudaMatmulPath::kDecode;
  if (slab_ok && p.m >= (p.a_dtype == DType::kFloat32 ? table.slab_min_m_fp32 : table.slab_min_m_bf16))
    return CudaMatmulPath::kSlabGemm;
  return tc_ok ? CudaMatmulPath::kTensorCore : CudaMatmulPath::kFfma;
}

} // namespace lora_ops::cuda
