// NF4 storage ops, shared by the CPU and CUDA registrations: validation and output allocation
// happen once here; each backend supplies only the kernel calls.
#pragma once
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/nf4_params.h"

namespace lora_ops {

struct Nf4Backend {
  // Runs the quantize kernel; returns true if any block held NaN/Inf (may synchronize on a GPU).
  bool (*quantize)(const Nf4QuantizeParams& p, const at::Tensor& absmax);
  void (*double_quantize)(const Nf4DoubleQuantParams& p);
  void (*dequantize)(const Nf4DequantizeParams& p);
};

std::tuple<at::Tensor, at::Tensor> nf4_quantize_op(const at::Tensor& w, int64_t blocksize, const Nf4Backend& be);

std::tuple<at::Tensor, at::Tensor, at::Tensor> nf4_double_quantize_op(const at::Tensor& absmax,
                                                                      const at::Tensor& nested_code,
                                                                      const Nf4Backend& be);

at::Tensor nf4_dequantize_op(const at::Tensor& packed, const at::Tensor& absmax,
                             const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& nested_code,
                             const std::optional<at::Tensor>& offset, int64_t blocksize, at::IntArrayRef shape,
                             at::ScalarType dtype, const Nf4Backend& be);

}  // namespace lora_ops
