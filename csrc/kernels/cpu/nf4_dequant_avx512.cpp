// AVX-512 block decoders of nf4_dequantize (nf4_cpu.cpp), for cpu_isa() >= kAvx512 (AVX-512 F/BW/VL/DQ).
//
// 16-bit outputs: per 16 packed bytes (32 outputs) one vpermw of indices built in output order
// (nf4_avx512_indices.h) in the block's 16 output values, repeated in words 16-31. fp32 outputs build
// the same indices with qwords (vpmovzxbq, 8 bytes -> 16 dwords) for vpermps (index bits 0-3).
//
// The 16 values are the nf4_decode products rounded once to the output dtype with the scalar rule's
// result (bf16: nearest even on the fp32 bits, subnormals kept; fp16: vcvtps2ph, nearest even): the
// output bits equal the portable decoder's. Finite absmax only (the caller routes the rest).
#include "cpu/nf4_dequant_avx512.h"

#include "common/nf4_format.h"
#include "cpu/float_convert.h"
#include "cpu/nf4_avx512_indices.h"
#include "cpu/x86_target.h"

// gcc 12's AVX-512 headers start some intrinsics from an "undefined" register and then warn that it
// may be used uninitialized (a false positive of the headers).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace lora_ops::cpu {
#ifdef LORA_OPS_X86
namespace {

constexpr float kCodebook[16] = {LORA_OPS_NF4_VALUES};

// The 16 exact products code · amax (nf4_decode), one per dword.
LORA_AVX512 inline __m512 products(float amax) {
  return _mm512_mul_ps(_mm512_loadu_ps(kCodebook), _mm512_set1_ps(amax));
}

// The block's 16 output values as words 0-15, repeated in words 16-31.
template <DType T> LORA_AVX512 inline __m512i word_table(float amax) {
  const __m512 v = products(amax);
  __m256i words; // the 16 values as 16 words
  if constexpr (T == DType::kFloat16) {
    words = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else { // bf16: round the fp32 bits to nearest even (finite values), keep the high half
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    words = _mm512_cvtepi32_epi16(
        _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16));
  }
  return _mm512_broadcast_i64x4(words);
}

template <DType T>
LORA_AVX512 void decode_16bit(const uint8_t* codes, int64_t n, float amax, uint16_t* out) {
  const __m512i table = word_table<T>(amax);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    _mm512_storeu_si512(out + i, _mm512_permutexvar_epi16(nf4_word_indices(codes + i / 2), table));
  if (i < n) { // a short block: the same table through a store buffer
    alignas(64) uint16_t t[32];
    _mm512_store_si512(t, table);
    for (; i < n; ++i) {
      const uint8_t byte = codes[i / 2];
      out[i] = t[(i & 1) ? nf4_low(byte) : nf4_high(byte)];
    }
  }
}

} // namespace

LORA_AVX512 void nf4_decode_block_avx512_bf16(const uint8_t* codes, int64_t n, float amax, uint16_t* out) {
  decode_16bit<DType::kBFloat16>(codes, n, amax, out);
}

LORA_AVX512 void nf4_decode_block_avx512_fp16(const uint8_t* codes, int64_t n, float amax, uint16_t* out) {
  decode_16bit<DType::kFloat16>(codes, n, amax, out);
}

LORA_AVX512 void nf4_decode_block_avx512_fp32(const uint8_t* codes, int64_t n, float amax, float* out) {
  const __m512 table = products(amax);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i q = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i / 2)));
    const __m512i idx = _mm512_or_si512(_mm512_srli_epi64(q, 4), _mm512_slli_epi64(q, 32));
    _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(idx, table));
  }
  for (; i < n; ++i) {
    const uint8_t byte = codes[i / 2];
    out[i] = nf4_decode(kCodebook[(i & 1) ? nf4_low(byte) : nf4_high(byte)], amax);
  }
}
#endif
} // namespace lora_ops::cpu
