// Which SIMD level the CPU kernels run at: chosen once at library load by select_cpu_kernels
// (qlora_cpu.h; cpu_isa.cpp) from what the CPU has, capped by the binding layer's overrides
// (LORA_OPS_NO_AVX512=1, LORA_OPS_NO_AVX2=1). Each level keeps every kernel of the levels below it for
// what it does not replace, so a kernel checks only the level it needs.
#pragma once

namespace lora_ops::cpu {

enum class CpuIsa {
  kPortable, // plain C++
  kAvx2,     // AVX2 + FMA + F16C
  kAvx512,   // kAvx2 and AVX-512 F/BW/VL/DQ with AVX512_BF16 (Cooper Lake / Sapphire Rapids Xeons, AMD Zen 4+)
};

namespace detail {
extern CpuIsa g_cpu_isa; // set by select_cpu_kernels only
} // namespace detail

// The level in use (kPortable until select_cpu_kernels runs).
inline CpuIsa cpu_isa() { return detail::g_cpu_isa; }

// The highest level this CPU supports (and its OS enables).
CpuIsa cpu_isa_supported();

// "portable", "avx2" or "avx512".
const char* cpu_isa_name(CpuIsa isa);

} // namespace lora_ops::cpu
