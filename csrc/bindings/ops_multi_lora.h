// multi_lora_linear's op body, shared by the devices (ops_multi_lora.cpp registers the CPU kernel,
// ops_multi_lora_cuda.cpp the CUDA one): validation, the base term through qlora_matmul once, then `add`,
// the device's per-row LoRA term (common/multi_lora_params.h) on the device tensors.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "common/multi_lora_params.h"

namespace lora_ops {

at::Tensor multi_lora_linear_op(const at::Tensor& x, at::TensorList w, at::IntArrayRef w_meta, const at::Tensor& A,
                                const at::Tensor& Bt, const at::Tensor& scales, const at::Tensor& ranks,
                                const at::Tensor& adapter_ids, const std::optional<at::Tensor>& bias,
                                void (*add)(const MultiLoraParams&));

} // namespace lora_ops
