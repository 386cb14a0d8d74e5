// AVX-512 fused row-dot (nf4_rowdot.h): codes decoded in registers, for cpu_isa() == kAvx512.
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
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/nf4_avx512_indices.h"
#include "cpu/nf4_rowdot.h"
#include "cpu/nf4_rowdot_detail.h"
#include "cpu/x86_target.h"

// gcc 12's AVX-512 headers start some intrinsics from an "undefined" register (`__Y = __Y`) and then warn
// that it is, or may be, used uninitialized (a false positive of the headers, not of this code).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace lora_ops::cpu::rowdot_detail {
#ifdef LORA_OPS_X86
namespace {

constexpr int kMaxRows = 8;          // x rows per decode (2 accumulators each, 32 zmm registers)
constexpr int64_t kChunkBf16 = 64;   // columns per vdpbf16ps step (32 packed bytes)
constexpr int64_t kChunkFp32 = 32;   // columns per vpermps step (16 packed bytes)

bool bf16_pairs(const Nf4Weight& w, DType t) { return t == DType::kBFloat16 && w.blocksize >= kChunkBf16; }

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

// 32 bf16 values from any 2-byte-aligned address, loaded as the vdpbf16ps operand type (casting an
// __m512i instead makes gcc 12 move the register through the stack).
typedef short Bf16x32Unaligned __attribute__((vector_size(64), may_alias, aligned(2)));
LORA_AVX512 inline __m512bh load_bh(const uint16_t* p) { return *reinterpret_cast<const Bf16x32Unaligned*>(p); }

LORA_AVX512 inline float hsum(__m512 a, __m512 b) { return _mm512_reduce_add_ps(_mm512_add_ps(a, b)); }

// out[m * ldo] = the sum of row m's 2U accumulators, for the MC rows.
template <int MC, int U>
LORA_AVX512 inline void store_sums(const __m512 (&acc)[MC][2 * U], float* out, int64_t ldo) {
  for (int m = 0; m < MC; ++m) {
    __m512 a = acc[m][0], b = acc[m][1];
    for (int u = 1; u < U; ++u) {
      a = _mm512_add_ps(a, acc[m][2 * u]);
      b = _mm512_add_ps(b, acc[m][2 * u + 1]);
    }
    out[m * ldo] = hsum(a, b);
  }
}

// The 16 bf16 values of a block (code · amax rounded to nearest even, as float_to_bf16), in words 0-15
// and again in words 16-31, so a word index's bit 4 does not matter. vcvtne2ps2bf16 flushes values below
// 2^-126 to zero, as vdpbf16ps would treat them anyway.
LORA_AVX512 inline __m512i bf16_table(float amax) {
  const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(kCodebook), _mm512_set1_ps(amax));
  return (__m512i)_mm512_cvtne2ps_pbh(v, v);
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

// The nested map's entries for 16 8-bit codes q: vpermi2ps picks from 32 entries by bits 0-4, three blend
// levels by bits 5-7. No gather: gathers are microcoded and slow on Intel CPUs with the GDS (Downfall)
// microcode mitigation, and on Zen 4 this is faster than the gather was (bench/notes_qlora_cpu.md).
LORA_AVX512 inline __m512 nested_code_lookup(const float* code, __m512i q) {
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
LORA_AVX512 inline void block_absmax_avx512(const Nf4Weight& w, int64_t b0, int64_t n, float* out) {
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
LORA_AVX512 inline void for_each_group(const Nf4Weight& w, int64_t k, int64_t row, int64_t group, Step&& step) {
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

// MC bf16 x rows (even / odd columns per 64-column chunk) against one W row, blocksize >= 64.
// U chunk steps in flight per row when few rows give too few independent accumulators.
template <int MC>
LORA_AVX512 void row_bf16(const Nf4Weight& w, int64_t k, int64_t row, const uint16_t* x, int64_t ldx, float* out,
                          int64_t ldo) {
  constexpr int U = MC <= 2 ? 2 : 1;
  __m512 acc[MC][2 * U];
  for (int m = 0; m < MC; ++m)
    for (int u = 0; u < 2 * U; ++u)
      acc[m][u] = _mm512_setzero_ps();
  const uint8_t* codes = w.packed + row * k / 2; // a block boundary: k % bs == 0
  for_each_group<U>(w, k, row, kChunkBf16, [&](int64_t c, float amax, int u) LORA_AVX512 {
    const __m512i table = bf16_table(amax); // built here, next to its use: cheaper than storing a run
    const __m512i cw = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + c * 32)));
    const __m512bh even = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(cw, 4), table);
    const __m512bh odd = (__m512bh)_mm512_permutexvar_epi16(cw, table); // bits 0-4: the table repeats
#pragma GCC unroll 8
    for (int m = 0; m < MC; ++m) {
      const uint16_t* xs = x + m * ldx + c * kChunkBf16;
      acc[m][2 * u] = _mm512_dpbf16_ps(acc[m][2 * u], even, load_bh(xs));
      acc[m][2 * u + 1] = _mm512_dpbf16_ps(acc[m][2 * u + 1], odd, load_bh(xs + 32));
    }
  });
  store_sums<MC, U>(acc, out, ldo);
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

// MC (5..16) bf16 x rows against W rows [o0, o0 + rows), blocksize >= 64, in column blocks of kColBlock:
// the x rows' block (MC x 256 bf16, <= 8 KiB) stays in L1 while kRowsPerPass W rows pass over it (whole x
// rows would come from L2 once per W row), and one decode serves all MC rows. One accumulator per x row
// (even and odd products go to the same one: MC chains are enough); each W row's partial sums wait in
// `partial` between column blocks. Single thread, 4096 x 4096, nested absmax, vs two passes of row_bf16
// (bench/cpu_kernels/rowdot_kernel.cpp): M = 5 / 8 / 16: 1.76 / 2.96 / 6.2 ms vs 1.97 / 3.09 / 6.2.
constexpr int64_t kColBlock = 256;

template <int MC>
LORA_AVX512 void rows_bf16_blocked(const Nf4Weight& w, int64_t k, int64_t o0, int64_t rows, const uint16_t* x,
                                   int64_t ldx, float* out, int64_t ldo, float* partial) {
  const int64_t bs = w.blocksize;
  const int chunk_shift = __builtin_ctzll(static_cast<uint64_t>(bs / kChunkBf16));
  const float offset = w.nested() ? *w.offset : 0.0f;
  for (int64_t kb = 0; kb < k; kb += kColBlock) {
    const int64_t c0 = kb / kChunkBf16, c1 = std::min(k, kb + kColBlock) / kChunkBf16;
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t row = o0 + j;
      const uint8_t* codes = w.packed + row * k / 2;
      const int64_t first_block = row * k / bs;
      if (c1 * kChunkBf16 < k) // this row's codes of the next column block (2 lines), wanted ~rows W rows later:
        for (int64_t off = 0; off < kColBlock / 2; off += 64) // W streams from DRAM in real use
          _mm_prefetch(reinterpret_cast<const char*>(codes + c1 * 32 + off), _MM_HINT_T0);
      __m512 acc[MC];
      for (int m = 0; m < MC; ++m)
        acc[m] = kb == 0 ? _mm512_setzero_ps() : _mm512_load_ps(partial + (j * MC + m) * 16);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = first_block + (c >> chunk_shift);
        const float amax = w.nested() ? nf4_nested_absmax(w.nested_code[w.qabsmax[b]],
                                                          w.absmax2[static_cast<uint64_t>(b) / kNestedBlocksize], offset)
                                      : w.absmax[b];
        const __m512i table = bf16_table(amax);
        const __m512i cw =
            _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + c * 32)));
        const __m512bh even = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(cw, 4), table);
        const __m512bh odd = (__m512bh)_mm512_permutexvar_epi16(cw, table);
