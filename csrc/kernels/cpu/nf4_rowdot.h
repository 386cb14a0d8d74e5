// Fused NF4 decode + dot products for the forward with few x rows (the kRowDot path): the codes of a W
// row are decoded in registers and multiplied into every x row while they are there, so no decoded
// weight is ever stored (the older path wrote 4 decoded rows to a buffer and read them back). The per-
// block 16-value table holds each code's product with the block's absmax rounded once to the compute
// dtype, so the operand is exactly the qlora_matmul contract's (qlora_params.h).
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/nf4_params.h"

namespace lora_ops::cpu {

// True when rowdot_fused can take this weight: a row of K elements is a whole number of quantization
// blocks, so every row starts on a block (and a byte). The caller also checks that a SIMD level
// (cpu_isa.h: AVX2 or AVX-512) is selected.
bool rowdot_fused_applies(const Nf4Weight& w, int64_t k);

// True when rowdot_fused takes its bf16 kernel for this weight and compute dtype (bf16, blocksize >= 64:
// AVX2 byte tables, AVX512_BF16 vdpbf16ps; AVX-512 without BF16 takes its vpermps kernel for every dtype,
// and its crossover table gives both kinds the same limit); otherwise its vpermps kernel. The two have different crossovers
// (qlora_cpu_path.h).
bool rowdot_byte_tables(const Nf4Weight& w, DType value_dtype);

// Rewrites x32 ([m, k] fp32 rows, in place) into the operand layout rowdot_fused reads for this weight,
// compute dtype and SIMD level (columns reordered per chunk; on AVX-512 with bf16, packed to bf16 from the
// buffer's start). The result is opaque: pass it to rowdot_fused only. Call once per call of the layer.
void rowdot_prepare_x(const Nf4Weight& w, DType value_dtype, int64_t m, int64_t k, float* x32);

// out[m * ldo + j] = Σ_k x[m, k] · W[o0 + j, k]  for j < rows, m < M; fp32 accumulation, x32 as left by
// rowdot_prepare_x. Requires rowdot_fused_applies(w, K) and AVX2 or AVX-512 selected. Serial (the
// caller parallelizes over rows).
void rowdot_fused(const Nf4Weight& w, DType value_dtype, int64_t k, int64_t o0, int64_t rows, const float* x32,
                  int64_t m, float* out, int64_t ldo);

} // namespace lora_ops::cpu
