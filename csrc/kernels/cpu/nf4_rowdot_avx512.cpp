// AVX-512 fused row-dot (nf4_rowdot.h): codes decoded in registers, for cpu_isa() >= kAvx512.
//
// A 16-entry table fits one register, so a code is looked up by a single permute with the code as index:
//
//  - bf16, blocksize >= 64 (vdpbf16ps): per block the 16 bf16 weight values sit in the low words of a
//    zmm (twice: words 16-31 repeat them), built by a multiply and one vcvtne2ps2bf16. Per 64 columns,
//    the 32 packed bytes are widened to words (vpmovzxbw); vpermw reads index bits 0-4, so the widened
//    bytes index the odd columns' (low nibble) values directly, and shifted right by 4 the even ones':
//    4 instructions per 64 weights (widen, shift, 2 vpermw), then 2 vdpbf16ps per x row, which multiply
//    the bf16 weights pairwise into fp32 accumulators against x, itself bf16 (the compute dtype: exact).
//    x is rewritten once per call to the same column order (even columns, then odd ones, per 64-column
//    chunk), as bf16 rows bf16_row_pitch(k) apart. Up to 4 x rows: one W row at a time (row_bf16); 5: one
//    pass with x in column blocks (rows_bf16_blocked); 6 to 16: x packed across rows instead (8 or 16
//    lanes) and W decoded into L1, one broadcast dot product per W pair (rows_bf16_packed).
//  - other dtypes and blocksize 32 (vpermps): per 32 columns, 16 packed bytes widened to dwords, split
//    into nibbles the same way (vpermps reads index bits 0-3), two vpermps look them up in the block's
//    16 fp32 values (each rounded to the compute dtype), FMA against x (fp32, even columns then odd ones
//    per 32-column group).
//
// vdpbf16ps rounds each fused step to fp32 (nearest even) and treats subnormal bf16 inputs and results
// as zero: a weight or x value below 2^-126 in magnitude counts as 0 (an absolute error below 2^-126 |x|
// or 2^-126 |w| per term); otherwise the sums are fp32 sums as in the other kernels, in another order.
// Up to kMaxRows (fp32) or 16 (bf16) x rows share one decode.
//
// This file: the vpermps kernel and the entry points (AVX-512 F/BW/VL/DQ, cpu_isa() >= kAvx512); the
// vdpbf16ps kernels are in nf4_rowdot_avx512_bf16.cpp and run only at kAvx512Bf16. Without AVX512_BF16,
// bf16 weights of any blocksize take the vpermps kernel (its table holds the bf16-rounded values).
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cpu/cpu_isa.h"
#include "cpu/nf4_rowdot.h"
#include "cpu/nf4_rowdot_detail.h"
#include "cpu/x86_target.h"

// gcc 12's AVX-512 headers start some intrinsics from an "undefined" register (`__Y = __Y`) and then warn
// that it is, or may be, used uninitialized (a false positive of the headers, not of this code).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#ifdef LORA_OPS_X86
#define LORA_ROWDOT_TARGET LORA_AVX512
#include "cpu/nf4_rowdot_avx512_common.h"
#endif

