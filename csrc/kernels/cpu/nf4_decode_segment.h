// NF4 decode of a run of consecutive (flattened) weight elements into fp32, each value the product
// code · absmax rounded once to the compute dtype (the qlora_matmul operand, qlora_params.h): the decode
// the buffered row-dot, the axpy dx, the GEMM panels and the slab windows of the CPU matmul share.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/nf4_params.h"

namespace lora_ops::cpu {

// Elements [f, f + len) into dst, at the SIMD level in use (cpu_isa.h); every level writes the same bits.
void decode_segment(const Nf4Weight& w, DType t, int64_t f, int64_t len, float* dst);

// The same with plain C++ (the float64 path's decode, with t = kFloat32: the exact fp32 products).
void decode_segment_portable(const Nf4Weight& w, DType t, int64_t f, int64_t len, float* dst);

} // namespace lora_ops::cpu
