// CUDA NF4 kernels' launchers. Torch-free: called by csrc/bindings/register_cuda.cpp. Every launcher
// enqueues its work on `stream`, never synchronizes, and returns the first CUDA error it met
// (invalid arguments -> cudaErrorInvalidValue). All pointers are device pointers; any alignment is
// accepted (16-byte vector paths are used when the pointers allow them).
#pragma once
#include <cuda_runtime_api.h>

#include "common/nf4_params.h"

namespace lora_ops::cuda {

// Blockwise NF4 codes + absmax of p.input (numel up to 2^63, 64-bit indexing). A block holding NaN
// or Inf gets absmax = NaN and all-zero codes, like the CPU kernel; the caller detects it by
// reading absmax back.
cudaError_t nf4_quantize(const Nf4QuantizeParams& p, cudaStream_t stream);

// absmax -> 8-bit codes of the signed dynamic map (exact nearest, ties low) + one float32 scale per
// nested block of 256. p.offset and p.nested_code are read from device memory.
cudaError_t nf4_double_quantize(const Nf4DoubleQuantParams& p, cudaStream_t stream);

// Dense weight in p.out_dtype; the nested absmax decode is fused into the same (single) launch.
cudaError_t nf4_dequantize(const Nf4DequantizeParams& p, cudaStream_t stream);

}  // namespace lora_ops::cuda