namespace lora_ops::cpu::rowdot_detail {
#ifdef LORA_OPS_X86
namespace {

// The vdpbf16ps kernels take bf16 weights of blocksize >= 64 where the CPU has AVX512_BF16.
bool bf16_pairs(const Nf4Weight& w, DType t) {
  return cpu_isa() >= CpuIsa::kAvx512Bf16 && rowdot_bf16_pairs_applies(w, t);
}

// The 16 fp32 values of a block, each rounded to the compute dtype and back (round_to_compute's rule).
LORA_AVX512 inline __m512 fp32_table(float amax, DType t) {
  const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(kCodebook), _mm512_set1_ps(amax));
  if (t == DType::kBFloat16) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  if (t == DType::kFloat16)
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return v;
}

// MC fp32 x rows (even / odd columns per 32-column group) against one W row, any dtype and blocksize.
template <int MC>
LORA_AVX512 void row_fp32(const Nf4Weight& w, DType t, int64_t k, int64_t row, const float* x, int64_t ldx,
                          float* out, int64_t ldo) {
  constexpr int U = MC <= 2 ? 2 : 1;
  __m512 acc[MC][2 * U];
  for (int m = 0; m < MC; ++m)
    for (int u = 0; u < 2 * U; ++u)
      acc[m][u] = _mm512_setzero_ps();
  const uint8_t* codes = w.packed + row * k / 2; // blocksize >= 32
  for_each_group<U>(w, k, row, kChunkFp32, [&](int64_t g, float amax, int u) LORA_AVX512 {
    const __m512 table = fp32_table(amax, t);
    const __m512i cd = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + g * 16)));
    const __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(cd, 4), table);
    const __m512 odd = _mm512_permutexvar_ps(cd, table); // vpermps reads index bits 0-3 only
#pragma GCC unroll 8
    for (int m = 0; m < MC; ++m) {
      const float* xs = x + m * ldx + g * kChunkFp32;
      acc[m][2 * u] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xs), acc[m][2 * u]);
      acc[m][2 * u + 1] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xs + 16), acc[m][2 * u + 1]);
    }
  });
  store_sums<MC, U>(acc, out, ldo);
}

template <int MC>
void rows_of(const Nf4Weight& w, DType t, int64_t k, int64_t o0, int64_t rows, const float* x32, float* out,
             int64_t ldo) {
  for (int64_t j = 0; j < rows; ++j)
    row_fp32<MC>(w, t, k, o0 + j, x32, k, out + j, ldo);
}

} // namespace

void rowdot_prepare_x_avx512(const Nf4Weight& w, DType value_dtype, int64_t m, int64_t k, float* x32) {
  if (bf16_pairs(w, value_dtype))
    return rowdot_prepare_x_avx512_bf16(w, value_dtype, m, k, x32);
  split_even_odd(m, k, x32, kChunkFp32, /*to_bf16=*/false);
}

void rowdot_avx512(const Nf4Weight& w, DType value_dtype, int64_t k, int64_t o0, int64_t rows, const float* x32,
                   int64_t m, float* out, int64_t ldo) {
  if (bf16_pairs(w, value_dtype))
    return rowdot_avx512_bf16(w, value_dtype, k, o0, rows, x32, m, out, ldo);
  for (int64_t m0 = 0; m0 < m; m0 += kMaxRows) {
    const float* x = x32 + m0 * k;
    float* o = out + m0 * ldo;
    switch (std::min<int64_t>(kMaxRows, m - m0)) {
    case 1: rows_of<1>(w, value_dtype, k, o0, rows, x, o, ldo); break;
    case 2: rows_of<2>(w, value_dtype, k, o0, rows, x, o, ldo); break;
    case 3: rows_of<3>(w, value_dtype, k, o0, rows, x, o, ldo); break;
    case 4: rows_of<4>(w, value_dtype, k, o0, rows, x, o, ldo); break;
    case 5: rows_of<5>(w, value_dtype, k, o0, rows, x, o, ldo); break;
    case 6: rows_of<6>(w, value_dtype, k, o0, rows, x, o, ldo); break;
    case 7: rows_of<7>(w, value_dtype, k, o0, rows, x, o, ldo); break;
    default: rows_of<8>(w, value_dtype, k, o0, rows, x, o, ldo); break;
    }
  }
}
#else
// Not an x86 build: cpu_isa() is never kAvx512, so no caller gets here.
void rowdot_prepare_x_avx512(const Nf4Weight&, DType, int64_t, int64_t, float*) { std::abort(); }
void rowdot_avx512(const Nf4Weight&, DType, int64_t, int64_t, int64_t, const float*, int64_t, float*, int64_t) {
  std::abort();
}
#endif

} // namespace lora_ops::cpu::rowdot_detail
