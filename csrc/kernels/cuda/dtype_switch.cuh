// The one switch from a runtime DType to the CUDA element type of a templated launcher:
//   return with_cuda_type(p.a_dtype, [&](auto tag) { return launch<typename decltype(tag)::type>(p); });
// float64 (CPU-only: the QLoRA gradcheck path) and unknown values give cudaErrorInvalidValue.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "common/dtype.h"

namespace lora_ops::cuda {

template <class T> struct TypeTag {
  using type = T;
};

template <class F> cudaError_t with_cuda_type(DType t, F&& f) {
  switch (t) {
  case DType::kFloat32:
    return f(TypeTag<float>{});
  case DType::kFloat16:
    return f(TypeTag<__half>{});
  case DType::kBFloat16:
    return f(TypeTag<__nv_bfloat16>{});
  default:
    return cudaErrorInvalidValue;
  }
}

} // namespace lora_ops::cuda
