// CUDA launchers of the per-row multi-adapter LoRA term (serving; seam: common/multi_lora_params.h).
// Torch-free. The base term is qlora_matmul's (run once for all rows by the binding before this); these
// add scale[c]·(x[m]·A[c]ᵀ)·Bt[c] to each row m in place, c = ids[m], reading ids, ranks and scales on the
// device (no host synchronization), BGMV-style: one CTA row per x row, so rows sharing an adapter read its
// factors from L2 rather than once. Enqueued on `stream`; returns the first CUDA error.
// Compiled by scripts/nvcc_check.py and run under the CUDA emulation (tests/cuda_emu); not run on a GPU.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "common/multi_lora_params.h"

namespace lora_ops::cuda {

// The fp32 workspace multi_lora_add needs: s [M, r_max].
size_t multi_lora_workspace_bytes(const MultiLoraParams& p);

// out[m] = round(out[m] + scale[c]·(x[m]·A[c][:r_c]ᵀ)·Bt[c][:r_c]) for rows with c >= 0 and r_c > 0. All
// pointers are device pointers; ids must lie in -1 .. slots-1 (the binding checks them).
cudaError_t multi_lora_add(const MultiLoraParams& p, float* workspace, cudaStream_t stream);

} // namespace lora_ops::cuda
