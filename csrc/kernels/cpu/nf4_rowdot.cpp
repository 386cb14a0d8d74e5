// Fused NF4 decode + dot for the forward with few x rows; see nf4_rowdot.h.
//
// Both kernels keep, per W row and quantization block, a table of the block's 16 weight values (code ·
// absmax, rounded once to the compute dtype) in registers and decode codes straight into FMA operands:
//
//  - bf16, blocksize >= 64 (byte tables): the low and the high bytes of the 16 bf16 values are two
//    16-byte tables in both lanes. Per 64 codes (32 packed bytes): the high and low nibbles are split
//    (3 instructions), vpshufb looks each up in both tables (4), unpacking low with high bytes gives 16-bit
//    values (4), and a shift / a mask turns the even / odd ones into fp32 (8): about 0.3 instructions per
//    weight. The values come out in a fixed order within each 64-column chunk, so x is permuted once per
//    call to the same order (rowdot_prepare_x) and the dot products need no shuffles.
//  - other dtypes and blocksize 32 (vpermps): per 8 codes the 4 packed bytes are broadcast, shifted per
//    lane and masked (lane i gets code i), two vpermps look them up in the 8-entry halves of the table and
//    bit 3 blends the halves: 7 instructions per 8 weights; x stays in order.
//
// Up to kMaxRows x rows share one decode; their accumulators stay in registers. Measured on a 2-core AMD
// EPYC (Zen 1: 256-bit operations are split in two there): bench/notes_qlora_cpu.md.
#include "cpu/nf4_rowdot.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cpu/cpu_isa.h"
#include "cpu/nf4_rowdot_detail.h"
#include "cpu/simd_round.h"
#include "cpu/x86_target.h"

namespace lora_ops::cpu {
namespace {

using rowdot_detail::block_absmax;
using rowdot_detail::kAbsmaxRun;
using rowdot_detail::kCodebook;

constexpr int kMaxRows = 4;    // x rows per decode (accumulators stay in registers)
constexpr int64_t kChunk = 64; // columns per byte-table step (32 packed bytes, one ymm)

// Position of column c of a 64-column chunk in the byte-table kernel's order. The kernel produces 8
// vectors v = src·4 + h·2 + q of 8 lanes p = 4·L + d, where lane L of the 32 packed bytes holds columns
// 32L .. 32L+31, src picks the high (even column) or low (odd column) nibble, h the unpacked byte half
// and q the even / odd 16-bit value: column 32L + 16h + 4d + 2q + src.
int chunk_position(int c) {
  const int src = c & 1, q = (c >> 1) & 1, d = (c >> 2) & 3, h = (c >> 4) & 1, lane = c >> 5;
  return (src * 4 + h * 2 + q) * 8 + lane * 4 + d;
}

} // namespace

bool rowdot_fused_applies(const Nf4Weight& w, int64_t k) { return k > 0 && k % w.blocksize == 0; }

bool rowdot_byte_tables(const Nf4Weight& w, DType t) { return t == DType::kBFloat16 && w.blocksize >= kChunk; }

void rowdot_prepare_x(const Nf4Weight& w, DType value_dtype, int64_t m, int64_t k, float* x32) {
  if (cpu_isa() >= CpuIsa::kAvx512)
    return rowdot_detail::rowdot_prepare_x_avx512(w, value_dtype, m, k, x32);
  if (!rowdot_byte_tables(w, value_dtype))
    return;
  float tmp[kChunk];
  for (int64_t i = 0; i < m * k; i += kChunk) { // k % 64 == 0: chunks never straddle rows
    for (int c = 0; c < kChunk; ++c)
      tmp[chunk_position(c)] = x32[i + c];
    std::memcpy(x32 + i, tmp, sizeof(tmp));
  }
}

#ifdef LORA_OPS_X86
namespace {

LORA_AVX2 inline float hsum(__m256 v) {
  alignas(32) float l[8];
  _mm256_store_ps(l, v);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

// out[m * ldo] = the sum of row m's U accumulators, for the MC rows.
template <int MC, int U> LORA_AVX2 inline void store_sums(const __m256 (&acc)[MC][U], float* out, int64_t ldo) {
  for (int m = 0; m < MC; ++m) {
    __m256 s = acc[m][0];
    for (int u = 1; u < U; ++u)
      s = _mm256_add_ps(s, acc[m][u]);
    out[m * ldo] = hsum(s);
  }
}

// 8 finite fp32 values rounded to bf16 (nearest even) in the high 16 bits of each lane; the low 16 bits
// are left over (the caller reads only bytes 2 and 3). The same rule as round_to_compute_avx2 with the
// tie bit found by a compare rather than a shift: on Zen 1, whose one vector shift port also runs half
// of every shuffle, this loop is bound by that port.
LORA_AVX2 inline __m256i bf16_high_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bit16 = _mm256_set1_epi32(0x10000);
  const __m256i odd = _mm256_cmpeq_epi32(_mm256_and_si256(u, bit16), bit16); // -1 where the kept lsb is 1
  return _mm256_sub_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
}

// The low- and high-byte tables of a block's 16 bf16 values, each in both lanes.
LORA_AVX2 inline void bf16_byte_tables(float amax, __m256i& t_low, __m256i& t_high) {
  const __m256 a = _mm256_set1_ps(amax);
  const __m256i r_lo = bf16_high_bits(_mm256_mul_ps(_mm256_loadu_ps(kCodebook), a));     // codes 0-3 | 4-7
  const __m256i r_hi = bf16_high_bits(_mm256_mul_ps(_mm256_loadu_ps(kCodebook + 8), a)); // codes 8-11 | 12-15
  // per lane: the 4 low bytes (byte 2 of each dword) into dword 0 / 2, the 4 high bytes into dword 1 / 3
  const __m256i to01 = _mm256_setr_epi8(2, 6, 10, 14, 3, 7, 11, 15, -1, -1, -1, -1, -1, -1, -1, -1, //
                                        2, 6, 10, 14, 3, 7, 11, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i to23 = _mm256_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, 2, 6, 10, 14, 3, 7, 11, 15, //
                                        -1, -1, -1, -1, -1, -1, -1, -1, 2, 6, 10, 14, 3, 7, 11, 15);
  // dwords: low c0-3, high c0-3, low c8-11, high c8-11 | low c4-7, high c4-7, low c12-15, high c12-15
  const __m256i b = _mm256_or_si256(_mm256_shuffle_epi8(r_lo, to01), _mm256_shuffle_epi8(r_hi, to23));
  t_low = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 2, 6, 0, 4, 2, 6));
  t_high = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(1, 5, 3, 7, 1, 5, 3, 7));
}

