// CPU NF4 quantize / double-quantize / dequantize. Parallel over quantization blocks: every
// allowed blocksize is even, so a block starts on a byte boundary and threads never share a byte.
#include "cpu/nf4_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/nf4_format.h"
#include "cpu/float_convert.h"
#include "cpu/nf4_dequant_avx512.h"
#include "cpu/x86_target.h"

namespace lora_ops::cpu {
namespace {

constexpr float kNf4Codebook[16] = {LORA_OPS_NF4_VALUES};
bool g_nf4_avx2 = false;
bool g_nf4_avx512 = false;

template <DType T>
int64_t quantize_typed(const Nf4QuantizeParams& p) {
  using S = Storage<T>;
  const auto* in = static_cast<const typename S::type*>(p.input);
  const int64_t bs = p.blocksize;
  const int64_t n_blocks = (p.numel + bs - 1) / bs;
  int64_t nonfinite_blocks = 0;
#pragma omp parallel for schedule(static) reduction(+ : nonfinite_blocks)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t begin = b * bs;
    const int64_t end = std::min(begin + bs, p.numel);
    float amax = 0.0f;
    bool finite = true;
    for (int64_t i = begin; i < end; ++i) {
      const float v = S::load(in[i]);
      finite &= std::isfinite(v);
      amax = std::max(amax, std::fabs(v));
    }
    uint8_t* out = p.packed + begin / 2;
    const int64_t n_bytes = (end - begin + 1) / 2;
    if (!finite) {
      ++nonfinite_blocks;
      p.absmax[b] = NAN;
      std::fill(out, out + n_bytes, nf4_pack(kNf4ZeroCode, kNf4ZeroCode));
      continue;
    }
    p.absmax[b] = amax;
    if (amax == 0.0f) {  // zero block: every element is the exact-zero code
      std::fill(out, out + n_bytes, nf4_pack(kNf4ZeroCode, kNf4ZeroCode));
      continue;
    }
    const Nf4Normalizer r = nf4_normalizer(amax);
    for (int64_t j = 0; j < n_bytes; ++j) {
      const int64_t i = begin + 2 * j;
      const uint8_t hi = nf4_encode(nf4_normalize(S::load(in[i]), r));
      // Odd numel: the missing last element is 0, i.e. the zero code.
      const uint8_t lo = i + 1 < end ? nf4_encode(nf4_normalize(S::load(in[i + 1]), r)) : kNf4ZeroCode;
      out[j] = nf4_pack(hi, lo);
    }
  }
  return nonfinite_blocks;
}

// The 16 possible outputs of one block: each one product rounded once (spec section 4), so a per-block
// table of final values gives identical bits with no per-element math.
template <DType T>
void block_table(float amax, typename Storage<T>::type (&table)[16]) {
  for (int c = 0; c < 16; ++c) table[c] = Storage<T>::store(nf4_decode(kNf4Codebook[c], amax));
}

// Elements [begin, end) of one block through its table into out[0 .. end - begin) (begin is even:
// blocksizes are even). The block decoders below share this contract.
template <DType T>
void decode_block_scalar(const Nf4Weight& w, int64_t begin, int64_t end, const typename Storage<T>::type (&table)[16],
                         typename Storage<T>::type* out) {
  const uint8_t* in = w.packed + begin / 2;
  int64_t i = 0;
  const int64_t n = end - begin;
  for (; i + 1 < n; i += 2) {
    const uint8_t byte = in[i / 2];
    out[i] = table[nf4_high(byte)];
    out[i + 1] = table[nf4_low(byte)];
  }
  if (i < n) out[i] = table[nf4_high(in[i / 2])];
}

#ifdef LORA_OPS_X86
// 8 finite fp32 values rounded to bf16 (nearest even), as 8 x 16 bits.
LORA_AVX2 inline __m128i bf16_bits8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// 16-bit outputs: the block's 16 values split into a low-byte and a high-byte table, and pshufb looks 16
// codes up at once in each (8 packed bytes -> 16 outputs, 32 bytes stored). Element 2j is the high
// nibble of byte j. Finite absmax only (the caller sends other blocks to the scalar table, whose NaN
// conversion the vector rounding does not reproduce).
template <DType T>
LORA_AVX2 void decode_block_avx2_16(const Nf4Weight& w, int64_t begin, int64_t end, float amax, uint16_t* out) {
  const __m256 a = _mm256_set1_ps(amax);
  const __m256 p_lo = _mm256_mul_ps(_mm256_loadu_ps(kNf4Codebook), a);      // exactly nf4_decode
  const __m256 p_hi = _mm256_mul_ps(_mm256_loadu_ps(kNf4Codebook + 8), a);
  __m128i v_lo, v_hi;  // codes 0-7 and 8-15 as 16-bit values
  if constexpr (T == DType::kBFloat16) {
    v_lo = bf16_bits8(p_lo);
    v_hi = bf16_bits8(p_hi);
  } else {
    v_lo = _mm256_cvtps_ph(p_lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v_hi = _mm256_cvtps_ph(p_hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // low bytes of the 16 values, then high bytes
  const __m128i even = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i odd = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i t_lo = _mm_unpacklo_epi64(_mm_shuffle_epi8(v_lo, even), _mm_shuffle_epi8(v_hi, even));
  const __m128i t_hi = _mm_unpacklo_epi64(_mm_shuffle_epi8(v_lo, odd), _mm_shuffle_epi8(v_hi, odd));
  const __m128i nib = _mm_set1_epi8(0x0F);
  const uint8_t* in = w.packed + begin / 2;
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(in + (i - begin) / 2));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(c, 4), nib);
    const __m128i lo = _mm_and_si128(c, nib);
    const __m128i idx = _mm_unpacklo_epi8(hi, lo);  // codes of elements i .. i + 15 in order
    const __m128i bl = _mm_shuffle_epi8(t_lo, idx), bh = _mm_shuffle_epi8(t_hi, idx);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (i - begin)), _mm_unpacklo_epi8(bl, bh));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (i - begin) + 8), _mm_unpackhi_epi8(bl, bh));
  }
  if (i < end) {
    alignas(16) uint16_t table[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(table), v_lo);
    _mm_store_si128(reinterpret_cast<__m128i*>(table + 8), v_hi);
    for (; i < end; ++i) {
      const uint8_t byte = in[(i - begin) / 2];
      out[i - begin] = table[((i - begin) & 1) ? nf4_low(byte) : nf4_high(byte)];
    }
  }
}

