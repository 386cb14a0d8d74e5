// CPU (C++/OpenMP) kernels of the fused QLoRA linear. Torch-free: called by csrc/bindings/register_cpu.cpp.
// Design and measurements: bench/notes_qlora_cpu.md.
#pragma once
#include <cstdint>

#include "common/qlora_params.h"
#include "cpu/cpu_isa.h"
#include "cpu/qlora_cpu_path.h"

namespace lora_ops::cpu {

// out = a · op(W) + scale · LoRA term (· dropout mask) + bias; see QloraMatmulParams. `path` comes from
// choose_matmul_path (cpu/qlora_cpu_path.h). fp16/bf16/fp32 a: fp32 accumulation, AVX2+FMA
// micro-kernels when selected; fp64 a (kFloat64 only): reference-grade, for gradcheck on small shapes.
void qlora_matmul(const QloraMatmulParams& p, CpuMatmulPath path);

// The dropout keep-mask as 0/1 bytes; see DropoutMaskParams.
void dropout_mask(const DropoutMaskParams& p);

// Decodes weight elements [e0, e1) of W flattened row-major (a quantization block may straddle rows
// when K % blocksize != 0) into dst as float32, each value first rounded once to value_dtype: the
// GEMM operand of the qlora_matmul contract (qlora_params.h), widened exactly. Serial; AVX2 when selected.
void nf4_decode_range(const Nf4Weight& w, DType value_dtype, int64_t e0, int64_t e1, float* dst);

// The window rows [r0, r1) x columns [c0, c1) of W viewed [rows, row_len], decoded as nf4_decode_range
// does into dst with row pitch ld (elements). Parallel over rows. Feeds the ATen slab GEMM
// (csrc/bindings/qlora_slab.cpp), which never holds more of W than one window.
void nf4_decode_window(const Nf4Weight& w, DType value_dtype, int64_t row_len, int64_t r0, int64_t r1, int64_t c0,
                       int64_t c1, float* dst, int64_t ld);

// Finishes rows [m0, m0 + mb) x output columns [o0, o0 + ow) of a qlora_matmul whose fp32 base products
// are in acc (row pitch ld; overwritten): adds the LoRA term (dropout-masked in the dx form), bias, and
// rounds once into p.out, exactly as the kGemm path's epilogue does. For the slab path when dropout keeps
// the LoRA term out of the GEMM.
void qlora_finish_tile(const QloraMatmulParams& p, int64_t m0, int64_t mb, int64_t o0, int64_t ow, float* acc,
                       int64_t ld);

// Called once at library load by the binding layer: run at the highest SIMD level (cpu_isa.h) the CPU has,
// up to max_isa (before the call, the portable kernels run).
void select_cpu_kernels(CpuIsa max_isa);

} // namespace lora_ops::cpu
