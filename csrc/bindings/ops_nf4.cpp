// nf4_quantize, nf4_double_quantize, nf4_dequantize (schemas: csrc/torch_bindings.cpp).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <limits>

#include "bindings/ops.h"
#include "bindings/tensor_checks.h"
#include "bindings/weight_arg.h"

namespace lora_ops {

std::tuple<at::Tensor, at::Tensor> nf4_quantize_op(const Backend& be, const at::Tensor& w_in, int64_t blocksize) {
  constexpr const char* op = "nf4_quantize";
  const c10::DeviceGuard guard(w_in.device());
  check_blocksize(blocksize, op);
  TORCH_CHECK_TYPE(!w_in.is_complex() && at::isFloatingType(w_in.scalar_type()), op,
                   ": weight must be a float32, float16 or bfloat16 tensor, got ", w_in.scalar_type());
  TORCH_CHECK(w_in.numel() > 0, op, ": cannot quantize an empty tensor (shape ", w_in.sizes(), ")");
  const DType dtype = kernel_dtype(w_in.scalar_type(), op, "weight");
  const at::Tensor w = w_in.contiguous();  // the format flattens row-major
  const int64_t numel = w.numel();
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  const auto bytes = w.options().dtype(at::kByte);
  at::Tensor packed = new_output({(numel + 1) / 2, 1}, bytes);
  at::Tensor absmax = new_output({n_blocks}, w.options().dtype(at::kFloat));
  Nf4QuantizeParams p;
  p.input = w.data_ptr();
  p.input_dtype = dtype;
  p.numel = numel;
  p.blocksize = static_cast<int32_t>(blocksize);
  p.packed = packed.data_ptr<uint8_t>();
  p.absmax = absmax.data_ptr<float>();
  const bool nonfinite = be.nf4_quantize(p, absmax);
  TORCH_CHECK_VALUE(!nonfinite, op, ": the weight contains NaN or Inf, which NF4 cannot represent");
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nf4_double_quantize_op(const Backend& be, const at::Tensor& absmax,
                                                                      const at::Tensor& nested_code) {
  constexpr const char* op = "nf4_double_quantize";
  const c10::DeviceGuard guard(absmax.device());
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, op, ": absmax must be float32, got ",
                   absmax.scalar_type());
  TORCH_CHECK(absmax.numel() > 0, op, ": absmax is empty");
  check_tensor(nested_code, at::kFloat, 256, absmax, op, "nested_code");
  const at::Tensor a = absmax.contiguous();
  const int64_t n = a.numel();
  // A NaN/Inf absmax would make offset NaN and every nested code garbage (one sync on CUDA).
  TORCH_CHECK_VALUE(at::isfinite(a).all().item<bool>(), op,
                    ": absmax contains NaN or Inf (it must come from a finite weight)");
  // offset = mean(absmax) in float32, computed by torch like bitsandbytes does (same bits), on the
  // device. Where that sum overflows (huge finite weights) it is the mean of absmax * 2^-64, times
  // 2^64: power-of-two scaling is exact, so this is the same mean without overflow (capped at
  // FLT_MAX). reference.absmax_mean states the same rule.
  const at::Tensor plain_mean = a.mean();
  const at::Tensor scaled_mean = ((a * 0x1p-64).mean() * 0x1p64).clamp_max(std::numeric_limits<float>::max());
  at::Tensor offset = at::where(at::isfinite(plain_mean), plain_mean, scaled_mean).reshape({1});
  at::Tensor qabsmax = new_output({n}, a.options().dtype(at::kByte));
  at::Tensor absmax2 = new_output({(n + kNestedBlocksize - 1) / kNestedBlocksize}, a.options());
  Nf4DoubleQuantParams p;
  p.absmax = a.data_ptr<float>();
  p.n_blocks = n;
  p.offset = offset.data_ptr<float>();
  p.nested_code = nested_code.data_ptr<float>();
  p.qabsmax = qabsmax.data_ptr<uint8_t>();
  p.absmax2 = absmax2.data_ptr<float>();
  be.nf4_double_quantize(p);
  return {qabsmax, absmax2, offset.reshape({})};
}

at::Tensor nf4_dequantize_op(const Backend& be, at::TensorList w, at::IntArrayRef w_meta, at::ScalarType dtype) {
  constexpr const char* op = "nf4_dequantize";
  const Nf4WeightArg weight = nf4_weight_arg(w, w_meta, op);
  const c10::DeviceGuard guard(weight.device);
  Nf4DequantizeParams p;
  p.weight = weight.kernel;
  p.out_dtype = kernel_dtype(dtype, op, "dtype");
  at::Tensor out = new_output(weight.shape, w[0].options().dtype(dtype));
  p.out = out.data_ptr();
  be.nf4_dequantize(p);
  return out;
}

void nf4_dequantize_into_op(const Backend& be, at::TensorList w, at::IntArrayRef w_meta, const at::Tensor& out) {
  constexpr const char* op = "nf4_dequantize_into";
  const Nf4WeightArg weight = nf4_weight_arg(w, w_meta, op);
  const c10::DeviceGuard guard(weight.device);
  check_same_device(out, w[0], op, "out");
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(weight.shape), op, ": out has shape ", out.sizes(),
                    ", the weight ", at::IntArrayRef(weight.shape));
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous");
  for (const at::Tensor& part : w) // the kernel reads the weight while it writes out
    TORCH_CHECK_VALUE(!part.defined() || part.numel() == 0 || out.numel() == 0 ||
                          !(out.storage().is_alias_of(part.storage())),
                      op, ": out shares memory with the weight");
  Nf4DequantizeParams p;
  p.weight = weight.kernel;
  p.out_dtype = kernel_dtype(out.scalar_type(), op, "out");
  p.out = out.data_ptr();
  be.nf4_dequantize(p);
}

}  // namespace lora_ops
