// x86 SIMD build switches shared by the CPU kernels: LORA_OPS_X86 on x86 builds, and LORA_AVX2, the
// function attribute of AVX2/FMA/F16C code that runs only after select_cpu_kernels() (qlora_cpu.h)
// has found those extensions at load.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LORA_OPS_X86 1
#define LORA_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif
