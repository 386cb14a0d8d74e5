// vpermw indices of 16 packed NF4 bytes in element order (AVX-512; shared by the dequantize block
// decoders and the row-dot's W decode): element 2j is the high nibble of byte j, element 2j + 1 the low
// one. Each byte d_j, widened to a dword, becomes (d_j >> 4) | (d_j << 16): two words in element order,
// the first the high nibble, the second the whole byte. vpermw reads index bits 0-4, so a 16-value table
// repeated in words 16-31 looks the second word up by its low nibble (bit 4 does not matter).
#pragma once
#include <cstdint>

#include "cpu/x86_target.h"

namespace lora_ops::cpu {
#ifdef LORA_OPS_X86
LORA_AVX512 inline __m512i nf4_word_indices(const uint8_t* codes) {
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  return _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(d, 16));
}
#endif
}  // namespace lora_ops::cpu
