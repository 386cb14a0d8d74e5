// The seam between bindings and NF4 kernels: plain structs of raw pointers and sizes, one comment
// per field. Bindings (csrc/bindings/) fill them from validated tensors; CPU and CUDA kernels read
// them. Nothing here knows about torch.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace lora_ops {

// One quantized weight as the kernels see it: packed codes plus the absmax state, plain or nested.
struct Nf4Weight {
  const uint8_t* packed = nullptr;     // [ceil(numel / 2)] two codes per byte, high nibble first
  int64_t numel = 0;                   // elements of the original tensor (row-major flattened)
  int32_t blocksize = 64;              // 4-bit block size (32 .. 4096, power of two)
  // Plain absmax: float32 [n_blocks]. Exactly one of absmax / qabsmax is set.
  const float* absmax = nullptr;
  // Nested (double-quantized) absmax: all four set.
  const uint8_t* qabsmax = nullptr;    // [n_blocks] 8-bit codes into nested_code
  const float* absmax2 = nullptr;      // [ceil(n_blocks / 256)] nested block scales
  const float* nested_code = nullptr;  // [256] the signed dynamic map
  const float* offset = nullptr;       // [1] mean of the original absmax (device memory on GPU)

  bool nested() const { return qabsmax != nullptr; }
  int64_t n_blocks() const { return (numel + blocksize - 1) / blocksize; }
};

struct Nf4QuantizeParams {
  const void* input = nullptr;  // [numel] contiguous, input_dtype
  DType input_dtype = DType::kFloat32;
  int64_t numel = 0;
  int32_t blocksize = 64;
  uint8_t* packed = nullptr;    // [ceil(numel / 2)] out
  float* absmax = nullptr;      // [n_blocks] out; a block holding NaN/Inf gets absmax = NaN
};

struct Nf4DoubleQuantParams {
  const float* absmax = nullptr;       // [n_blocks] plain absmax to compress
  int64_t n_blocks = 0;
  const float* offset = nullptr;       // [1] mean(absmax), computed by the caller
  const float* nested_code = nullptr;  // [256] the signed dynamic map, ascending
  uint8_t* qabsmax = nullptr;          // [n_blocks] out
  float* absmax2 = nullptr;            // [ceil(n_blocks / 256)] out
};

struct Nf4DequantizeParams {
  Nf4Weight weight;
  void* out = nullptr;  // [numel] contiguous, out_dtype
  DType out_dtype = DType::kBFloat16;
};

}  // namespace lora_ops