#pragma GCC unroll 16
        for (int m = 0; m < MC; ++m) {
          const uint16_t* xs = x + m * ldx + c * kChunkBf16;
          acc[m] = _mm512_dpbf16_ps(acc[m], even, load_bh(xs));
          acc[m] = _mm512_dpbf16_ps(acc[m], odd, load_bh(xs + 32));
        }
      }
      for (int m = 0; m < MC; ++m)
        _mm512_store_ps(partial + (j * MC + m) * 16, acc[m]);
    }
  }
  for (int64_t j = 0; j < rows; ++j)
    for (int m = 0; m < MC; ++m)
      out[m * ldo + j] = _mm512_reduce_add_ps(_mm512_load_ps(partial + (j * MC + m) * 16));
}

// ---- 6..16 x rows: x packed across rows, W decoded into L1, one accumulator per W row ---------------
//
// x is rewritten once per call as bf16 pairs packed across the rows: pair p of row i (columns 2p, 2p+1)
// at dword p·L + i (L = 16 lanes for 9..16 rows, 8 for 6..8), rows >= m zero. A vector of x pairs then
// holds one column pair of all the rows, and vdpbf16ps with a W pair broadcast from memory adds that
// pair's products to the lanes = the x rows of one output. 16 W rows at a time are decoded (bf16,
// natural order) into an L1 buffer per 256-column block; per column pair: one x load and 16 broadcast
// dot products (16 accumulators, one per W row, kept in registers over the whole reduction). The
// per-chunk x loads of rows_bf16_blocked (two per x row and 64 weights) become one per L x 2 weights,
// which that kernel's time followed (~5 cycles per x row and 64 weights, Zen 4). 8 lanes: ymm dot
// products, which Zen 4 runs two per cycle (zmm: one).
constexpr int kPackedMinRows = 6;     // below, the column-blocked kernel
constexpr int kPacked16MinRows = 9;   // from here 16 lanes
constexpr int64_t kPackedCols = 256; // columns per decoded block: 16 rows x 256 bf16 = 8 KiB

