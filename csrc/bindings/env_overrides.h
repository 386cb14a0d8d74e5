// Every environment variable lora_ops reads, parsed here and nowhere else (the kernels never read the
// environment). All are for tests and benchmarks; the defaults are what users get.
#pragma once
#include <cstdint>

namespace lora_ops {

struct EnvOverrides {
  bool poison_outputs = false;       // LORA_OPS_POISON_OUTPUTS=1: fill new outputs with 0xFF (NaN) first
  bool no_avx2 = false;              // LORA_OPS_NO_AVX2=1: the portable CPU kernels
  bool no_avx512 = false;            // LORA_OPS_NO_AVX512=1: the AVX2 CPU kernels at most
  bool no_avx512_bf16 = false;       // LORA_OPS_NO_AVX512_BF16=1: the AVX-512 kernels without AVX512_BF16 at most
  int64_t cpu_row_dot_max_m = -1;    // LORA_OPS_GEMV_MAX_M: CPU forward row-dot crossover (-1: the table's)
  int64_t cpu_fused_row_dot_max_m = -1; // LORA_OPS_FUSED_ROWDOT_MAX_M: largest M of the fused row-dot, both
                                        // table kinds (-1: the table's; 0: never)
  int64_t cpu_axpy_max_m = -1;       // LORA_OPS_AXPY_MAX_M: CPU dx axpy crossover (-1: the table's)
  int64_t cpu_slab_min_m = -1;       // LORA_OPS_SLAB_MIN_M: smallest M of the CPU slab GEMM, every dtype,
                                     // form and layer size (-1: the table's; huge: never)
  int64_t cpu_slab_bytes = -1;       // LORA_OPS_SLAB_BYTES: CPU slab GEMM's W scratch (-1: the table's)
  int64_t cpu_slab_rows_bytes = -1;  // LORA_OPS_SLAB_ROWS_BYTES: its activation chunk (-1: the table's)
  int64_t cpu_slab_bf16_gemm = -1;   // LORA_OPS_SLAB_BF16_GEMM: 1 / 0: bf16 activations take ATen's bf16 GEMM
                                     // in the slab path, or its fp32 one (-1: the table's)
  bool cpu_slab_check_streams = false; // LORA_OPS_SLAB_CHECK_STREAMS=1: the CPU slab path runs with CUDA's two
                                       // W buffers and checks its SlabStreams call protocol (register_cpu.cpp)
};

// Read once, at the first call (library load).
const EnvOverrides& env_overrides();

// LORA_OPS_QLORA_FORCE = tc_decode | decode | mma | slab | ffma (CUDA qlora_matmul path), or nullptr when unset. Read at
// each call, not once: tests and benchmarks switch it between calls in one process.
const char* qlora_forced_path();

} // namespace lora_ops
