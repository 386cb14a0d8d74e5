// Helpers for the binding layer: turn validated tensors into the kernels' plain structs.
// Every message names the op and the argument, so a user sees what to fix.
#pragma once
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>

#include "common/dtype.h"
#include "common/nf4_format.h"
#include "common/nf4_params.h"

namespace lora_ops {

inline DType kernel_dtype(at::ScalarType t, const char* op, const char* arg) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", arg, " must be float32, float16 or bfloat16, got ", t);
  }
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, " is on ", t.device(), " but the weight is on ",
              ref.device(), "; move all inputs to one device");
}

inline void check_tensor(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const at::Tensor& ref,
                         const char* op, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", arg, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, op, ": ", arg, " has ", t.numel(), " elements, expected ", numel,
              " (quantization state does not match the weight)");
  TORCH_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous");
  check_same_device(t, ref, op, arg);
}

inline void check_blocksize(int64_t blocksize, const char* op) {
  TORCH_CHECK(nf4_valid_blocksize(blocksize), op, ": blocksize must be one of 32, 64, 128, 256, 512, 1024, ",
              "2048, 4096; got ", blocksize);
}

// Validates the quantization state of one weight of `numel` elements and returns the kernel view.
// `absmax` is float32 for plain storage, or the uint8 codes of a nested (double-quantized) absmax, in
// which case absmax2, nested_code and offset are required.
inline Nf4Weight make_nf4_weight(const at::Tensor& packed, const at::Tensor& absmax,
                                 const std::optional<at::Tensor>& absmax2,
                                 const std::optional<at::Tensor>& nested_code,
                                 const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t numel,
                                 const char* op) {
  check_blocksize(blocksize, op);
  TORCH_CHECK(numel > 0, op, ": the weight must have at least one element");
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed weight must be uint8, got ",
                   packed.scalar_type(), " (view other storage dtypes as uint8 first)");
  TORCH_CHECK(packed.numel() == (numel + 1) / 2, op, ": packed weight has ", packed.numel(),
              " bytes, a weight of ", numel, " elements needs ", (numel + 1) / 2);
  TORCH_CHECK(packed.is_contiguous(), op, ": packed weight must be contiguous");
  Nf4Weight w;
  w.packed = packed.data_ptr<uint8_t>();
  w.numel = numel;
  w.blocksize = static_cast<int32_t>(blocksize);
  const int64_t n_blocks = w.n_blocks();
  if (absmax.scalar_type() == at::kFloat) {
    TORCH_CHECK(!absmax2.has_value() && !offset.has_value(), op,
                ": absmax is float32 (plain) but nested absmax2/offset were given; pass uint8 absmax codes");
    check_tensor(absmax, at::kFloat, n_blocks, packed, op, "absmax");
    w.absmax = absmax.data_ptr<float>();
    return w;
  }
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kByte, op,
                   ": absmax must be float32 (plain) or uint8 (double-quantized), got ", absmax.scalar_type());
  TORCH_CHECK(absmax2.has_value() && nested_code.has_value() && offset.has_value(), op,
              ": absmax is uint8 (double-quantized): absmax2, nested_code and offset are required");
  check_tensor(absmax, at::kByte, n_blocks, packed, op, "absmax");
  check_tensor(*absmax2, at::kFloat, (n_blocks + kNestedBlocksize - 1) / kNestedBlocksize, packed, op, "absmax2");
  check_tensor(*nested_code, at::kFloat, 256, packed, op, "nested_code");
  check_tensor(*offset, at::kFloat, 1, packed, op, "offset");  // any shape of one element ([] or [1])
  w.qabsmax = absmax.data_ptr<uint8_t>();
  w.absmax2 = absmax2->data_ptr<float>();
  w.nested_code = nested_code->data_ptr<float>();
  w.offset = offset->data_ptr<float>();
  return w;
}

// Tests set LORA_OPS_POISON_OUTPUTS=1 so every freshly allocated output is filled with 0xFF bytes
// (NaN for floats) before a kernel writes it: an element a kernel forgets to write then fails the
// comparison instead of passing on memory that a previous identical call left behind.
inline bool poison_outputs_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("LORA_OPS_POISON_OUTPUTS");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return enabled;
}

inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor t = at::empty(shape, options);
  if (poison_outputs_enabled()) t.view(at::kByte).fill_(0xFF);
  return t;
}

inline int64_t shape_numel(at::IntArrayRef shape, const char* op) {
  int64_t n = 1;
  for (int64_t d : shape) {
    TORCH_CHECK(d >= 0, op, ": negative dimension in shape ", shape);
    n *= d;
  }
  return n;
}

}  // namespace lora_ops
