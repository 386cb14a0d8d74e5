// AVX-512 block decoders of nf4_dequantize (nf4_cpu.cpp): n elements of one block (its packed codes
// from the block's first byte) with finite absmax amax, into out; the bits of the portable decoder.
// Call only when cpu_isa() >= kAvx512 (AVX-512 F/BW/VL/DQ).
#pragma once
#include <cstdint>

namespace lora_ops::cpu {

void nf4_decode_block_avx512_bf16(const uint8_t* codes, int64_t n, float amax, uint16_t* out);
void nf4_decode_block_avx512_fp16(const uint8_t* codes, int64_t n, float amax, uint16_t* out);
void nf4_decode_block_avx512_fp32(const uint8_t* codes, int64_t n, float amax, float* out);

}  // namespace lora_ops::cpu
