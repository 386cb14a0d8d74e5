// CUDA launchers of the fused QLoRA linear (seam: common/qlora_params.h). Torch-free: called by
// csrc/bindings/register_cuda.cpp; cuda/qlora_cuda_path.h chooses the qlora_matmul path. Every
// launcher enqueues on `stream`, never synchronizes, and returns the first CUDA error (invalid or
// unsupported arguments -> cudaErrorInvalidValue).
// All pointers are device pointers; fp64 is not supported on the GPU.
//
//   path        file             M          dtypes              layout needs
//   tc decode   qlora_tc_decode  1 .. 64    fp16 / bf16         forward: K % 64 == 0, blocksize 64 .. 2048,
//               .cu                                             packed and a rows 16-byte aligned, a col
//                                                               stride 1
//               (transposed)     1 .. 64    fp16 / bf16         K % 32 == 0, packed 16-byte aligned, dy col
//                                                               stride 1, rows 4-byte aligned
//   decode      qlora_decode.cu  1 .. 16    fp16 / bf16 / fp32  forward: K % 32 == 0, packed and a rows
//                                                               16-byte aligned, a col stride 1
//               (transposed)     1 .. 4     fp16 / bf16 / fp32  K % 32 == 0, packed 16-byte aligned
//   tensor core qlora_mma.cu     any        fp16 / bf16         none (16-byte cp.async / ldg fast
//                                                               path when aligned, scalar otherwise)
//   slab        bindings/        > 16       fp32                no masked LoRA term (dx dropout): W slabs
//               qlora_slab.cpp                                  (nf4_window.cu) + cuBLAS
//   ffma        qlora_ffma.cu    any        any                 none (the always-correct fallback)
//
// Split-K (decode, ffma) writes fp32 partials [splits, M, n_out] into a caller-provided workspace and
// a second launch sums them in a fixed order (deterministic) and applies the epilogue.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/qlora_params.h"

namespace lora_ops::cuda {

// ---- decode path (M <= kDecodeMaxRows) --------------------------------------------------------------
constexpr int64_t kDecodeMaxRows = 16;   // forward (y = x·Wᵀ)
constexpr int64_t kDecodeMaxRowsT = 4;   // transposed (dx = dy·W): acc[M][32] per lane

// True when the decode kernel can take p (shape, dtype and alignment conditions above).
bool qlora_decode_supported(const QloraMatmulParams& p);
// Number of K splits the decode kernel will use on a device with `sms` multiprocessors (>= 1), and
// the fp32 workspace it needs for them (0 when splits == 1).
int qlora_decode_splits(const QloraMatmulParams& p, int sms);
size_t qlora_splitk_workspace_bytes(const QloraMatmulParams& p, int splits);
cudaError_t qlora_decode(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream);

// ---- tensor-core weight-streaming path (M <= kTcDecodeMaxRows, forward and dx, fp16 / bf16, sm80+) -----
constexpr int64_t kTcDecodeMaxRows = 64;
// True when qlora_tc_decode.cu can take p (see the table above).
bool qlora_tc_decode_supported(const QloraMatmulParams& p);
// K splits (forward; 1 unless N is too small to fill the SMs or rows are very long) or N splits (dx) on a
// device with `sms` multiprocessors; the workspace is qlora_splitk_workspace_bytes(p, splits).
int qlora_tc_decode_splits(const QloraMatmulParams& p, int sms, int max_smem_per_block);
cudaError_t qlora_tc_decode(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream);

// ---- slab path (fp32 and bf16 activations, large M): the window decode feeding
// csrc/bindings/qlora_slab.cpp's cuBLAS GEMMs (nf4_window.cu) ---------------------------------------------
// W[r0:r1, c0:c1] (rows of row_len columns) as fp32 values of value_dtype into dst (row pitch ld).
cudaError_t nf4_decode_window(const Nf4Weight& w, DType value_dtype, int64_t row_len, int64_t r0, int64_t r1,
                              int64_t c0, int64_t c1, float* dst, int64_t ld, cudaStream_t stream);
// The same window as the 16-bit values of value_dtype (bf16 or fp16 bits), for the bf16 GEMM.
cudaError_t nf4_decode_window_16bit(const Nf4Weight& w, DType value_dtype, int64_t row_len, int64_t r0, int64_t r1,
                                    int64_t c0, int64_t c1, uint16_t* dst, int64_t ld, cudaStream_t stream);

// ---- tensor-core path (fp16 / bf16, sm80+) ----------------------------------------------------------
bool qlora_mma_supported(const QloraMatmulParams& p);
cudaError_t qlora_mma(const QloraMatmulParams& p, cudaStream_t stream);

// ---- FFMA path (any dtype, any layout) --------------------------------------------------------------
int qlora_ffma_splits(const QloraMatmulParams& p, int sms);
cudaError_t qlora_ffma(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream);

// Sums fp32 partials ws[splits, M, n_out] in split order, applies the epilogue, writes p.out.
cudaError_t qlora_splitk_finish(const QloraMatmulParams& p, int splits, const float* workspace, cudaStream_t stream);

// ---- LoRA side path ---------------------------------------------------------------------------------
// s = drop(a) · fᵀ, [M, r] fp32. Split over l when M·r is small; workspace as lora_down_workspace_bytes.
int lora_down_splits(const LoraDownParams& p, int sms);
size_t lora_down_workspace_bytes(const LoraDownParams& p, int splits);
cudaError_t lora_down(const LoraDownParams& p, int splits, float* workspace, cudaStream_t stream);

// g = scale · leftᵀ · drop(right), [p, q]; the M reduction is split across CTAs when p·q is small,
// the fp32 partials summed in split order by a second launch (deterministic).
int lora_outer_splits(const LoraOuterParams& p, int sms);
size_t lora_outer_workspace_bytes(const LoraOuterParams& p, int splits);
cudaError_t lora_outer(const LoraOuterParams& p, int splits, float* workspace, cudaStream_t stream);

// The dropout keep-mask as 0/1 bytes (p.out is a device pointer).
cudaError_t lora_dropout_mask(const DropoutMaskParams& p, cudaStream_t stream);

}  // namespace lora_ops::cuda
