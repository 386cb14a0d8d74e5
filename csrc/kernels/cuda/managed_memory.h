// CUDA unified (managed) memory helpers for the `managed` paging backend (torch-free, host code only).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

namespace lora_ops::cuda {

// cudaMallocManaged(bytes, cudaMemAttachGlobal): memory reachable from host and every device, migrated
// on demand (and evicted to the host by the driver under device-memory pressure).
cudaError_t managed_alloc(void** ptr, size_t bytes);
cudaError_t managed_free(void* ptr);

// *supported = 1 when `device` can access managed memory concurrently with the CPU (needed for
// prefetch and for GPU page faults; 0 e.g. on Windows/WSL and pre-Pascal GPUs).
cudaError_t managed_concurrent_access(int device, int* supported);

// Asynchronously migrates [ptr, ptr + bytes) to `device` (or to the host when device < 0) on `stream`.
cudaError_t managed_prefetch(const void* ptr, size_t bytes, int device, cudaStream_t stream);

}  // namespace lora_ops::cuda
