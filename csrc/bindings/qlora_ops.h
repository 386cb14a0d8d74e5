// Fused QLoRA linear ops, shared by the CPU and CUDA registrations: validation, output allocation and
// the tensor -> params translation happen once here (qlora_ops_common.cpp); each backend supplies only
// the kernel calls of csrc/kernels/common/qlora_params.h.
#pragma once
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/qlora_params.h"

namespace lora_ops {

struct QloraBackend {
  bool supports_float64;                          // CPU: a float64 path exists (gradcheck)
  void (*matmul)(const QloraMatmulParams& p);     // fused dequant-GEMM + LoRA epilogue
  void (*down)(const LoraDownParams& p);          // s = drop(a)·fᵀ
  void (*outer)(const LoraOuterParams& p);        // g = scale·leftᵀ·drop(right)
};

std::tuple<at::Tensor, at::Tensor> qlora_linear_op(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& absmax2,
    const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset, int64_t blocksize,
    int64_t out_features, const at::Tensor& A, const at::Tensor& B, const std::optional<at::Tensor>& bias,
    double scale, double dropout_p, const std::optional<at::Tensor>& rng, const QloraBackend& be);

at::Tensor qlora_matmul_op(const at::Tensor& a, const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features,
                           int64_t in_features, bool transpose_w, const std::optional<at::Tensor>& lora_s,
                           const std::optional<at::Tensor>& lora_w, double scale,
                           const std::optional<at::Tensor>& bias, double dropout_p,
                           const std::optional<at::Tensor>& rng, const QloraBackend& be);

at::Tensor lora_down_op(const at::Tensor& a, const at::Tensor& f, double dropout_p,
                        const std::optional<at::Tensor>& rng, const QloraBackend& be);

at::Tensor lora_outer_op(const at::Tensor& left, const at::Tensor& right, double scale, double dropout_p,
                         const std::optional<at::Tensor>& rng, at::ScalarType out_dtype, const QloraBackend& be);

// DropoutParams for a mask over rows of length `cols`, from (dropout_p, rng = int64 [2] CPU (seed, offset)).
DropoutParams make_dropout(double dropout_p, const std::optional<at::Tensor>& rng, int64_t cols, const char* op);

}  // namespace lora_ops
