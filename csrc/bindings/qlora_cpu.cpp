// CPU registrations of the fused QLoRA linear ops.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "bindings/qlora_ops.h"
#include "bindings/tensor_checks.h"
#include "cpu/qlora_cpu.h"

namespace lora_ops {
namespace {

const QloraBackend kCpu{
    /*supports_float64=*/true,
    [](const QloraMatmulParams& p) { cpu::qlora_matmul(p); },
    [](const LoraDownParams& p) { cpu::lora_down(p); },
    [](const LoraOuterParams& p) { cpu::lora_outer(p); },
};

std::tuple<at::Tensor, at::Tensor> linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                          const std::optional<at::Tensor>& absmax2,
                                          const std::optional<at::Tensor>& code, const std::optional<at::Tensor>& offset,
                                          int64_t blocksize, int64_t out_features, const at::Tensor& A,
                                          const at::Tensor& B, const std::optional<at::Tensor>& bias, double scale,
                                          double p, const std::optional<at::Tensor>& rng) {
  return qlora_linear_op(x, packed, absmax, absmax2, code, offset, blocksize, out_features, A, B, bias, scale, p, rng,
                         kCpu);
}

at::Tensor matmul(const at::Tensor& a, const at::Tensor& packed, const at::Tensor& absmax,
                  const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code,
                  const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t n, int64_t k, bool transpose_w,
                  const std::optional<at::Tensor>& lora_s, const std::optional<at::Tensor>& lora_w, double scale,
                  const std::optional<at::Tensor>& bias, double p, const std::optional<at::Tensor>& rng) {
  return qlora_matmul_op(a, packed, absmax, absmax2, code, offset, blocksize, n, k, transpose_w, lora_s, lora_w, scale,
                         bias, p, rng, kCpu);
}

at::Tensor down(const at::Tensor& a, const at::Tensor& f, double p, const std::optional<at::Tensor>& rng) {
  return lora_down_op(a, f, p, rng, kCpu);
}

at::Tensor outer(const at::Tensor& left, const at::Tensor& right, double scale, double p,
                 const std::optional<at::Tensor>& rng, at::ScalarType out_dtype) {
  return lora_outer_op(left, right, scale, p, rng, out_dtype, kCpu);
}

at::Tensor dropout_mask(int64_t rows, int64_t cols, double p, const at::Tensor& rng) {
  constexpr const char* op = "lora_dropout_mask";
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, op, ": rows and cols must be >= 0, got ", rows, ", ", cols);
  DropoutMaskParams mp;
  mp.rows = rows;
  mp.dropout = make_dropout(p, rng, cols, op);
  at::Tensor out = new_output({rows, cols}, at::TensorOptions().dtype(at::kBool));
  mp.out = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  cpu::dropout_mask(mp);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ops, CPU, m) {
  m.impl("qlora_linear", &linear);
  m.impl("qlora_matmul", &matmul);
  m.impl("lora_down", &down);
  m.impl("lora_outer", &outer);
  m.impl("lora_dropout_mask", &dropout_mask);
}

}  // namespace lora_ops
