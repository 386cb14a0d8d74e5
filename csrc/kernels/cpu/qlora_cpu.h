// CPU (C++/OpenMP) kernels of the fused QLoRA linear. Torch-free: called by csrc/bindings/register_cpu.cpp.
// Design and measurements: bench/notes_qlora_cpu.md.
#pragma once
#include <cstdint>

#include "common/qlora_params.h"
#include "cpu/qlora_cpu_path.h"

namespace lora_ops::cpu {

// out = a · op(W) + scale · LoRA term (· dropout mask) + bias; see QloraMatmulParams. `path` comes from
// choose_matmul_path (cpu/qlora_cpu_path.h). fp16/bf16/fp32 a: fp32 accumulation, AVX2+FMA
// micro-kernels when selected; fp64 a (kFloat64 only): reference-grade, for gradcheck on small shapes.
void qlora_matmul(const QloraMatmulParams& p, CpuMatmulPath path);

// s = drop(a) · fᵀ  ([M, r], fp32 or fp64 out); see LoraDownParams.
void lora_down(const LoraDownParams& p);

// g = scale · leftᵀ · drop(right)  ([p, q]); see LoraOuterParams.
void lora_outer(const LoraOuterParams& p);

// The dropout keep-mask as 0/1 bytes; see DropoutMaskParams.
void dropout_mask(const DropoutMaskParams& p);

// Called once at library load by the binding layer: use the AVX2+FMA+F16C kernels when allowed and
// the CPU has them (before the call, the portable kernels run).
void select_cpu_kernels(bool allow_avx2);
// True when the AVX2+FMA+F16C kernels are in use.
bool qlora_cpu_uses_avx2();

} // namespace lora_ops::cpu