// MC x rows (permuted by rowdot_prepare_x) against one W row, bf16 values, blocksize >= 64.
template <int MC>
LORA_AVX2 void rowdot_row_bytes(const Nf4Weight& w, int64_t k, int64_t row, const float* x, int64_t ldx, float* out,
                                int64_t ldo) {
  constexpr int U = MC == 1 ? 4 : MC == 2 ? 2 : 1; // independent accumulators per x row
  const int64_t bs = w.blocksize;
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m256i high16 = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const __m256i lift = _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 4, 5, -1, -1, 8, 9, -1, -1, 12, 13, //
                                        -1, -1, 0, 1, -1, -1, 4, 5, -1, -1, 8, 9, -1, -1, 12, 13);
  __m256 acc[MC][U];
  for (int m = 0; m < MC; ++m)
    for (int u = 0; u < U; ++u)
      acc[m][u] = _mm256_setzero_ps();
  const int64_t e0 = row * k; // a block boundary: k % bs == 0
  const int64_t n_blocks = k / bs;
  const uint8_t* codes = w.packed + e0 / 2; // loop-invariant locals: no reloads through w
  float amax[kAbsmaxRun];
  __m256i tables[kAbsmaxRun][2]; // a run of tables built ahead: independent work the core overlaps
  for (int64_t b0 = 0; b0 < n_blocks; b0 += kAbsmaxRun) {
    const int64_t nb = std::min(kAbsmaxRun, n_blocks - b0);
    block_absmax(w, e0 / bs + b0, nb, amax);
    for (int64_t i = 0; i < nb; ++i)
      bf16_byte_tables(amax[i], tables[i][0], tables[i][1]);
    for (int64_t i = 0; i < nb; ++i) {
      const __m256i t_low = tables[i][0], t_high = tables[i][1];
      for (int64_t k0 = (b0 + i) * bs; k0 < (b0 + i + 1) * bs; k0 += kChunk) {
        const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + k0 / 2));
        const __m256i hn = _mm256_and_si256(_mm256_srli_epi16(c, 4), nib); // even columns
        const __m256i ln = _mm256_and_si256(c, nib);                        // odd columns
        const __m256i h_lo = _mm256_shuffle_epi8(t_low, hn), h_hi = _mm256_shuffle_epi8(t_high, hn);
        const __m256i l_lo = _mm256_shuffle_epi8(t_low, ln), l_hi = _mm256_shuffle_epi8(t_high, ln);
        const __m256i v16[4] = {_mm256_unpacklo_epi8(h_lo, h_hi), _mm256_unpackhi_epi8(h_lo, h_hi),
                                _mm256_unpacklo_epi8(l_lo, l_hi), _mm256_unpackhi_epi8(l_lo, l_hi)};
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) {
          const __m256 even = _mm256_castsi256_ps(_mm256_shuffle_epi8(v16[s], lift)); // low word up: a shuffle
                                                                                    // spares the shift port
          const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v16[s], high16));
