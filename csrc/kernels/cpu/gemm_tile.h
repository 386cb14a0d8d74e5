// The register tile of the CPU GEMM path (kGemm, qlora_gemm_cpu.cpp): C[mr x 16] (+)= x[mr x kb] ·
// P[kb x 16] with P a micro-panel of 16 weight columns, at the SIMD level in use: 6x16 with AVX2 (and
// portable), 12x16 with AVX-512 (gemm_ukernel_avx512.h). Every level gives the same bits.
#pragma once
#include <cstdint>

namespace lora_ops::cpu {

constexpr int kMR = 6;  // micro-kernel rows (x rows per register tile) of the AVX2 / portable tile
constexpr int kNR = 16; // micro-kernel columns (two ymm vectors)

// Rows per register tile at the SIMD level in use (ukernel_rows takes up to this many).
int64_t tile_rows();

// mr in 1..tile_rows(). The kb products are summed from 0 and then added to C (accumulate) or stored.
void ukernel_rows(int mr, const float* x, int64_t ldx, const float* pw, int64_t kb, float* c, int64_t ldc,
                  bool accumulate);

} // namespace lora_ops::cpu
