// The LoRA factor ops of the CPU backend: s = drop(a)·fᵀ (lora_down) and g = scale·leftᵀ·drop(right)
// (lora_outer, dA and dB). Torch-free: called by csrc/bindings/register_cpu.cpp. Design and
// measurements: bench/notes_qlora_cpu.md.
#pragma once

#include "common/qlora_params.h"

namespace lora_ops::cpu {

// s = drop(a) · fᵀ  ([M, r], fp32 or fp64 out); see LoraDownParams.
void lora_down(const LoraDownParams& p);

// g = scale · leftᵀ · drop(right)  ([p, q]); see LoraOuterParams.
void lora_outer(const LoraOuterParams& p);

} // namespace lora_ops::cpu
