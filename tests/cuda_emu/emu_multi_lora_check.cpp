// The per-row multi-adapter LoRA CUDA kernels (csrc/kernels/cuda/multi_lora.cu, rewritten by build_emu.py and
// included below) run on the CPU under emu_fiber_runtime.h, against a float64 reference computed here:
// random pools (ranks 1..256 mixed with empty slots), rows naming -1 or an empty slot, odd N and K, every
// x dtype, adapters in fp32 or x's dtype, strided x, output rows with padding. Checks, per element:
//   rows with an adapter: |ours - ref| <= eps(dtype)·|ref| + 2^-20·(|base| + Σ |LoRA products|)  (one
//     rounding of fp32 sums);
//   rows without one, and the padding between output rows: bit for bit what was there before.
// Prints "N checks, 0 failures" (tests/test_multi_lora_cuda_emulated.py parses it).
#include "emu_fiber_runtime.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/float_convert.h"
#include "cuda/multi_lora.cu"

using namespace lora_ops;

namespace {

std::mt19937_64 g_rng;
int g_checks = 0, g_failures = 0;

double eps_of(DType t) {
  return std::ldexp(1.0, t == DType::kFloat32 ? -24 : t == DType::kFloat16 ? -11 : -8);
}

// A buffer of n elements of dtype t, filled from N(0, sd) (already rounded to t), readable as double.
struct Buf {
  DType t;
  std::vector<uint8_t> bytes;
  Buf(DType t_, int64_t n) : t(t_), bytes(static_cast<size_t>(n) * dtype_size(t_)) {}
  void set(int64_t i, double v) {
    const float f = static_cast<float>(v);
    if (t == DType::kFloat32) reinterpret_cast<float*>(bytes.data())[i] = f;
    else if (t == DType::kFloat16) reinterpret_cast<uint16_t*>(bytes.data())[i] = cpu::float_to_fp16(f);
    else reinterpret_cast<uint16_t*>(bytes.data())[i] = cpu::float_to_bf16(f);
  }
  double get(int64_t i) const {
    if (t == DType::kFloat32) return reinterpret_cast<const float*>(bytes.data())[i];
    if (t == DType::kFloat16) return cpu::fp16_to_float(reinterpret_cast<const uint16_t*>(bytes.data())[i]);
    return cpu::bf16_to_float(reinterpret_cast<const uint16_t*>(bytes.data())[i]);
  }
  void fill(double sd) {
    std::normal_distribution<double> nd(0.0, sd);
    for (int64_t i = 0; i < static_cast<int64_t>(bytes.size()) / dtype_size(t); ++i) set(i, nd(g_rng));
  }
};

void fail(const char* what, int64_t m, int64_t n, double ours, double ref) {
  if (++g_failures <= 10)
    std::printf("FAIL %s at row %lld col %lld: %.9g vs %.9g\n", what, (long long)m, (long long)n, ours, ref);
}

void run_case(int64_t M, int64_t N, int64_t K, int64_t C, int r_max, DType xt, DType at, bool strided_x) {
  std::uniform_int_distribution<int> rank_d(0, r_max);
  std::vector<int32_t> ranks(C);
  for (auto& r : ranks) r = rank_d(g_rng) % 4 == 0 ? 0 : std::max(1, rank_d(g_rng));
  ranks[0] = r_max; // the largest rank always present
  std::vector<float> scales(C);
  for (auto& s : scales) s = std::uniform_real_distribution<float>(0.25f, 2.0f)(g_rng);
  std::vector<int64_t> ids(M);
  for (auto& c : ids) c = std::uniform_int_distribution<int64_t>(-1, C - 1)(g_rng);
  const int64_t xcs = strided_x ? 2 : 1, xrs = K * xcs + 3, ors = N + 5;
  Buf x(xt, M * xrs), A(at, C * r_max * K), Bt(at, C * r_max * N), out(xt, M * ors);
  x.fill(1.0);
  A.fill(1.0 / std::sqrt(static_cast<double>(K)));
  Bt.fill(1.0);
  out.fill(2.0); // the base term (and the padding canaries)
  const Buf before = out;

  MultiLoraParams p;
  p.m = M; p.n = N; p.k = K; p.slots = C; p.r_max = r_max;
  p.x = x.bytes.data(); p.x_dtype = xt; p.x_row_stride = xrs; p.x_col_stride = xcs;
  p.out = out.bytes.data(); p.out_row_stride = ors;
  p.a_pool = A.bytes.data(); p.a_dtype = at; p.bt_pool = Bt.bytes.data(); p.b_dtype = at;
  p.scales = scales.data(); p.ranks = ranks.data(); p.ids = ids.data();
  std::vector<float> ws(cuda::multi_lora_workspace_bytes(p) / sizeof(float) + 1, std::nanf(""));
  if (cuda::multi_lora_add(p, ws.data(), nullptr) != cudaSuccess) {
    fail("launch", -1, -1, 0, 0);
    return;
  }
  for (int64_t m = 0; m < M; ++m) {
    const int64_t c = ids[m];
    const bool lora = c >= 0 && ranks[c] > 0;
    std::vector<double> s(lora ? ranks[c] : 0), s_abs(s.size());
    for (size_t q = 0; q < s.size(); ++q) {
      double acc = 0, acc_abs = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double v = x.get(m * xrs + k * xcs) * A.get((c * r_max + static_cast<int64_t>(q)) * K + k);
        acc += v;
        acc_abs += std::fabs(v);
      }
      s[q] = scales[c] * acc;
      s_abs[q] = scales[c] * acc_abs;
    }
    for (int64_t n = 0; n < ors; ++n) {
      const int64_t o = m * ors + n;
      ++g_checks;
      if (!lora || n >= N) {
        if (std::memcmp(&out.bytes[o * dtype_size(xt)], &before.bytes[o * dtype_size(xt)], dtype_size(xt)) != 0)
          fail(n >= N ? "padding written" : "base-only row changed", m, n, out.get(o), before.get(o));
        continue;
      }
      double ref = before.get(o), mag = std::fabs(ref);
      for (size_t q = 0; q < s.size(); ++q) {
        const double b = Bt.get((c * r_max + static_cast<int64_t>(q)) * N + n);
        ref += s[q] * b;
        mag += s_abs[q] * std::fabs(b);
      }
      const double tol = eps_of(xt) * std::fabs(ref) + std::ldexp(mag, -20);
      if (!(std::fabs(out.get(o) - ref) <= tol)) fail("value", m, n, out.get(o), ref);
    }
  }
}

} // namespace

int main(int argc, char** argv) {
  g_rng.seed(argc > 1 ? std::atoi(argv[1]) : 1234);
  if (argc > 2) lora_emu::g_policy = std::atoi(argv[2]);
  const DType dts[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  std::uniform_int_distribution<int64_t> odd(3, 200);
  for (DType xt : dts) {
    for (bool adapters_fp32 : {true, false}) {
      run_case(5, 2 * odd(g_rng) + 1, 2 * odd(g_rng) + 1, 6, 17, xt, adapters_fp32 ? DType::kFloat32 : xt, false);
      run_case(3, 2 * odd(g_rng) + 1, 2 * odd(g_rng) + 1, 4, 256, xt, adapters_fp32 ? DType::kFloat32 : xt, true);
      run_case(9, 257, 64, 3, 1, xt, adapters_fp32 ? DType::kFloat32 : xt, false);
    }
  }
  std::printf("emulated CUDA multi-LoRA kernels (schedule %d) vs float64: %d checks, %d failures\n", lora_emu::g_policy,
              g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
