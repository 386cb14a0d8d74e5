// Registers every op of every family for one Backend, the same way for each device:
//   TORCH_LIBRARY_IMPL(lora_ops, CPU, m) { register_ops<&kCpuBackend>(m); }
// Each op body (ops.h) takes the Backend as its first argument; BoundOp fixes it at compile time, so
// the registered function has exactly the schema's arguments and no wrapper re-lists them.
#pragma once
#include <torch/library.h>

#include <utility>

#include "bindings/backend.h"
#include "bindings/ops.h"

namespace lora_ops {

template <auto Op, const Backend* B> struct BoundOp;

template <class R, class... Args, R (*Op)(const Backend&, Args...), const Backend* B> struct BoundOp<Op, B> {
  static R call(Args... args) { return Op(*B, std::forward<Args>(args)...); }
};

template <const Backend* B> void register_ops(torch::Library& m) {
  m.impl("nf4_quantize", &BoundOp<&nf4_quantize_op, B>::call);
  m.impl("nf4_double_quantize", &BoundOp<&nf4_double_quantize_op, B>::call);
  m.impl("nf4_dequantize", &BoundOp<&nf4_dequantize_op, B>::call);
  m.impl("nf4_dequantize_into", &BoundOp<&nf4_dequantize_into_op, B>::call);
  m.impl("qlora_linear", &BoundOp<&qlora_linear_op, B>::call);
  m.impl("qlora_matmul", &BoundOp<&qlora_matmul_op, B>::call);
  m.impl("lora_down", &BoundOp<&lora_down_op, B>::call);
  m.impl("lora_outer", &BoundOp<&lora_outer_op, B>::call);
  if (B->lora_dropout_mask != nullptr)
    m.impl("lora_dropout_mask", &BoundOp<&lora_dropout_mask_op, B>::call);
  m.impl("adamw_step_", &BoundOp<&adamw_step_op, B>::call);
  m.impl("adamw_step_pages_", &BoundOp<&adamw_step_pages_op, B>::call);
}

} // namespace lora_ops