int packed_lanes(int64_t m) { return m >= kPacked16MinRows ? 16 : 8; }

void pack_pairs(int64_t m, int64_t k, float* x32) {
  const int64_t lanes = packed_lanes(m);
  std::vector<uint32_t> src(static_cast<size_t>(m * k));
  std::memcpy(src.data(), x32, src.size() * sizeof(uint32_t));
  uint32_t* dst = reinterpret_cast<uint32_t*>(x32); // k / 2 pairs x lanes <= m x k dwords (lanes <= 2m)
  for (int64_t pr = 0; pr < k / 2; ++pr)
    for (int64_t i = 0; i < lanes; ++i)
      dst[pr * lanes + i] = i < m ? (src[i * k + 2 * pr] >> 16) | (src[i * k + 2 * pr + 1] & 0xffff0000u) : 0u;
}

// 64 weights of one block (its 32 packed bytes) as bf16 in column order into dst: the dequantize
// decoders' indices (nf4_avx512_indices.h), with this file's bf16 table.
LORA_AVX512 inline void decode_chunk_bf16(const uint8_t* codes, __m512i table, uint16_t* dst) {
  for (int h = 0; h < 2; ++h)
    _mm512_store_si512(dst + 32 * h, _mm512_permutexvar_epi16(nf4_word_indices(codes + 16 * h), table));
}

// The vector operations of rows_bf16_packed for L lanes.
template <int L> struct PairLanes;
template <> struct PairLanes<16> {
  using Acc = __m512;
  using X = __m512bh;
  LORA_AVX512 static Acc zero() { return _mm512_setzero_ps(); }
  LORA_AVX512 static X load(const uint32_t* x) { return (__m512bh)_mm512_loadu_si512(x); }
  LORA_AVX512 static Acc dot(Acc a, uint32_t w, X x) {
    return _mm512_dpbf16_ps(a, (__m512bh)_mm512_set1_epi32(static_cast<int>(w)), x);
  }
  LORA_AVX512 static void store(float* p, Acc a) { _mm512_store_ps(p, a); }
};
template <> struct PairLanes<8> {
  using Acc = __m256;
  using X = __m256bh;
  LORA_AVX512 static Acc zero() { return _mm256_setzero_ps(); }
  LORA_AVX512 static X load(const uint32_t* x) { return (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)); }
  LORA_AVX512 static Acc dot(Acc a, uint32_t w, X x) {
    return _mm256_dpbf16_ps(a, (__m256bh)_mm256_set1_epi32(static_cast<int>(w)), x);
  }
  LORA_AVX512 static void store(float* p, Acc a) { _mm256_store_ps(p, a); }
};

