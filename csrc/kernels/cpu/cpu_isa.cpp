// The SIMD level of the CPU kernels (cpu_isa.h): what this CPU has, and the level select_cpu_kernels sets.
#include "cpu/cpu_isa.h"

#include <algorithm>

#include "cpu/nf4_cpu.h"
#include "cpu/qlora_cpu.h"
#include "cpu/x86_target.h"

namespace lora_ops::cpu {
namespace {

CpuIsa isa_of_this_cpu() {
#ifdef LORA_OPS_X86
  __builtin_cpu_init(); // also checks that the OS saves the ymm / zmm state
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
    return CpuIsa::kPortable;
  for (const bool has : {__builtin_cpu_supports("avx512f") != 0, __builtin_cpu_supports("avx512bw") != 0,
                         __builtin_cpu_supports("avx512vl") != 0, __builtin_cpu_supports("avx512dq") != 0})
    if (!has)
      return CpuIsa::kAvx2;
  return __builtin_cpu_supports("avx512bf16") ? CpuIsa::kAvx512Bf16 : CpuIsa::kAvx512;
#else
  return CpuIsa::kPortable;
#endif
}

} // namespace

// Constant-initialized (portable) until select_cpu_kernels() runs at library load, so the order of
// static initializers across files does not matter.
CpuIsa detail::g_cpu_isa = CpuIsa::kPortable;

void select_cpu_kernels(CpuIsa max_isa) {
  detail::g_cpu_isa = std::min(max_isa, cpu_isa_supported());
  set_nf4_isa(detail::g_cpu_isa);
}

CpuIsa cpu_isa_supported() {
  static const CpuIsa supported = isa_of_this_cpu();
  return supported;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
  case CpuIsa::kAvx512Bf16: return "avx512_bf16";
  case CpuIsa::kAvx512: return "avx512";
  case CpuIsa::kAvx2: return "avx2";
  default: return "portable";
  }
}

const char* cpu_kernel_families() {
  // Each family's highest kernel, capped by the level in use (the families' dispatch: gemm_tile.cpp,
  // nf4_cpu.cpp, nf4_rowdot.cpp / nf4_rowdot_avx512.cpp, nf4_decode_segment.cpp, lora_factors_cpu.cpp).
  switch (cpu_isa()) {
  case CpuIsa::kAvx512Bf16:
    return "dequantize=avx512 row_dot_bf16=avx512_bf16 row_dot_fp32=avx512 gemm_tile=avx512 "
           "decode_segment=avx2 axpy=avx2 lora_factors=avx2 conversions=avx2";
  case CpuIsa::kAvx512:
    return "dequantize=avx512 row_dot_bf16=avx512(vpermps) row_dot_fp32=avx512 gemm_tile=avx512 "
           "decode_segment=avx2 axpy=avx2 lora_factors=avx2 conversions=avx2";
  case CpuIsa::kAvx2:
    return "dequantize=avx2 row_dot_bf16=avx2 row_dot_fp32=avx2 gemm_tile=avx2 "
           "decode_segment=avx2 axpy=avx2 lora_factors=avx2 conversions=avx2";
  default:
    return "dequantize=portable row_dot_bf16=portable row_dot_fp32=portable gemm_tile=portable "
           "decode_segment=portable axpy=portable lora_factors=portable conversions=portable";
  }
}

} // namespace lora_ops::cpu
