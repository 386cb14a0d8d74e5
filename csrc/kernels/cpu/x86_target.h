// x86 SIMD build switches shared by the CPU kernels: LORA_OPS_X86 on x86 builds, and the function
// attributes of code that runs only after select_cpu_kernels() (qlora_cpu.h) has found those extensions
// at load (cpu_isa.h): LORA_AVX2 (AVX2/FMA/F16C), LORA_AVX512 (that plus AVX-512 F/BW/VL/DQ),
// LORA_AVX512_BF16 (that plus AVX512_BF16: only the vdpbf16ps / vcvtne2ps2bf16 kernels).
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LORA_OPS_X86 1
#define LORA_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LORA_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#define LORA_AVX512_BF16 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif
