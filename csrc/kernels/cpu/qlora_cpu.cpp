// CPU fused QLoRA linear. Design (numbers in bench/notes_qlora_cpu.md):
//
//   Which path runs is chosen by choose_matmul_path (cpu/qlora_cpu_path.h), not here.
//   small M (forward, row-dot): AVX2 with K % blocksize == 0: codes decoded in registers and multiplied
//     into every x row at once (nf4_rowdot.h); otherwise per 4 W rows, decode them into an L1 buffer (AVX2:
//     8 codes per step via variable shifts + two vpermps table lookups) and dot them with each x row.
//   small M (dx, axpy): threads own column ranges of W, decode each W row segment once
//     and axpy it into every row's fp32 accumulator.
//   otherwise: cache-blocked GEMM. Per M-block (256..1024 rows of x converted to fp32 once), threads take
//     64-wide output panels (split into row parts too when there are few panels); for each reduction
//     block of kKB, the panel of W is dequantized into a thread-local scratch laid out as 4 micro-panels
//     [kKB][16] (64 KiB, L2-resident), and a register tile sweeps the M-block over it: 6x16 with AVX2
//     (12 ymm accumulators, FMA), 12x16 with AVX-512 (gemm_ukernel_avx512.cpp; the same bits).
//
//        x32 (M-block, fp32)         W panel scratch (per thread)        C tile (per thread)
//        [rows x n_in]       x       [kKB x 64] = 4 x [kKB x 16]   ->    [rows x 64] fp32
//              ^ 6 / 12 rows at a time       ^ 16 columns at a time
//
//   Without dropout the LoRA term rides as r more reduction terms through the same tile (x rows get s,
//   the panel r rows of scale·lora_w); with dropout the epilogue adds it (masked) to the fp32 tile. The
//   epilogue adds bias and rounds once to the output dtype. Never a dense W, never an [M, N] fp32 buffer.
//
// AVX2/FMA/F16C code lives in functions with __attribute__((target(...))) selected at run time with
// __builtin_cpu_supports, so the library itself runs on any x86-64 (no -march=native). The binding layer
// calls select_cpu_kernels once at load (cpu_isa.h; LORA_OPS_NO_AVX512=1 caps it at AVX2,
// LORA_OPS_NO_AVX2=1 at the portable path; tests use both). The AVX-512 kernels: the fused row-dot
// (nf4_rowdot_avx512.cpp), the GEMM tile (gemm_ukernel_avx512.cpp) and the dequantize block decoders
// (nf4_dequant_avx512.cpp); everything else (axpy, the buffered row-dot, and the LoRA factor ops of
// lora_factors_cpu.cpp) runs its AVX2 kernel on an AVX-512 machine. Element and row conversions:
// row_convert.h.
//
// Files: qlora_cpu.cpp (this: path dispatch, the slab path's decode entry points), nf4_decode_segment.cpp
// (W runs into fp32), qlora_gemv_cpu.cpp / qlora_axpy_cpu.cpp / qlora_gemm_cpu.cpp / qlora_f64_cpu.cpp
// (one path each), gemm_tile.cpp (the register tiles), qlora_epilogue.cpp (LoRA term, bias, rounding),
// dropout_mask_cpu.cpp, cpu_isa.cpp (the SIMD level).
#include "cpu/qlora_cpu.h"

#include "cpu/nf4_cpu.h"
#include "cpu/nf4_decode_segment.h"
#include "cpu/qlora_cpu_kernels.h"

namespace lora_ops::cpu {

void qlora_matmul(const QloraMatmulParams& p, CpuMatmulPath path) {
  if (p.m == 0)
    return;
  switch (path) {
  case CpuMatmulPath::kFloat64:
    return matmul_f64(p);
  case CpuMatmulPath::kRowDot:
  case CpuMatmulPath::kRowDotFused:
    return matmul_gemv(p, path);
  case CpuMatmulPath::kAxpy:
    return matmul_axpy_transposed(p);
  case CpuMatmulPath::kGemm:
    return matmul_gemm(p);
  case CpuMatmulPath::kSlabGemm: // runs in the binding layer (ATen's GEMM); never reaches the kernels
    return matmul_gemm(p);
  }
}

void nf4_decode_range(const Nf4Weight& w, DType value_dtype, int64_t e0, int64_t e1, float* dst) {
  if (e1 > e0)
    decode_segment(w, value_dtype, e0, e1 - e0, dst);
}

void nf4_decode_window(const Nf4Weight& w, DType value_dtype, int64_t row_len, int64_t r0, int64_t r1, int64_t c0,
                       int64_t c1, float* dst, int64_t ld) {
#pragma omp parallel for schedule(static)
  for (int64_t r = r0; r < r1; ++r) {
    if (r + kWindowPrefetchRows < r1)
      nf4_prefetch_run(w, (r + kWindowPrefetchRows) * row_len + c0, (r + kWindowPrefetchRows) * row_len + c1);
    nf4_decode_range(w, value_dtype, r * row_len + c0, r * row_len + c1, dst + (r - r0) * ld);
  }
}

} // namespace lora_ops::cpu
