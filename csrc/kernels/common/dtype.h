// The floating-point element types the kernels read and write, without any framework header.
#pragma once
#include <cstdint>

namespace lora_ops {

enum class DType : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat64 = 3,  // CPU-only reference-grade path of the QLoRA linear (float64 gradcheck); NF4 ops reject it
};

inline int dtype_size(DType t) { return t == DType::kFloat64 ? 8 : t == DType::kFloat32 ? 4 : 2; }

}  // namespace lora_ops
