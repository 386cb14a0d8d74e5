// CPU (C++/OpenMP) kernels of the fused QLoRA linear. Torch-free: called by csrc/bindings/qlora_cpu.cpp.
// Design and measurements: bench/notes_qlora_cpu.md.
#pragma once
#include <cstdint>

#include "common/qlora_params.h"

namespace lora_ops::cpu {

// out = a · op(W) + scale · LoRA term (· dropout mask) + bias; see QloraMatmulParams.
// fp16/bf16/fp32 a: fp32 accumulation, AVX2+FMA micro-kernels when the CPU has them.
// fp64 a: a plain reference-grade path (fp64 accumulation) for gradcheck on small shapes.
void qlora_matmul(const QloraMatmulParams& p);

// s = drop(a) · fᵀ  ([M, r], fp32 or fp64 out); see LoraDownParams.
void lora_down(const LoraDownParams& p);

// g = scale · leftᵀ · drop(right)  ([p, q]); see LoraOuterParams.
void lora_outer(const LoraOuterParams& p);

// The dropout keep-mask as 0/1 bytes; see DropoutMaskParams.
void dropout_mask(const DropoutMaskParams& p);

// True when the AVX2+FMA+F16C kernels are in use (the CPU supports them and LORA_OPS_NO_AVX2 is unset).
bool qlora_cpu_uses_avx2();

}  // namespace lora_ops::cpu
