// The op bodies, one per schema of csrc/torch_bindings.cpp, shared by every device: each takes the
// device's Backend first (register_ops.h binds it) and then exactly the schema's arguments.
//   ops_nf4.cpp    nf4_quantize, nf4_double_quantize, nf4_dequantize, nf4_dequantize_into
//   ops_qlora.cpp  qlora_linear, qlora_matmul, lora_down, lora_outer, lora_dropout_mask
//   ops_adamw.cpp  adamw_step_, adamw_step_pages_
// An NF4 weight arrives as one value (Tensor[] w, int[] w_meta); weight_arg.h turns it into the
// kernels' Nf4Weight and is its only validator.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "bindings/backend.h"

namespace lora_ops {

std::tuple<at::Tensor, at::Tensor> nf4_quantize_op(const Backend& be, const at::Tensor& w, int64_t blocksize);
std::tuple<at::Tensor, at::Tensor, at::Tensor> nf4_double_quantize_op(const Backend& be, const at::Tensor& absmax,
                                                                      const at::Tensor& nested_code);
at::Tensor nf4_dequantize_op(const Backend& be, at::TensorList w, at::IntArrayRef w_meta, at::ScalarType dtype);
void nf4_dequantize_into_op(const Backend& be, at::TensorList w, at::IntArrayRef w_meta, const at::Tensor& out);

std::tuple<at::Tensor, at::Tensor> qlora_linear_op(const Backend& be, const at::Tensor& x, at::TensorList w,
                                                   at::IntArrayRef w_meta, const at::Tensor& A, const at::Tensor& B,
                                                   const std::optional<at::Tensor>& bias, double scale,
                                                   double dropout_p, const std::optional<at::Tensor>& rng);
at::Tensor qlora_matmul_op(const Backend& be, const at::Tensor& a, at::TensorList w, at::IntArrayRef w_meta,
                           bool transpose_w, const std::optional<at::Tensor>& lora_s,
                           const std::optional<at::Tensor>& lora_w, double scale, const std::optional<at::Tensor>& bias,
                           double dropout_p, const std::optional<at::Tensor>& rng);
at::Tensor lora_down_op(const Backend& be, const at::Tensor& a, const at::Tensor& f, double dropout_p,
                        const std::optional<at::Tensor>& rng);
at::Tensor lora_outer_op(const Backend& be, const at::Tensor& left, const at::Tensor& right, double scale,
                         double dropout_p, const std::optional<at::Tensor>& rng, at::ScalarType out_dtype);
at::Tensor lora_dropout_mask_op(const Backend& be, int64_t rows, int64_t cols, double dropout_p, const at::Tensor& rng);

void adamw_step_op(const Backend& be, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, const at::Tensor& hparams);
void adamw_step_pages_op(const Backend& be, at::TensorList params, at::TensorList grads, at::Tensor& pages,
                         const at::Tensor& pieces, const at::Tensor& hparams);

} // namespace lora_ops
