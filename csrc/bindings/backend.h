// One backend shape for every op family: a device supplies one Backend (register_cpu.cpp,
// register_cuda.cpp) holding its kernel calls, and register_ops.h registers every op for it the same
// way. The op bodies (ops_*.cpp) validate tensors, allocate outputs, fill the kernel params
// (csrc/kernels/common/*_params.h) and call through the Backend; a Backend function only launches.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include "common/adamw_params.h"
#include "common/nf4_params.h"
#include "common/qlora_params.h"

namespace lora_ops {

struct Backend {
  c10::DeviceType device_type;
  bool supports_float64; // CPU: the QLoRA ops have a float64 path (gradcheck)

  // NF4 storage. nf4_quantize returns true if a block held NaN/Inf (absmax = NaN marks it; on a GPU
  // reading the flag back synchronizes once).
  bool (*nf4_quantize)(const Nf4QuantizeParams& p, const at::Tensor& absmax);
  void (*nf4_double_quantize)(const Nf4DoubleQuantParams& p);
  void (*nf4_dequantize)(const Nf4DequantizeParams& p);

  // Fused QLoRA linear (the backend also chooses the qlora_matmul kernel: cpu/qlora_cpu_path.h,
  // cuda/qlora_cuda_path.h).
  void (*qlora_matmul)(const QloraMatmulParams& p);
  void (*lora_down)(const LoraDownParams& p);
  void (*lora_outer)(const LoraOuterParams& p);
  void (*lora_dropout_mask)(const DropoutMaskParams& p); // nullptr: the op has no impl for this device

  // Paged AdamW.
  void (*adamw_step)(const AdamwStepParams& p);
};

} // namespace lora_ops
