// CPU registrations of the NF4 storage ops.
#include <torch/library.h>

#include "bindings/nf4_ops.h"
#include "cpu/nf4_cpu.h"

namespace lora_ops {
namespace {

const Nf4Backend kCpu{
    [](const Nf4QuantizeParams& p, const at::Tensor&) { return cpu::nf4_quantize(p) > 0; },
    [](const Nf4DoubleQuantParams& p) { cpu::nf4_double_quantize(p); },
    [](const Nf4DequantizeParams& p) { cpu::nf4_dequantize(p); },
};

std::tuple<at::Tensor, at::Tensor> quantize(const at::Tensor& w, int64_t blocksize) {
  return nf4_quantize_op(w, blocksize, kCpu);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> double_quantize(const at::Tensor& absmax, const at::Tensor& code) {
  return nf4_double_quantize_op(absmax, code, kCpu);
}
at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& absmax2,
                      const std::optional<at::Tensor>& code, const std::optional<at::Tensor>& offset,
                      int64_t blocksize, at::IntArrayRef shape, at::ScalarType dtype) {
  return nf4_dequantize_op(packed, absmax, absmax2, code, offset, blocksize, shape, dtype, kCpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ops, CPU, m) {
  m.impl("nf4_quantize", &quantize);
  m.impl("nf4_double_quantize", &double_quantize);
  m.impl("nf4_dequantize", &dequantize);
}

}  // namespace lora_ops
