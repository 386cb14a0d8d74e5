// The CUDA side of every binding, in one header: the stream kernels run on (torch's current stream of
// the current device, which the op bodies set with a DeviceGuard), CUDA errors turned into
// RuntimeErrors naming the op, and stream-ordered fp32 scratch from the caching allocator.
#pragma once
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace lora_ops {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error ", cudaGetErrorName(err), ": ", cudaGetErrorString(err));
}

inline int current_device_attr(cudaDeviceAttr attr) {
  int dev = 0, v = 0;
  check_cuda(cudaGetDevice(&dev), "lora_ops");
  check_cuda(cudaDeviceGetAttribute(&v, attr, dev), "lora_ops");
  return v;
}

// fp32 scratch on the current device, stream-ordered by the caching allocator: freeing it after the
// launches is safe (the block is reused only by work queued later on the same stream). nullptr to the
// launcher when no split needs it.
struct Workspace {
  at::Tensor t;
  explicit Workspace(size_t bytes) {
    if (bytes == 0)
      return;
    const int64_t n = static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float));
    t = at::empty({n}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, c10::cuda::current_device()));
  }
  float* ptr() { return t.defined() ? t.data_ptr<float>() : nullptr; }
};

} // namespace lora_ops
