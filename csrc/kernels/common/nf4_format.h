// NF4 double-quantized storage: every fact of ../shared/spec/nf4-format.md that a kernel needs,
// stated once, for both the host compiler and nvcc. Kernels include this; nothing here allocates.
// Python states the same facts in lora_ops/format.py; tests/test_format.py checks that they agree.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace lora_ops {

// ---- Section 1: the NF4 codebook, index = 4-bit code -------------------------------------------
// Hex-float literals are the exact float32 values (decimal in the comment is the shortest repr).
#define LORA_OPS_NF4_C0 (-0x1.000000p+0f)   /* code  0: -1.0                  */
#define LORA_OPS_NF4_C1 (-0x1.647362p-1f)   /* code  1: -0.6961928009986877   */
#define LORA_OPS_NF4_C2 (-0x1.0cd660p-1f)   /* code  2: -0.5250730514526367   */
#define LORA_OPS_NF4_C3 (-0x1.946540p-2f)   /* code  3: -0.39491748809814453  */
#define LORA_OPS_NF4_C4 (-0x1.23449ap-2f)   /* code  4: -0.28444138169288635  */
#define LORA_OPS_NF4_C5 (-0x1.7a6a7ep-3f)   /* code  5: -0.18477343022823334  */
#define LORA_OPS_NF4_C6 (-0x1.74f0e2p-4f)   /* code  6: -0.09105003625154495  */
#define LORA_OPS_NF4_C7 (0.0f)              /* code  7:  0.0 (exact zero)     */
#define LORA_OPS_NF4_C8 (0x1.45f5fep-4f)    /* code  8:  0.07958029955625534  */
#define LORA_OPS_NF4_C9 (0x1.4995c6p-3f)    /* code  9:  0.16093020141124725  */
#define LORA_OPS_NF4_C10 (0x1.f809bap-3f)   /* code 10:  0.24611230194568634  */
#define LORA_OPS_NF4_C11 (0x1.5a0674p-2f)   /* code 11:  0.33791524171829224  */
#define LORA_OPS_NF4_C12 (0x1.c34970p-2f)   /* code 12:  0.44070982933044434  */
#define LORA_OPS_NF4_C13 (0x1.200f56p-1f)   /* code 13:  0.5626170039176941   */
#define LORA_OPS_NF4_C14 (0x1.722766p-1f)   /* code 14:  0.7229568362236023   */
#define LORA_OPS_NF4_C15 (0x1.000000p+0f)   /* code 15:  1.0                  */

// All 16 values in code order, for initializing a table (host array, registers, shared memory).
#define LORA_OPS_NF4_VALUES                                                                        \
  LORA_OPS_NF4_C0, LORA_OPS_NF4_C1, LORA_OPS_NF4_C2, LORA_OPS_NF4_C3, LORA_OPS_NF4_C4,             \
      LORA_OPS_NF4_C5, LORA_OPS_NF4_C6, LORA_OPS_NF4_C7, LORA_OPS_NF4_C8, LORA_OPS_NF4_C9,         \
      LORA_OPS_NF4_C10, LORA_OPS_NF4_C11, LORA_OPS_NF4_C12, LORA_OPS_NF4_C13, LORA_OPS_NF4_C14,    \
      LORA_OPS_NF4_C15

// Code 7 is the exact zero: zero blocks, partial-block padding and the odd last nibble use it.
constexpr uint8_t kNf4ZeroCode = 7;

// ---- Section 2: encoding thresholds --------------------------------------------------------------
// t[i] = (c[i] + c[i+1]) / 2 in float32. A value strictly greater than t[i] moves above code i;
// a value exactly on t[i] keeps the lower code. The static_asserts tie each literal to the codebook,
// so both host compiler and nvcc check them at compile time.
#define LORA_OPS_NF4_T0 (-0x1.b239b0p-1f)
#define LORA_OPS_NF4_T1 (-0x1.38a4e0p-1f)
#define LORA_OPS_NF4_T2 (-0x1.d70900p-2f)
#define LORA_OPS_NF4_T3 (-0x1.5bd4ecp-2f)
#define LORA_OPS_NF4_T4 (-0x1.e079d8p-3f)
#define LORA_OPS_NF4_T5 (-0x1.1a7178p-3f)
#define LORA_OPS_NF4_T6 (-0x1.74f0e2p-5f)
#define LORA_OPS_NF4_T7 (0x1.45f5fep-5f)
#define LORA_OPS_NF4_T8 (0x1.ec90c4p-4f)
#define LORA_OPS_NF4_T9 (0x1.a0cfc0p-3f)
#define LORA_OPS_NF4_T10 (0x1.2b05a8p-2f)
#define LORA_OPS_NF4_T11 (0x1.8ea7f2p-2f)
#define LORA_OPS_NF4_T12 (0x1.00da08p-1f)
#define LORA_OPS_NF4_T13 (0x1.491b5ep-1f)
#define LORA_OPS_NF4_T14 (0x1.b913b4p-1f)