// fp32 outputs: vpermps looks codes 0-7 and 8-15 up in two 8-entry tables, bit 3 selects.
LORA_AVX2 void decode_block_avx2_32(const Nf4Weight& w, int64_t begin, int64_t end, float amax, float* out) {
  const __m256 a = _mm256_set1_ps(amax);
  const __m256 t_lo = _mm256_mul_ps(_mm256_loadu_ps(kNf4Codebook), a);
  const __m256 t_hi = _mm256_mul_ps(_mm256_loadu_ps(kNf4Codebook + 8), a);
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  const __m256i low4 = _mm256_set1_epi32(0xF);
  const uint8_t* in = w.packed + begin / 2;
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    uint32_t u;
    std::memcpy(&u, in + (i - begin) / 2, 4);
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(u)), shifts), low4);
    const __m256 lo = _mm256_permutevar8x32_ps(t_lo, idx), hi = _mm256_permutevar8x32_ps(t_hi, idx);
    _mm256_storeu_ps(out + (i - begin), _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))));
  }
  for (; i < end; ++i) {
    const uint8_t byte = in[(i - begin) / 2];
    out[i - begin] = nf4_decode(kNf4Codebook[((i - begin) & 1) ? nf4_low(byte) : nf4_high(byte)], amax);
  }
}
#endif

#ifdef LORA_OPS_X86
// The AVX-512 block decoder of output type T (nf4_dequant_avx512.h).
template <DType T>
void decode_block_avx512(const uint8_t* codes, int64_t n, float amax, typename Storage<T>::type* out) {
  if constexpr (T == DType::kFloat32)
    nf4_decode_block_avx512_fp32(codes, n, amax, out);
  else if constexpr (T == DType::kBFloat16)
    nf4_decode_block_avx512_bf16(codes, n, amax, out);
  else
    nf4_decode_block_avx512_fp16(codes, n, amax, out);
}
#endif

template <DType T>
void dequantize_typed(const Nf4DequantizeParams& p) {
  using S = Storage<T>;
  auto* out = static_cast<typename S::type*>(p.out);
  const Nf4Weight& w = p.weight;
  const int64_t bs = w.blocksize;
  const int64_t n_blocks = w.n_blocks();
  const bool avx2 = g_nf4_avx2, avx512 = g_nf4_avx512;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const float amax = nf4_block_absmax(w, b);
    const int64_t begin = b * bs;
    const int64_t end = std::min(begin + bs, w.numel);
#ifdef LORA_OPS_X86
    if (avx512 && std::isfinite(amax)) {
      decode_block_avx512<T>(w.packed + begin / 2, end - begin, amax, out + begin);
      continue;
    }
    if (avx2 && std::isfinite(amax)) {
      if constexpr (T == DType::kFloat32)
        decode_block_avx2_32(w, begin, end, amax, out + begin);
      else
        decode_block_avx2_16<T>(w, begin, end, amax, out + begin);
      continue;
    }
#endif
    typename S::type table[16];
    block_table<T>(amax, table);
    decode_block_scalar<T>(w, begin, end, table, out + begin);
  }
}

