// The AVX-512 register tile of the CPU GEMM (qlora_cpu.cpp, kGemm path): C[mr x 16] (+)= x[mr x kb] ·
// P[kb x 16] with P a micro-panel of 16 columns (one zmm per k). Call only when cpu_isa() >= kAvx512
// (AVX-512 F/BW/VL/DQ).
#pragma once
#include <cstdint>

namespace lora_ops::cpu {

constexpr int kMrAvx512 = 12; // rows per tile: 12 accumulators cover the FMA latency of two 512-bit ports

// mr in 1..kMrAvx512. The tile sums its kb products from 0; accumulate: C += that sum (else C = it), so a
// long reduction is summed in blocks (kb <= 256 at a time, then one add per block: the error of a
// blocked sum, not of one 4096-long chain). Per element the fused multiply-adds of the AVX2 6x16 tile in
// the same order: the same bits.
void ukernel_avx512(int mr, const float* x, int64_t ldx, const float* pw, int64_t kb, float* c, int64_t ldc,
                    bool accumulate);

}  // namespace lora_ops::cpu