#define LORA_OPS_NF4_CHECK_MID(i, j)                                                               \
  static_assert((LORA_OPS_NF4_C##i + LORA_OPS_NF4_C##j) / 2.0f == LORA_OPS_NF4_T##i,               \
                "NF4 threshold " #i " is not the float32 midpoint of codes " #i " and " #j)
LORA_OPS_NF4_CHECK_MID(0, 1);
LORA_OPS_NF4_CHECK_MID(1, 2);
LORA_OPS_NF4_CHECK_MID(2, 3);
LORA_OPS_NF4_CHECK_MID(3, 4);
LORA_OPS_NF4_CHECK_MID(4, 5);
LORA_OPS_NF4_CHECK_MID(5, 6);
LORA_OPS_NF4_CHECK_MID(6, 7);
LORA_OPS_NF4_CHECK_MID(7, 8);
LORA_OPS_NF4_CHECK_MID(8, 9);
LORA_OPS_NF4_CHECK_MID(9, 10);
LORA_OPS_NF4_CHECK_MID(10, 11);
LORA_OPS_NF4_CHECK_MID(11, 12);
LORA_OPS_NF4_CHECK_MID(12, 13);
LORA_OPS_NF4_CHECK_MID(13, 14);
LORA_OPS_NF4_CHECK_MID(14, 15);
#undef LORA_OPS_NF4_CHECK_MID

// ---- Section 2: normalizing a block -----------------------------------------------------------
// y = x * (1.0f / absmax) with the correctly rounded float32 reciprocal. For a tiny block
// (absmax < 2^-126, subnormal) 1/absmax overflows to inf once absmax <= 2^-128 and every code would be
// garbage. Scaling x and absmax by the same power of two first is exact (no bits are lost scaling
// up), and the reciprocal and product of the scaled values are the exact power-of-two images of the
// unscaled ones, so y is the spec's value computed without exponent limits: normal blocks get the
// same bits as before (pre = 1), tiny blocks get the codes of the same block scaled up.
// Used for the 4-bit blocks (absmax) and the nested 8-bit blocks (absmax2) alike, on every device.
struct Nf4Normalizer {
  float pre;  // 1, or 2^64 for a subnormal absmax
  float rcp;  // 1.0f / (absmax * pre), correctly rounded
};
LORA_HD Nf4Normalizer nf4_normalizer(float absmax) {
  const float pre = absmax < 0x1p-126f ? 0x1p64f : 1.0f;
  return {pre, LORA_FRCP_RN(LORA_FMUL_RN(absmax, pre))};
}
LORA_HD float nf4_normalize(float x, Nf4Normalizer n) { return LORA_FMUL_RN(LORA_FMUL_RN(x, n.pre), n.rcp); }

// Code of one normalized value y = x * (1/absmax): the number of thresholds strictly below y,
// found with four comparisons (a balanced tree over the 15 sorted thresholds).
LORA_HD uint8_t nf4_encode(float y) {
  if (y > LORA_OPS_NF4_T7) {
    if (y > LORA_OPS_NF4_T11) {
      if (y > LORA_OPS_NF4_T13) return y > LORA_OPS_NF4_T14 ? 15 : 14;
      return y > LORA_OPS_NF4_T12 ? 13 : 12;
    }
    if (y > LORA_OPS_NF4_T9) return y > LORA_OPS_NF4_T10 ? 11 : 10;
    return y > LORA_OPS_NF4_T8 ? 9 : 8;
  }
  if (y > LORA_OPS_NF4_T3) {
    if (y > LORA_OPS_NF4_T5) return y > LORA_OPS_NF4_T6 ? 7 : 6;
    return y > LORA_OPS_NF4_T4 ? 5 : 4;
  }
  if (y > LORA_OPS_NF4_T1) return y > LORA_OPS_NF4_T2 ? 3 : 2;
  return y > LORA_OPS_NF4_T0 ? 1 : 0;
}

// ---- Section 3: packing --------------------------------------------------------------------------
// Element 2j (first in memory) goes in the HIGH nibble, element 2j+1 in the low nibble.
LORA_HD uint8_t nf4_pack(uint8_t even_code, uint8_t odd_code) {
  return static_cast<uint8_t>((even_code << 4) | odd_code);
}
LORA_HD uint8_t nf4_high(uint8_t byte) { return byte >> 4; }   // element 2j
LORA_HD uint8_t nf4_low(uint8_t byte) { return byte & 0x0F; }  // element 2j+1

// ---- Section 5: double quantization of absmax ------------------------------------------------------
// The nested (8-bit) blocksize is always 256, whatever the 4-bit blocksize.
constexpr int kNestedBlocksize = 256;
// Index of 0.0 in the 256-entry signed dynamic map (the code of an all-zero nested block).
constexpr uint8_t kDynamicMapZeroCode = 127;

// The 256-entry signed dynamic map (the nested code book), ascending: 0, 1 and +-10^(i-6) * m for the
// midpoints m of linspace(0.1, 1, 2^i + 1), i = 0..6. Kernels never build it (they read the map the
// caller stores with the weight, lora_ops.format.dynamic_map() in Python); host-side checks use this.
// linspace here is the scalar formula (start + step*j below half, end - step*(k-1-j) above), so a few
// entries may differ in the last bit from torch's vectorized linspace: pass one map to both sides.
constexpr int kDynamicMapSize = 256;
inline void nf4_fill_dynamic_map(float* out) {
  float level[7][64];  // level[i][j] = 10^(i-6) * (midpoint j of linspace(0.1, 1, 2^i + 1))
  for (int i = 0; i < 7; ++i) {
    const int k = (1 << i) + 1;
    const float step = (1.0f - 0.1f) / static_cast<float>(k - 1);
    // 10^(i-6) as Python computes it (a double), rounded to float32 as torch multiplies by it.
    const float scale = static_cast<float>(std::pow(10.0, i - 6));
    float prev = 0.1f;
    for (int j = 1; j < k; ++j) {
      const float cur = j < k / 2 ? 0.1f + step * static_cast<float>(j) : 1.0f - step * static_cast<float>(k - 1 - j);
      level[i][j - 1] = scale * ((prev + cur) / 2.0f);
      prev = cur;
    }
  }
  // Levels do not overlap (level i lies in (10^(i-7), 10^(i-6))), so this order is ascending.
  int n = 0;
  for (int i = 6; i >= 0; --i)
    for (int j = (1 << i) - 1; j >= 0; --j) out[n++] = -level[i][j];
  out[n++] = 0.0f;
  for (int i = 0; i < 7; ++i)
    for (int j = 0; j < (1 << i); ++j) out[n++] = level[i][j];
  out[n++] = 1.0f;
}

// absmax[i] = dyn[qabsmax[i]] * absmax2[i / 256] + offset, rounded after the product AND after the
// sum (never one FMA): bitsandbytes dequantizes the nested absmax first and adds offset after.
LORA_HD float nf4_nested_absmax(float dyn_value, float absmax2, float offset) {
  return LORA_FADD_RN(LORA_FMUL_RN(dyn_value, absmax2), offset);
}

// ---- Section 4: decoding ---------------------------------------------------------------------------
// w = T(c[code] * absmax): one float32 product, rounded once to the output type by the caller.
LORA_HD float nf4_decode(float code_value, float absmax) { return LORA_FMUL_RN(code_value, absmax); }

// Supported 4-bit blocksizes (spec section 2).
LORA_HD bool nf4_valid_blocksize(int64_t b) {
  return b == 32 || b == 64 || b == 128 || b == 256 || b == 512 || b == 1024 || b == 2048 || b == 4096;
}

}  // namespace lora_ops
