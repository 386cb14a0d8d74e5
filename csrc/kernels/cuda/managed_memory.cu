// CUDA unified memory helpers (see managed_memory.h). Host code only; no kernels.
#include "cuda/managed_memory.h"

namespace lora_ops::cuda {

cudaError_t managed_alloc(void** ptr, size_t bytes) { return cudaMallocManaged(ptr, bytes, cudaMemAttachGlobal); }

cudaError_t managed_free(void* ptr) { return cudaFree(ptr); }

cudaError_t managed_concurrent_access(int device, int* supported) {
  return cudaDeviceGetAttribute(supported, cudaDevAttrConcurrentManagedAccess, device);
}

cudaError_t managed_prefetch(const void* ptr, size_t bytes, int device, cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
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

}  // namespace lora_ops::cuda