template <int L>
LORA_AVX512 void rows_bf16_packed(const Nf4Weight& w, int64_t k, int64_t o0, int64_t rows, const uint32_t* xp,
                                  int64_t m, float* out, int64_t ldo) {
  using V = PairLanes<L>;
  alignas(64) uint16_t wbuf[16 * kPackedCols];
  alignas(64) float sums[16][16];
  const int64_t bs = w.blocksize;
  for (int64_t j0 = 0; j0 < rows; j0 += 16) {
    const int64_t jr = std::min<int64_t>(16, rows - j0);
    typename V::Acc acc[16];
    for (int j = 0; j < 16; ++j)
      acc[j] = V::zero();
    for (int64_t kb = 0; kb < k; kb += kPackedCols) {
      const int64_t kw = std::min(kPackedCols, k - kb); // a multiple of 64
      for (int64_t j = 0; j < 16; ++j) {
        uint16_t* dst = wbuf + j * kPackedCols;
        if (j >= jr) {
          std::memset(dst, 0, static_cast<size_t>(kw) * sizeof(uint16_t));
          continue;
        }
        const int64_t row = o0 + j0 + j;
        const uint8_t* codes = w.packed + (row * k + kb) / 2;
        if (kb + kw < k) // this row's next column block, wanted 16 rows from now: W streams from DRAM
          for (int64_t off = 0; off < kPackedCols / 2; off += 64)
            _mm_prefetch(reinterpret_cast<const char*>(codes + kw / 2 + off), _MM_HINT_T0);
        float amax[kPackedCols / 64];
        block_absmax(w, (row * k + kb) / bs, (kw + bs - 1) / bs, amax);
        for (int64_t c = 0; c < kw; c += 64)
          decode_chunk_bf16(codes + c / 2, bf16_table(amax[c / bs]), dst + c);
      }
      const uint32_t* x = xp + (kb / 2) * L;
      for (int64_t pr = 0; pr < kw / 2; ++pr) {
        const typename V::X xv = V::load(x + pr * L);
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) {
          uint32_t wp;
          std::memcpy(&wp, wbuf + j * kPackedCols + 2 * pr, 4);
          acc[j] = V::dot(acc[j], wp, xv);
        }
      }
    }
    for (int j = 0; j < 16; ++j)
      V::store(sums[j], acc[j]);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < jr; ++j)
        out[i * ldo + j0 + j] = sums[j][i];
  }
}

template <int MC>
void rows_blocked(const Nf4Weight& w, int64_t k, int64_t o0, int64_t rows, const uint16_t* x, float* out,
                  int64_t ldo) {
  constexpr int64_t kRowsPerPass = 16; // bounds `partial` (16 KiB at MC = 16)
  std::vector<float> buf(static_cast<size_t>(kRowsPerPass * MC * 16 + 16)); // + room to align to 64 bytes
  float* partial = buf.data() + (16 - (reinterpret_cast<uintptr_t>(buf.data()) / 4) % 16) % 16;
  for (int64_t j0 = 0; j0 < rows; j0 += kRowsPerPass)
    rows_bf16_blocked<MC>(w, k, o0 + j0, std::min(kRowsPerPass, rows - j0), x, bf16_row_pitch(k), out + j0, ldo,
                          partial);
}

// MC (3..4) bf16 x rows against W rows `row` and row + 1 at once: each x load feeds both rows' dot
// products (row_bf16 loads every x chunk once per W row). 4·MC accumulators. Single thread, 4096²
// (Zen 4): M = 4 1.6–2.1 -> 1.1–1.8 ms; with 2 threads and W from DRAM within the noise; at M = 2 it
// was slower there (0.84–0.95 vs 0.71 ms), so M <= 2 keeps one W row at a time.
template <int MC>
LORA_AVX512 void row_pair_bf16(const Nf4Weight& w, int64_t k, int64_t row, const uint16_t* x, int64_t ldx,
                               float* out, int64_t ldo) {
  __m512 acc[MC][4]; // [x row][W row 0 even, W row 0 odd, W row 1 even, W row 1 odd]
  for (int m = 0; m < MC; ++m)
    for (int u = 0; u < 4; ++u)
      acc[m][u] = _mm512_setzero_ps();
  const int64_t bs = w.blocksize;
  const int shift = __builtin_ctzll(static_cast<uint64_t>(bs / kChunkBf16));
  const int64_t n_blocks = k / bs;
  const uint8_t* codes0 = w.packed + row * k / 2;
  const uint8_t* codes1 = codes0 + k / 2;
  float amax0[kAbsmaxRun], amax1[kAbsmaxRun];
  for (int64_t b0 = 0; b0 < n_blocks; b0 += kAbsmaxRun) {
    const int64_t nb = std::min(kAbsmaxRun, n_blocks - b0);
    block_absmax(w, row * k / bs + b0, nb, amax0);
    block_absmax(w, (row + 1) * k / bs + b0, nb, amax1);
    const int64_t c0 = (b0 * bs) / kChunkBf16, c1 = ((b0 + nb) * bs) / kChunkBf16;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t a = (c - c0) >> shift;
      const __m512i t0 = bf16_table(amax0[a]), t1 = bf16_table(amax1[a]);
      const __m512i w0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes0 + c * 32)));
      const __m512i w1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes1 + c * 32)));
      const __m512bh e0 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w0, 4), t0);
      const __m512bh d0 = (__m512bh)_mm512_permutexvar_epi16(w0, t0);
      const __m512bh e1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w1, 4), t1);
      const __m512bh d1 = (__m512bh)_mm512_permutexvar_epi16(w1, t1);
