// multi_lora_linear on CUDA (CUDA builds only): the shared op body (ops_multi_lora.h) with the CUDA
// per-row LoRA launchers (cuda/multi_lora_cuda.h) on torch's current stream. Compiled (nvcc_check's
// bindings pass) and the kernels emulated (tests/cuda_emu); not run on a GPU.
#include <torch/library.h>

#include "bindings/cuda_call.h"
#include "bindings/ops_multi_lora.h"
#include "cuda/multi_lora_cuda.h"

namespace lora_ops {
namespace {

void multi_lora_add_cuda(const MultiLoraParams& p) {
  Workspace ws(cuda::multi_lora_workspace_bytes(p));
  check_cuda(cuda::multi_lora_add(p, ws.ptr(), current_stream()), "multi_lora_linear");
}

at::Tensor multi_lora_linear_cuda(const at::Tensor& x, at::TensorList w, at::IntArrayRef w_meta, const at::Tensor& A,
                                  const at::Tensor& Bt, const at::Tensor& scales, const at::Tensor& ranks,
                                  const at::Tensor& adapter_ids, const std::optional<at::Tensor>& bias) {
  return multi_lora_linear_op(x, w, w_meta, A, Bt, scales, ranks, adapter_ids, bias, &multi_lora_add_cuda);
}

} // namespace

TORCH_LIBRARY_IMPL(lora_ops, CUDA, m) { m.impl("multi_lora_linear", &multi_lora_linear_cuda); }

} // namespace lora_ops
