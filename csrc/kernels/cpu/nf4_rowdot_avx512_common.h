// Internals shared by the two AVX-512 row-dot files, nf4_rowdot_avx512.cpp (AVX-512 F/BW/VL/DQ: the vpermps
// kernel) and nf4_rowdot_avx512_bf16.cpp (with AVX512_BF16: the vdpbf16ps kernels). Each includes this
// with LORA_ROWDOT_TARGET set to its own target attribute, so these helpers inline into its kernels (gcc
// inlines a function only into callers whose target includes the callee's).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/nf4_rowdot_detail.h"
#include "cpu/x86_target.h"

#ifndef LORA_ROWDOT_TARGET
#error "define LORA_ROWDOT_TARGET before including nf4_rowdot_avx512_common.h"
#endif

namespace lora_ops::cpu::rowdot_detail {
namespace {

constexpr int kMaxRows = 8;          // x rows per decode (2 accumulators each, 32 zmm registers)
constexpr int64_t kChunkBf16 = 64;   // columns per vdpbf16ps step (32 packed bytes)
constexpr int64_t kChunkFp32 = 32;   // columns per vpermps step (16 packed bytes)

// Elements between the prepared bf16 x rows: k plus 64 (2 cache lines), so that rows whose byte pitch is
// a multiple of 4 KiB do not all fall into the same L1 set (16 rows would thrash its 8 ways). Fits in
// the fp32 buffer the rows are packed into (k >= 64).
int64_t bf16_row_pitch(int64_t k) { return k + 64; }

// Rewrites each `chunk`-column run of x32 as its even columns followed by its odd ones; with `to_bf16`
// the run is written as bf16 (the high half of each fp32 value: x32 holds bf16 values widened exactly)
// packed from the start of the same buffer, rows bf16_row_pitch(k) elements apart.
void split_even_odd(int64_t m, int64_t k, float* x32, int64_t chunk, bool to_bf16) {
  float tmp[kChunkBf16];
  uint16_t* x16 = reinterpret_cast<uint16_t*>(x32);
  for (int64_t i = 0; i < m * k; i += chunk) { // k % chunk == 0: chunks never straddle rows
    const int64_t o = (i / k) * bf16_row_pitch(k) + i % k; // where the bf16 chunk goes (<= 2i: read already)
    const int64_t half = chunk / 2;
    for (int64_t c = 0; c < half; ++c) {
      tmp[c] = x32[i + 2 * c];
      tmp[half + c] = x32[i + 2 * c + 1];
    }
    if (!to_bf16) {
      std::copy(tmp, tmp + chunk, x32 + i);
      continue;
    }
    for (int64_t c = 0; c < chunk; ++c) {
      uint32_t u;
      std::memcpy(&u, tmp + c, 4);
      x16[o + c] = static_cast<uint16_t>(u >> 16);
    }
  }
}

LORA_ROWDOT_TARGET inline float hsum(__m512 a, __m512 b) { return _mm512_reduce_add_ps(_mm512_add_ps(a, b)); }

// out[m * ldo] = the sum of row m's 2U accumulators, for the MC rows.
template <int MC, int U>
LORA_ROWDOT_TARGET inline void store_sums(const __m512 (&acc)[MC][2 * U], float* out, int64_t ldo) {
  for (int m = 0; m < MC; ++m) {
    __m512 a = acc[m][0], b = acc[m][1];
    for (int u = 1; u < U; ++u) {
      a = _mm512_add_ps(a, acc[m][2 * u]);
      b = _mm512_add_ps(b, acc[m][2 * u + 1]);
    }
    out[m * ldo] = hsum(a, b);
  }
}

// The nested map's entries for 16 8-bit codes q: vpermi2ps picks from 32 entries by bits 0-4, three blend
// levels by bits 5-7. No gather: gathers are microcoded and slow on Intel CPUs with the GDS (Downfall)
// microcode mitigation, and on Zen 4 this is faster than the gather was (bench/notes_qlora_cpu.md).
LORA_ROWDOT_TARGET inline __m512 nested_code_lookup(const float* code, __m512i q) {
  __m512 r[8];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j)
    r[j] = _mm512_permutex2var_ps(_mm512_loadu_ps(code + 32 * j), q, _mm512_loadu_ps(code + 32 * j + 16));
  for (int bit = 5, n = 8; bit < 8; ++bit, n /= 2) {
    const __mmask16 hi = _mm512_test_epi32_mask(q, _mm512_set1_epi32(1 << bit));
#pragma GCC unroll 4
    for (int j = 0; j < n / 2; ++j)
      r[j] = _mm512_mask_blend_ps(hi, r[2 * j], r[2 * j + 1]);
  }
  return r[0];
}

// block_absmax with the nested form decoded 16 blocks per step; the same two fp32 roundings (product, then
// sum) as nf4_nested_absmax, so the same bits.
LORA_ROWDOT_TARGET inline void block_absmax_avx512(const Nf4Weight& w, int64_t b0, int64_t n, float* out) {
  if (!w.nested())
    return block_absmax(w, b0, n, out);
  const __m512 offset = _mm512_set1_ps(*w.offset);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const int64_t b = b0 + i, g = b / kNestedBlocksize, g_last = (b + 15) / kNestedBlocksize;
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qabsmax + b)));
    const __m512 dyn = nested_code_lookup(w.nested_code, q);
    __m512 a2 = _mm512_set1_ps(w.absmax2[g]);
    if (g_last != g) // 16 blocks straddle at most one group boundary: lanes from it on take the next scale
      a2 = _mm512_mask_blend_ps(static_cast<__mmask16>(0xffffu << (g_last * kNestedBlocksize - b)), a2,
                                _mm512_set1_ps(w.absmax2[g_last]));
    _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_mul_ps(dyn, a2), offset));
  }
  if (i < n)
    block_absmax(w, b0 + i, n - i, out + i);
}

// Calls step(g, amax, u) for the column groups g (of `group` columns) of W row `row`, amax being the
// absmax of g's block (decoded a run of kAbsmaxRun blocks ahead): U consecutive groups at a time with
// u = 0 .. U-1 (independent accumulators), the remainder with u = 0.
template <int U, typename Step>
LORA_ROWDOT_TARGET inline void for_each_group(const Nf4Weight& w, int64_t k, int64_t row, int64_t group, Step&& step) {
  const int64_t bs = w.blocksize;
  const int shift = __builtin_ctzll(static_cast<uint64_t>(bs / group)); // blocksizes are 2^n
  const int64_t n_blocks = k / bs;
  float amax[kAbsmaxRun];
  for (int64_t b0 = 0; b0 < n_blocks; b0 += kAbsmaxRun) {
    const int64_t nb = std::min(kAbsmaxRun, n_blocks - b0);
    block_absmax_avx512(w, row * k / bs + b0, nb, amax);
    const int64_t g0 = (b0 * bs) / group, g1 = ((b0 + nb) * bs) / group;
    int64_t g = g0;
    for (; g + U <= g1; g += U) {
#pragma GCC unroll 2
      for (int u = 0; u < U; ++u)
        step(g + u, amax[(g + u - g0) >> shift], u);
    }
    for (; g < g1; ++g)
      step(g, amax[(g - g0) >> shift], 0);
  }
}

} // namespace
} // namespace lora_ops::cpu::rowdot_detail
