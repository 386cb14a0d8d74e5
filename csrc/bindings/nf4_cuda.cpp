// CUDA registrations of the NF4 storage ops: the shared validation of nf4_ops_common.cpp, then the
// torch-free launchers of csrc/kernels/cuda/ on the current torch stream of the tensors' device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <ATen/ATen.h>

#include "bindings/nf4_ops.h"
#include "cuda/nf4_cuda.h"

namespace lora_ops {
namespace {

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The device the kernels run on: the first CUDA tensor among the arguments. (The dispatcher sends
// the call here when any argument is on CUDA; a mix of devices is then rejected by the shared checks
// with a message naming the argument.)
c10::Device cuda_device_of(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors)
    if (t != nullptr && t->defined() && t->is_cuda()) return t->device();
  TORCH_CHECK(false, "lora_ops: no CUDA tensor among the arguments of a CUDA op");
}

// Quantize, then report whether a block held NaN/Inf: the kernel marks such blocks with absmax = NaN
// and the ONE device synchronization of this op reads that flag back (documented in the Python
// wrapper), because the op must raise instead of returning codes for a non-finite weight.
bool quantize_cuda(const Nf4QuantizeParams& p, const at::Tensor& absmax) {
  check_cuda(cuda::nf4_quantize(p, current_stream()), "nf4_quantize");
  return at::isnan(absmax).any().item<bool>();
}

const Nf4Backend kCuda{
    &quantize_cuda,
    [](const Nf4DoubleQuantParams& p) {
      check_cuda(cuda::nf4_double_quantize(p, current_stream()), "nf4_double_quantize");
    },
    [](const Nf4DequantizeParams& p) { check_cuda(cuda::nf4_dequantize(p, current_stream()), "nf4_dequantize"); },
};

std::tuple<at::Tensor, at::Tensor> quantize(const at::Tensor& w, int64_t blocksize) {
  const c10::cuda::CUDAGuard guard(cuda_device_of({&w}));
  return nf4_quantize_op(w, blocksize, kCuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> double_quantize(const at::Tensor& absmax, const at::Tensor& code) {
  const c10::cuda::CUDAGuard guard(cuda_device_of({&absmax, &code}));
  return nf4_double_quantize_op(absmax, code, kCuda);
}

at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& absmax2,
                      const std::optional<at::Tensor>& code, const std::optional<at::Tensor>& offset,
                      int64_t blocksize, at::IntArrayRef shape, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(cuda_device_of({&packed, &absmax, absmax2 ? &*absmax2 : nullptr,
                                                   code ? &*code : nullptr, offset ? &*offset : nullptr}));
  return nf4_dequantize_op(packed, absmax, absmax2, code, offset, blocksize, shape, dtype, kCuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ops, CUDA, m) {
  m.impl("nf4_quantize", &quantize);
  m.impl("nf4_double_quantize", &double_quantize);
  m.impl("nf4_dequantize", &dequantize);
}

}  // namespace lora_ops
