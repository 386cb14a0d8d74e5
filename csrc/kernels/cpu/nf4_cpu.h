// CPU (C++/OpenMP) NF4 kernels. Torch-free: called by csrc/bindings/register_cpu.cpp.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/nf4_params.h"
#include "cpu/cpu_isa.h"

namespace lora_ops::cpu {

// Quantizes p.input blockwise. Returns how many blocks held a NaN or Inf (their absmax is NaN).
int64_t nf4_quantize(const Nf4QuantizeParams& p);

// Compresses absmax to 8-bit codes with nested blocksize 256 (exact nearest search, ties low).
void nf4_double_quantize(const Nf4DoubleQuantParams& p);

// Writes the dense weight, bit-identical to the spec's decode rule.
void nf4_dequantize(const Nf4DequantizeParams& p);

// Asks for the packed codes and the first scale of elements [e0, e1) ahead of their decode. A window's
// rows are short runs row_len apart (the dx slab: ~120 bytes of codes per row), which the hardware
// prefetchers do not follow: without it the decode waited on DRAM for every row.
void nf4_prefetch_run(const Nf4Weight& w, int64_t e0, int64_t e1);
constexpr int64_t kWindowPrefetchRows = 8; // how many rows ahead the window decoders ask for

// The window W[r0:r1, c0:c1] of W viewed [rows, row_len] as 16-bit values of t (bf16 / fp16, the
// nf4_dequantize bits) into dst with row pitch ld (elements). Requires row_len and c0 even (every row
// then starts on a whole byte). Parallel over rows. Feeds the slab path's bf16 GEMM.
void nf4_decode_window_16bit(const Nf4Weight& w, DType t, int64_t row_len, int64_t r0, int64_t r1, int64_t c0,
                             int64_t c1, uint16_t* dst, int64_t ld);

// The SIMD level of the dequantize kernels (AVX-512, AVX2 or portable); set by select_cpu_kernels
// (qlora_cpu.h), portable until then. All write the same bits.
void set_nf4_isa(CpuIsa isa);

// The float32 absmax of block b, decoding the nested form when present.
float nf4_block_absmax(const Nf4Weight& w, int64_t block);

}  // namespace lora_ops::cpu
