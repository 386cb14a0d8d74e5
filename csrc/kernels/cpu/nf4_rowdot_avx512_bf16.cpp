// The AVX512_BF16 kernels of the AVX-512 fused row-dot (nf4_rowdot_avx512.cpp has the design note):
// vdpbf16ps dot products of bf16 weights (blocksize >= 64) and bf16 x, tables built with vcvtne2ps2bf16.
// Called only at cpu_isa() == kAvx512Bf16, through rowdot_avx512 / rowdot_prepare_x_avx512.
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

#ifdef LORA_OPS_X86
#define LORA_ROWDOT_TARGET LORA_AVX512_BF16
#include "cpu/nf4_rowdot_avx512_common.h"
#endif

namespace lora_ops::cpu::rowdot_detail {
#ifdef LORA_OPS_X86
namespace {

// 32 bf16 values from any 2-byte-aligned address, loaded as the vdpbf16ps operand type (casting an
// __m512i instead makes gcc 12 move the register through the stack).
typedef short Bf16x32Unaligned __attribute__((vector_size(64), may_alias, aligned(2)));
LORA_AVX512_BF16 inline __m512bh load_bh(const uint16_t* p) { return *reinterpret_cast<const Bf16x32Unaligned*>(p); }

// The 16 bf16 values of a block (code · amax rounded to nearest even, as float_to_bf16), in words 0-15
// and again in words 16-31, so a word index's bit 4 does not matter. vcvtne2ps2bf16 flushes values below
// 2^-126 to zero, as vdpbf16ps would treat them anyway.
LORA_AVX512_BF16 inline __m512i bf16_table(float amax) {
  const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(kCodebook), _mm512_set1_ps(amax));
  return (__m512i)_mm512_cvtne2ps_pbh(v, v);
}

// MC bf16 x rows (even / odd columns per 64-column chunk) against one W row, blocksize >= 64.
// U chunk steps in flight per row when few rows give too few independent accumulators.
template <int MC>
LORA_AVX512_BF16 void row_bf16(const Nf4Weight& w, int64_t k, int64_t row, const uint16_t* x, int64_t ldx, float* out,
                          int64_t ldo) {
  constexpr int U = MC <= 2 ? 2 : 1;
  __m512 acc[MC][2 * U];
  for (int m = 0; m < MC; ++m)
    for (int u = 0; u < 2 * U; ++u)
      acc[m][u] = _mm512_setzero_ps();
  const uint8_t* codes = w.packed + row * k / 2; // a block boundary: k % bs == 0
  for_each_group<U>(w, k, row, kChunkBf16, [&](int64_t c, float amax, int u) LORA_AVX512_BF16 {
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

// MC (5..16) bf16 x rows against W rows [o0, o0 + rows), blocksize >= 64, in column blocks of kColBlock:
// the x rows' block (MC x 256 bf16, <= 8 KiB) stays in L1 while kRowsPerPass W rows pass over it (whole x
// rows would come from L2 once per W row), and one decode serves all MC rows. One accumulator per x row
// (even and odd products go to the same one: MC chains are enough); each W row's partial sums wait in
// `partial` between column blocks. Single thread, 4096 x 4096, nested absmax, vs two passes of row_bf16
// (bench/cpu_kernels/rowdot_kernel.cpp): M = 5 / 8 / 16: 1.76 / 2.96 / 6.2 ms vs 1.97 / 3.09 / 6.2.
constexpr int64_t kColBlock = 256;

template <int MC>
LORA_AVX512_BF16 void rows_bf16_blocked(const Nf4Weight& w, int64_t k, int64_t o0, int64_t rows, const uint16_t* x,
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
LORA_AVX512_BF16 inline void decode_chunk_bf16(const uint8_t* codes, __m512i table, uint16_t* dst) {
  for (int h = 0; h < 2; ++h)
    _mm512_store_si512(dst + 32 * h, _mm512_permutexvar_epi16(nf4_word_indices(codes + 16 * h), table));
}

// The vector operations of rows_bf16_packed for L lanes.
template <int L> struct PairLanes;
template <> struct PairLanes<16> {
  using Acc = __m512;
  using X = __m512bh;
  LORA_AVX512_BF16 static Acc zero() { return _mm512_setzero_ps(); }
  LORA_AVX512_BF16 static X load(const uint32_t* x) { return (__m512bh)_mm512_loadu_si512(x); }
  LORA_AVX512_BF16 static Acc dot(Acc a, uint32_t w, X x) {
    return _mm512_dpbf16_ps(a, (__m512bh)_mm512_set1_epi32(static_cast<int>(w)), x);
  }
  LORA_AVX512_BF16 static void store(float* p, Acc a) { _mm512_store_ps(p, a); }
};
template <> struct PairLanes<8> {
  using Acc = __m256;
  using X = __m256bh;
  LORA_AVX512_BF16 static Acc zero() { return _mm256_setzero_ps(); }
  LORA_AVX512_BF16 static X load(const uint32_t* x) { return (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)); }
  LORA_AVX512_BF16 static Acc dot(Acc a, uint32_t w, X x) {
    return _mm256_dpbf16_ps(a, (__m256bh)_mm256_set1_epi32(static_cast<int>(w)), x);
  }
  LORA_AVX512_BF16 static void store(float* p, Acc a) { _mm256_store_ps(p, a); }
};

template <int L>
LORA_AVX512_BF16 void rows_bf16_packed(const Nf4Weight& w, int64_t k, int64_t o0, int64_t rows, const uint32_t* xp,
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
LORA_AVX512_BF16 void row_pair_bf16(const Nf4Weight& w, int64_t k, int64_t row, const uint16_t* x, int64_t ldx,
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
void rows_of(const Nf4Weight& w, int64_t k, int64_t o0, int64_t rows, const float* x32, float* out, int64_t ldo) {
  const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x32);
  int64_t j = 0;
  if constexpr (MC >= 3 && MC <= 4)
    for (; j + 2 <= rows; j += 2)
      row_pair_bf16<MC>(w, k, o0 + j, x16, bf16_row_pitch(k), out + j, ldo);
  for (; j < rows; ++j)
    row_bf16<MC>(w, k, o0 + j, x16, bf16_row_pitch(k), out + j, ldo);
}

} // namespace

void rowdot_prepare_x_avx512_bf16(const Nf4Weight& w, DType value_dtype, int64_t m, int64_t k, float* x32) {
  if (m >= kPackedMinRows && m <= 16)
    pack_pairs(m, k, x32);
  else
    split_even_odd(m, k, x32, kChunkBf16, /*to_bf16=*/true);
}

void rowdot_avx512_bf16(const Nf4Weight& w, DType value_dtype, int64_t k, int64_t o0, int64_t rows, const float* x32,
                        int64_t m, float* out, int64_t ldo) {
  // Row m0 of the prepared x: bf16 rows are k elements apart from the buffer's start.
  if (m >= kPackedMinRows && m <= 16) {
    const uint32_t* xp = reinterpret_cast<const uint32_t*>(x32);
    return packed_lanes(m) == 16 ? rows_bf16_packed<16>(w, k, o0, rows, xp, m, out, ldo)
                                 : rows_bf16_packed<8>(w, k, o0, rows, xp, m, out, ldo);
  }
  if (m > 4 && m <= 2 * kMaxRows) { // one pass, x in column blocks
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
    const float* x = reinterpret_cast<const float*>(reinterpret_cast<const uint16_t*>(x32) + m0 * bf16_row_pitch(k));
    float* o = out + m0 * ldo;
    switch (std::min<int64_t>(kMaxRows, m - m0)) {
    case 1: rows_of<1>(w, k, o0, rows, x, o, ldo); break;
    case 2: rows_of<2>(w, k, o0, rows, x, o, ldo); break;
    case 3: rows_of<3>(w, k, o0, rows, x, o, ldo); break;
    case 4: rows_of<4>(w, k, o0, rows, x, o, ldo); break;
    case 5: rows_of<5>(w, k, o0, rows, x, o, ldo); break;
    case 6: rows_of<6>(w, k, o0, rows, x, o, ldo); break;
    case 7: rows_of<7>(w, k, o0, rows, x, o, ldo); break;
    default: rows_of<8>(w, k, o0, rows, x, o, ldo); break;
    }
  }
}
#else
// Not an x86 build: cpu_isa() is never kAvx512Bf16, so no caller gets here.
void rowdot_prepare_x_avx512_bf16(const Nf4Weight&, DType, int64_t, int64_t, float*) { std::abort(); }
void rowdot_avx512_bf16(const Nf4Weight&, DType, int64_t, int64_t, int64_t, const float*, int64_t, float*, int64_t) {
  std::abort();
}
#endif

} // namespace lora_ops::cpu::rowdot_detail