// Elements [e0, e1) of the flattened W (e0 even) into out, block by block.
template <DType T>
void decode_run(const Nf4Weight& w, int64_t e0, int64_t e1, typename Storage<T>::type* out) {
  const int64_t bs = w.blocksize;
  for (int64_t b = e0 / bs; b * bs < e1; ++b) {
    const int64_t begin = std::max(b * bs, e0), end = std::min((b + 1) * bs, e1);
    const float amax = nf4_block_absmax(w, b);
#ifdef LORA_OPS_X86
    if (g_nf4_avx512 && std::isfinite(amax)) {
      decode_block_avx512<T>(w.packed + begin / 2, end - begin, amax, out + (begin - e0));
      continue;
    }
    if (g_nf4_avx2 && std::isfinite(amax)) {
      decode_block_avx2_16<T>(w, begin, end, amax, out + (begin - e0));
      continue;
    }
#endif
    typename Storage<T>::type table[16];
    block_table<T>(amax, table);
    decode_block_scalar<T>(w, begin, end, table, out + (begin - e0));
  }
}

}  // namespace

void set_nf4_isa(CpuIsa isa) {
  g_nf4_avx2 = isa >= CpuIsa::kAvx2;
  g_nf4_avx512 = isa >= CpuIsa::kAvx512; // F/BW only: no BF16 instruction
}

float nf4_block_absmax(const Nf4Weight& w, int64_t block) {
  if (!w.nested()) return w.absmax[block];
  return nf4_nested_absmax(w.nested_code[w.qabsmax[block]], w.absmax2[block / kNestedBlocksize], *w.offset);
}

int64_t nf4_quantize(const Nf4QuantizeParams& p) {
  switch (p.input_dtype) {
    case DType::kFloat16:
      return quantize_typed<DType::kFloat16>(p);
    case DType::kBFloat16:
      return quantize_typed<DType::kBFloat16>(p);
    default:
      return quantize_typed<DType::kFloat32>(p);
  }
}

void nf4_prefetch_run(const Nf4Weight& w, int64_t e0, int64_t e1) {
  constexpr int64_t kLine = 64;
  const uint8_t* first = w.packed + e0 / 2;
  for (const uint8_t* a = first; a < w.packed + (e1 + 1) / 2; a += kLine)
    __builtin_prefetch(a);
  const int64_t b = e0 / w.blocksize; // the run's first scale (a few blocks share a line)
  if (w.nested())
    __builtin_prefetch(w.qabsmax + b);
  else
    __builtin_prefetch(w.absmax + b);
}

void nf4_decode_window_16bit(const Nf4Weight& w, DType t, int64_t row_len, int64_t r0, int64_t r1, int64_t c0,
                             int64_t c1, uint16_t* dst, int64_t ld) {
#pragma omp parallel for schedule(static)
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t e0 = r * row_len + c0;
    if (r + kWindowPrefetchRows < r1)
      nf4_prefetch_run(w, e0 + kWindowPrefetchRows * row_len, e0 + kWindowPrefetchRows * row_len + (c1 - c0));
    if (t == DType::kBFloat16)
      decode_run<DType::kBFloat16>(w, e0, e0 + (c1 - c0), dst + (r - r0) * ld);
    else
      decode_run<DType::kFloat16>(w, e0, e0 + (c1 - c0), dst + (r - r0) * ld);
  }
}

void nf4_dequantize(const Nf4DequantizeParams& p) {
  switch (p.out_dtype) {
    case DType::kFloat16:
      return dequantize_typed<DType::kFloat16>(p);
    case DType::kBFloat16:
      return dequantize_typed<DType::kBFloat16>(p);
    default:
      return dequantize_typed<DType::kFloat32>(p);
  }
}

void nf4_double_quantize(const Nf4DoubleQuantParams& p) {
  // Nearest map entry with ties to the lower index == number of midpoints strictly below v.
  // Midpoints of adjacent float32 map values are exact in double, so this IS exact nearest search.
  double mid[255];
  for (int i = 0; i < 255; ++i) mid[i] = (static_cast<double>(p.nested_code[i]) + p.nested_code[i + 1]) / 2.0;
  const float offset = *p.offset;
  const int64_t n_groups = (p.n_blocks + kNestedBlocksize - 1) / kNestedBlocksize;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t begin = g * kNestedBlocksize;
    const int64_t end = std::min(begin + kNestedBlocksize, p.n_blocks);
    float amax2 = 0.0f;
    for (int64_t i = begin; i < end; ++i) amax2 = std::max(amax2, std::fabs(LORA_FSUB_RN(p.absmax[i], offset)));
    p.absmax2[g] = amax2;
    const Nf4Normalizer r = nf4_normalizer(amax2);
    for (int64_t i = begin; i < end; ++i) {
      if (amax2 == 0.0f) {
        p.qabsmax[i] = kDynamicMapZeroCode;
        continue;
      }
      const double v = nf4_normalize(LORA_FSUB_RN(p.absmax[i], offset), r);
      p.qabsmax[i] = static_cast<uint8_t>(std::lower_bound(mid, mid + 255, v) - mid);
    }
  }
}

}  // namespace lora_ops::cpu