#pragma GCC unroll 4
          for (int m = 0; m < MC; ++m) {
            const float* xs = x + m * ldx + k0 + s * 16;
            acc[m][(2 * s) % U] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xs), acc[m][(2 * s) % U]);
            acc[m][(2 * s + 1) % U] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xs + 8), acc[m][(2 * s + 1) % U]);
          }
        }
      }
    }
  }
  store_sums<MC, U>(acc, out, ldo);
}

// MC x rows (in order) against one W row, any compute dtype and blocksize.
template <int MC>
LORA_AVX2 void rowdot_row_permute(const Nf4Weight& w, DType t, int64_t k, int64_t row, const float* x, int64_t ldx,
                                  float* out, int64_t ldo) {
  constexpr int U = MC == 1 ? 4 : MC == 2 ? 2 : 1;
  const int64_t bs = w.blocksize; // >= 32, a multiple of 8 * U
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  const __m256i low4 = _mm256_set1_epi32(0xF);
  const __m256 cb_lo = _mm256_loadu_ps(kCodebook);
  const __m256 cb_hi = _mm256_loadu_ps(kCodebook + 8);
  __m256 acc[MC][U];
  for (int m = 0; m < MC; ++m)
    for (int u = 0; u < U; ++u)
      acc[m][u] = _mm256_setzero_ps();
  const int64_t e0 = row * k;
  const int64_t n_blocks = k / bs;
  const uint8_t* row_codes = w.packed + e0 / 2;
  float amax[kAbsmaxRun];
  for (int64_t b = 0; b < n_blocks; ++b) {
    if (b % kAbsmaxRun == 0)
      block_absmax(w, e0 / bs + b, std::min(kAbsmaxRun, n_blocks - b), amax);
    const __m256 a = _mm256_set1_ps(amax[b % kAbsmaxRun]);
    const __m256 t_lo = round_to_compute_avx2(_mm256_mul_ps(cb_lo, a), t);
    const __m256 t_hi = round_to_compute_avx2(_mm256_mul_ps(cb_hi, a), t);
    const uint8_t* codes = row_codes + b * bs / 2;
    const float* xb = x + b * bs;
    for (int64_t j = 0; j < bs; j += 8 * U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        uint32_t c;
        std::memcpy(&c, codes + (j + 8 * u) / 2, 4);
        const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(c)), shifts), low4);
        const __m256 lo = _mm256_permutevar8x32_ps(t_lo, idx);
        const __m256 hi = _mm256_permutevar8x32_ps(t_hi, idx);
        const __m256 wv = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
#pragma GCC unroll 4
        for (int m = 0; m < MC; ++m)
          acc[m][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xb + m * ldx + j + 8 * u), acc[m][u]);
      }
    }
  }
  store_sums<MC, U>(acc, out, ldo);
}

template <int MC>
void rowdot_rows(const Nf4Weight& w, DType t, int64_t k, int64_t o0, int64_t rows, const float* x, float* out,
                 int64_t ldo) {
  if (rowdot_byte_tables(w, t)) {
    for (int64_t j = 0; j < rows; ++j)
      rowdot_row_bytes<MC>(w, k, o0 + j, x, k, out + j, ldo);
  } else {
    for (int64_t j = 0; j < rows; ++j)
      rowdot_row_permute<MC>(w, t, k, o0 + j, x, k, out + j, ldo);
  }
}

void rowdot_avx2(const Nf4Weight& w, DType value_dtype, int64_t k, int64_t o0, int64_t rows, const float* x32,
                 int64_t m, float* out, int64_t ldo) {
  for (int64_t m0 = 0; m0 < m; m0 += kMaxRows) {
    const float* x = x32 + m0 * k;
    float* o = out + m0 * ldo;
    switch (std::min<int64_t>(kMaxRows, m - m0)) {
    case 1: rowdot_rows<1>(w, value_dtype, k, o0, rows, x, o, ldo); break;
    case 2: rowdot_rows<2>(w, value_dtype, k, o0, rows, x, o, ldo); break;
    case 3: rowdot_rows<3>(w, value_dtype, k, o0, rows, x, o, ldo); break;
    default: rowdot_rows<4>(w, value_dtype, k, o0, rows, x, o, ldo); break;
    }
  }
}

} // namespace
#endif

void rowdot_fused(const Nf4Weight& w, DType value_dtype, int64_t k, int64_t o0, int64_t rows, const float* x32,
                  int64_t m, float* out, int64_t ldo) {
#ifdef LORA_OPS_X86
  if (cpu_isa() >= CpuIsa::kAvx512)
    return rowdot_detail::rowdot_avx512(w, value_dtype, k, o0, rows, x32, m, out, ldo);
  if (cpu_isa() == CpuIsa::kAvx2)
    return rowdot_avx2(w, value_dtype, k, o0, rows, x32, m, out, ldo);
#endif
  std::abort(); // choose_matmul_path picks kRowDotFused only with a SIMD level selected
}

} // namespace lora_ops::cpu
