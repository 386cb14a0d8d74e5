// Portability macros shared by CPU (.cpp, host compiler) and CUDA (.cu, nvcc) kernels.
#pragma once

#if defined(__CUDACC__)
#define LORA_HD __host__ __device__ __forceinline__
#else
#define LORA_HD inline
#endif

// Single-rounding float32 arithmetic. The format (spec sections 4 and 5) fixes where values are
// rounded; on the device nvcc would otherwise contract a*b+c into one FMA (one rounding instead
// of two), and the bits would differ from bitsandbytes and from the CPU path.
#if defined(__CUDA_ARCH__)
#define LORA_FMUL_RN(a, b) __fmul_rn((a), (b))
#define LORA_FADD_RN(a, b) __fadd_rn((a), (b))
#define LORA_FSUB_RN(a, b) __fsub_rn((a), (b))
#define LORA_FRCP_RN(a) __frcp_rn(a)
#else
// Host code is built with -ffp-contract=off (CMakeLists.txt), so plain operators round once each.
#define LORA_FMUL_RN(a, b) ((a) * (b))
#define LORA_FADD_RN(a, b) ((a) + (b))
#define LORA_FSUB_RN(a, b) ((a) - (b))
#define LORA_FRCP_RN(a) (1.0f / (a))
#endif