#pragma GCC unroll 4
      for (int m = 0; m < MC; ++m) {
        const uint16_t* xs = x + m * ldx + c * kChunkBf16;
        const __m512bh xe = load_bh(xs), xo = load_bh(xs + 32);
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], e0, xe);
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], d0, xo);
        acc[m][2] = _mm512_dpbf16_ps(acc[m][2], e1, xe);
        acc[m][3] = _mm512_dpbf16_ps(acc[m][3], d1, xo);
      }
    }
  }
  for (int m = 0; m < MC; ++m) {
    out[m * ldo] = hsum(acc[m][0], acc[m][1]);
    out[m * ldo + 1] = hsum(acc[m][2], acc[m][3]);
  }
}

template <int MC>
void rows_of(const Nf4Weight& w, DType t, int64_t k, int64_t o0, int64_t rows, const float* x32, float* out,
             int64_t ldo) {
  if (bf16_pairs(w, t)) {
    const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x32);
    int64_t j = 0;
    if constexpr (MC >= 3 && MC <= 4)
      for (; j + 2 <= rows; j += 2)
        row_pair_bf16<MC>(w, k, o0 + j, x16, bf16_row_pitch(k), out + j, ldo);
    for (; j < rows; ++j)
      row_bf16<MC>(w, k, o0 + j, x16, bf16_row_pitch(k), out + j, ldo);
  } else {
    for (int64_t j = 0; j < rows; ++j)
      row_fp32<MC>(w, t, k, o0 + j, x32, k, out + j, ldo);
  }
}

} // namespace

void rowdot_prepare_x_avx512(const Nf4Weight& w, DType value_dtype, int64_t m, int64_t k, float* x32) {
  if (bf16_pairs(w, value_dtype) && m >= kPackedMinRows && m <= 16)
    pack_pairs(m, k, x32);
  else if (bf16_pairs(w, value_dtype))
    split_even_odd(m, k, x32, kChunkBf16, /*to_bf16=*/true);
  else
    split_even_odd(m, k, x32, kChunkFp32, /*to_bf16=*/false);
}

void rowdot_avx512(const Nf4Weight& w, DType value_dtype, int64_t k, int64_t o0, int64_t rows, const float* x32,
                   int64_t m, float* out, int64_t ldo) {
  // Row m0 of the prepared x: bf16 rows are k elements apart from the buffer's start.
  const bool pairs = bf16_pairs(w, value_dtype);
  if (pairs && m >= kPackedMinRows && m <= 16) {
    const uint32_t* xp = reinterpret_cast<const uint32_t*>(x32);
    return packed_lanes(m) == 16 ? rows_bf16_packed<16>(w, k, o0, rows, xp, m, out, ldo)
                                 : rows_bf16_packed<8>(w, k, o0, rows, xp, m, out, ldo);
  }
  if (pairs && m > 4 && m <= 2 * kMaxRows) { // one pass, x in column blocks
    const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x32);
    switch (m) {
    case 5: return rows_blocked<5>(w, k, o0, rows, x16, out, ldo);
    case 6: return rows_blocked<6>(w, k, o0, rows, x16, out, ldo);
    case 7: return rows_blocked<7>(w, k, o0, rows, x16, out, ldo);
    case 8: return rows_blocked<8>(w, k, o0, rows, x16, out, ldo);
    case 9: return rows_blocked<9>(w, k, o0, rows, x16, out, ldo);
    case 10: return rows_blocked<10>(w, k, o0, rows, x16, out, ldo);
    case 11: return rows_blocked<11>(w, k, o0, rows, x16, out, ldo);
    case 12: return rows_blocked<12>(w, k, o0, rows, x16, out, ldo);
    case 13: return rows_blocked<13>(w, k, o0, rows, x16, out, ldo);
    case 14: return rows_blocked<14>(w, k, o0, rows, x16, out, ldo);
    case 15: return rows_blocked<15>(w, k, o0, rows, x16, out, ldo);
    default: return rows_blocked<16>(w, k, o0, rows, x16, out, ldo);
    }
  }
  for (int64_t m0 = 0; m0 < m; m0 += kMaxRows) {
    const float* x = pairs ? reinterpret_cast<const float*>(reinterpret_cast<const uint16_t*>(x32) + m0 * bf16_row_pitch(k))
                           : x32 + m0 * k;
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
