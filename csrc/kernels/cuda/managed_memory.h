// CUDA unified (managed) memory helpers for the `managed` paging backend: torch-free host code only,
// header-only so that no kernel-less .cu file exists (scripts/nvcc_check.py expects kernels in each).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

namespace lora_ops::cuda {

// cudaMallocManaged(bytes, cudaMemAttachGlobal): memory reachable from host and every device, migrated
// on demand (and evicted to the host by the driver under device-memory pressure).
inline cudaError_t managed_alloc(void** ptr, size_t bytes) {
  return cudaMallocManaged(ptr, bytes, cudaMemAttachGlobal);
}

inline cudaError_t managed_free(void* ptr) { return cudaFree(ptr); }

// *supported = 1 when `device` can access managed memory concurrently with the CPU (needed for
// prefetch and for GPU page faults; 0 e.g. on Windows/WSL and pre-Pascal GPUs).
inline cudaError_t managed_concurrent_access(int device, int* supported) {
  return cudaDeviceGetAttribute(supported, cudaDevAttrConcurrentManagedAccess, device);
}

// Asynchronously migrates [ptr, ptr + bytes) to `device` (or to the host when device < 0) on `stream`.
inline cudaError_t managed_prefetch(const void* ptr, size_t bytes, int device, cudaStream_t stream) {
  if (bytes == 0)
    return cudaSuccess;
#if CUDART_VERSION >= 13000
  // CUDA 13 takes a cudaMemLocation (the int-device overload was removed).
  cudaMemLocation loc{};
  if (device < 0) {
    loc.type = cudaMemLocationTypeHost;
    loc.id = 0;
  } else {
    loc.type = cudaMemLocationTypeDevice;
    loc.id = device;
  }
  return cudaMemPrefetchAsync(ptr, bytes, loc, 0, stream);
#else
  return cudaMemPrefetchAsync(ptr, bytes, device < 0 ? cudaCpuDeviceId : device, stream);
#endif
}

} // namespace lora_ops::cuda
