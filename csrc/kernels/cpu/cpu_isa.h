// Which SIMD level the CPU kernels run at: chosen once at library load by select_cpu_kernels
// (qlora_cpu.h; cpu_isa.cpp) from the CPU's features, capped by the binding layer's overrides
// (LORA_OPS_NO_AVX512_BF16=1, LORA_OPS_NO_AVX512=1, LORA_OPS_NO_AVX2=1). Each level keeps every kernel of
// the levels below it for what it does not replace, so a kernel checks only the level it needs, and where a
// kernel needs a feature the CPU lacks, the next kernel down runs.
#pragma once

namespace lora_ops::cpu {

enum class CpuIsa {
  kPortable,   // plain C++
  kAvx2,       // AVX2 + FMA + F16C
  kAvx512,     // kAvx2 and AVX-512 F/BW/VL/DQ (Skylake-SP and later Xeons, AMD Zen 4+): dequantize, window
               // decode, the fp32 row-dot, the GEMM tile
  kAvx512Bf16, // kAvx512 and AVX512_BF16 (Cooper Lake, Sapphire Rapids and later Xeons, AMD Zen 4+): the
               // vdpbf16ps row-dot of bf16 weights
};

namespace detail {
extern CpuIsa g_cpu_isa; // set by select_cpu_kernels only
} // namespace detail

// The level in use (kPortable until select_cpu_kernels runs).
inline CpuIsa cpu_isa() { return detail::g_cpu_isa; }

// The highest level this CPU supports (and its OS enables).
CpuIsa cpu_isa_supported();

// "portable", "avx2", "avx512" or "avx512_bf16".
const char* cpu_isa_name(CpuIsa isa);

// Which kernel each kernel family runs at the level in use, as "family=level ..." (`python -m lora_ops env`).
const char* cpu_kernel_families();

} // namespace lora_ops::cpu
