// CUDA registrations of the fused AdamW step and of the unified-memory helpers of the `managed`
// paging backend. Kernels run on the current torch stream of the parameters' device.
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bindings/adamw_ops.h"
#include "cuda/adamw.h"
#include "cuda/managed_memory.h"

namespace lora_ops {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA error ", cudaGetErrorName(err), ": ", cudaGetErrorString(err));
}

void launch(const AdamwStepParams& p, const at::Tensor& ref) {
  const c10::cuda::CUDAGuard guard(ref.device());
  check_cuda(cuda::adamw_step(p, c10::cuda::getCurrentCUDAStream(ref.device().index()).stream()), "adamw_step_");
}

void step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
          const at::Tensor& hparams) {
  adamw_step_op(params, grads, exp_avgs, exp_avg_sqs, hparams, c10::DeviceType::CUDA, &launch);
}

void step_pages(at::TensorList params, at::TensorList grads, at::Tensor& pages, const at::Tensor& pieces,
                const at::Tensor& hparams) {
  adamw_step_pages_op(params, grads, pages, pieces, hparams, c10::DeviceType::CUDA, &launch);
}

at::Tensor managed_empty(int64_t numel, int64_t device) {
  TORCH_CHECK_VALUE(numel > 0, "managed_empty: numel must be positive, got ", numel);
  TORCH_CHECK_VALUE(device >= 0 && device < c10::cuda::device_count(), "managed_empty: no CUDA device ", device);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  void* ptr = nullptr;
  check_cuda(cuda::managed_alloc(&ptr, static_cast<size_t>(numel) * sizeof(float)), "managed_empty");
  return at::from_blob(
      ptr, {numel}, [](void* p) { cuda::managed_free(p); },
      at::TensorOptions().dtype(at::kFloat).device(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device))));
}

int64_t managed_concurrent_access(int64_t device) {
  TORCH_CHECK_VALUE(device >= 0 && device < c10::cuda::device_count(), "managed_concurrent_access: no CUDA device ",
                    device);
  int supported = 0;
  check_cuda(cuda::managed_concurrent_access(static_cast<int>(device), &supported), "managed_concurrent_access");
  return supported;
}

void managed_prefetch(at::Tensor& t, bool to_host) {
  TORCH_CHECK(t.is_cuda(), "managed_prefetch_: expected a CUDA (managed) tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "managed_prefetch_: the tensor must be contiguous");
  const c10::cuda::CUDAGuard guard(t.device());
  check_cuda(cuda::managed_prefetch(t.data_ptr(), t.nbytes(), to_host ? -1 : t.device().index(),
                                    c10::cuda::getCurrentCUDAStream(t.device().index()).stream()),
             "managed_prefetch_");
}

} // namespace

TORCH_LIBRARY_IMPL(lora_ops, CUDA, m) {
  m.impl("adamw_step_", &step);
  m.impl("adamw_step_pages_", &step_pages);
  m.impl("managed_prefetch_", &managed_prefetch);
}

// No tensor inputs, so no backend key to dispatch on: one kernel for every backend.
TORCH_LIBRARY_IMPL(lora_ops, CompositeExplicitAutograd, m) {
  m.impl("managed_empty", &managed_empty);
  m.impl("managed_concurrent_access", &managed_concurrent_access);
}

} // namespace lora_ops
