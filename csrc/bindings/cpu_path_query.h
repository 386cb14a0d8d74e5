// Which CPU path qlora_matmul takes for a call of these sizes, with the crossover table in use (its
// environment overrides applied): for `python -m lora_ops env`, benchmarks and the dispatch test
// (lora_ops._native.cpu_matmul_path). Defined next to the table, in register_cpu.cpp.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace lora_ops {

// "row_dot", "row_dot_fused", "axpy", "gemm", "slab" or "float64" (cpu/qlora_cpu_path.h).
const char* cpu_matmul_path(int64_t m, int64_t n, int64_t k, DType a_dtype, bool transpose_w, int32_t blocksize);

} // namespace lora_ops
