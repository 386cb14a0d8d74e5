// Single-thread timing of the fused row-dot kernel alone (csrc/kernels/cpu/nf4_rowdot.cpp), no torch:
// W 4096 x 4096 (N from $N), blocksize 64 (or $BS), random codes, nested absmax when $NESTED is set, x
// rounded to bf16 for DTYPE 0 (as the op passes it). Build and run:
//   g++ -O3 -ffp-contract=off -std=c++17 -Icsrc -Icsrc/kernels bench/cpu_kernels/rowdot_kernel.cpp \
//       csrc/kernels/cpu/*.cpp -fopenmp -o /tmp/rowdot_kernel
//   NESTED=1 /tmp/rowdot_kernel M DTYPE      (DTYPE 0 bf16, 1 fp16, 2 fp32; prints the best of 20)
// The kernel of the CPU's highest SIMD level runs; NO_AVX512=1 caps it at AVX2.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/nf4_cpu.h"
#include "cpu/nf4_rowdot.h"
#include "cpu/qlora_cpu.h"

using namespace lora_ops;

int main(int argc, char** argv) {
  const int64_t n = getenv("N") ? atoll(getenv("N")) : 4096, k = 4096, m = argc > 1 ? atoll(argv[1]) : 1;
  const int dt = argc > 2 ? atoi(argv[2]) : 0;
  const int64_t bs = getenv("BS") ? atoll(getenv("BS")) : 64;
  const DType t = dt == 0 ? DType::kBFloat16 : dt == 1 ? DType::kFloat16 : DType::kFloat32;
  std::mt19937 rng(1);
  std::vector<uint8_t> packed(n * k / 2), qabsmax(n * k / bs);
  for (auto& b : packed) b = static_cast<uint8_t>(rng());
  for (auto& b : qabsmax) b = static_cast<uint8_t>(rng());
  std::vector<float> absmax(n * k / bs), code(256), absmax2(n * k / bs / 256 + 1, 0.7f), x(m * k), out(m * n);
  for (auto& a : absmax) a = 0.5f + static_cast<float>(rng() % 1000) / 1000.0f;
  for (int i = 0; i < 256; ++i) code[i] = static_cast<float>(i - 128) / 128.0f;
  for (auto& v : x) {
    v = static_cast<float>(rng() % 2000) / 1000.0f - 1.0f;
    if (dt == 0) { // a bf16 value, as the op's x32 holds for bf16 activations
      uint32_t u;
      std::memcpy(&u, &v, 4);
      u &= 0xffff0000u;
      std::memcpy(&v, &u, 4);
    }
  }
  const float offset = 0.9f;
  Nf4Weight w;
  w.packed = packed.data();
  w.numel = n * k;
  w.blocksize = bs;
  if (getenv("NESTED")) {
    w.qabsmax = qabsmax.data();
    w.absmax2 = absmax2.data();
    w.nested_code = code.data();
    w.offset = &offset;
  } else {
    w.absmax = absmax.data();
  }
  cpu::select_cpu_kernels(getenv("NO_AVX512")        ? cpu::CpuIsa::kAvx2
                          : getenv("NO_AVX512_BF16") ? cpu::CpuIsa::kAvx512
                                                     : cpu::CpuIsa::kAvx512Bf16);
  if (cpu::cpu_isa() == cpu::CpuIsa::kPortable) {
    std::printf("no AVX2+FMA+F16C on this CPU: the fused row-dot does not run\n");
    return 1;
  }
  cpu::rowdot_prepare_x(w, t, m, k, x.data());
  double best = 1e30;
  for (int rep = 0; rep < 20; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    cpu::rowdot_fused(w, t, k, 0, n, x.data(), m, out.data(), n);
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  double sum = 0;
  for (float v : out) sum += v;
  std::printf("%s M=%lld dtype=%d N=%lld K=%lld: best %.3f ms (1 thread), checksum %g\n",
              cpu::cpu_isa_name(cpu::cpu_isa()), static_cast<long long>(m), dt,
              static_cast<long long>(n), static_cast<long long>(k), best, sum);
}
