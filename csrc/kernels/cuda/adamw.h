// Launcher of the CUDA multi-tensor AdamW step (torch-free). See common/adamw_params.h for the math.
#pragma once
#include <cuda_runtime.h>

#include "common/adamw_params.h"

namespace lora_ops::cuda {

// Updates every tensor of `p` in place on `stream`. `p.tensors` / `p.hypers` are host arrays; they are
// packed into kernel arguments, up to kAdamwMaxTensorsPerLaunch tensors of one dtype per launch (any
// number of elements). Device pointers must be valid for the stream. Returns the first CUDA error.
cudaError_t adamw_step(const AdamwStepParams& p, cudaStream_t stream);

} // namespace lora_ops::cuda
