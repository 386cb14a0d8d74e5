// Helpers for the binding layer: turn validated tensors into the kernels' plain structs.
// Every message names the op and the argument, so a user sees what to fix.
#pragma once
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "common/dtype.h"
#include "common/nf4_format.h"
#include "common/nf4_params.h"
#include "bindings/cpu_huge_pages.h"
#include "bindings/env_overrides.h"

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

// The other direction, for tensors made over kernel-params memory (fp64: the CPU-only gradcheck path).
inline at::ScalarType scalar_type_of(DType t) {
  switch (t) {
    case DType::kFloat16:
      return at::kHalf;
    case DType::kBFloat16:
      return at::kBFloat16;
    case DType::kFloat64:
      return at::kDouble;
    default:
      return at::kFloat;
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

// Tests set LORA_OPS_POISON_OUTPUTS=1 so every freshly allocated output is filled with 0xFF bytes
// (NaN for floats) before a kernel writes it: an element a kernel forgets to write then fails the
// comparison instead of passing on memory that a previous identical call left behind.
// t filled with 0xFF bytes (NaN) when LORA_OPS_POISON_OUTPUTS is set, so a kernel that skips an element
// shows; otherwise t.
inline at::Tensor poisoned(at::Tensor t) {
  if (env_overrides().poison_outputs) t.view(at::kByte).fill_(0xFF);
  return t;
}

// A new op output: on the CPU, large ones on huge pages (cpu_huge_pages.h).
inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  return poisoned(options.device().is_cpu() ? empty_cpu_output(shape, options) : at::empty(shape, options));
}

}  // namespace lora_ops
