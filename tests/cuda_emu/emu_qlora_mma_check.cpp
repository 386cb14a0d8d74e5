// Runs the tensor-core QLoRA kernel's source (csrc/kernels/cuda/qlora_mma.cu) under the CPU emulation,
// with host models of its PTX (emu_mma_ptx.h: cp.async, ldmatrix(.trans), mma.m16n8k16 fragment
// layouts), and compares with the CPU kernel: both orientations, fast (cp.async / 16-byte codes) and
// scalar paths, tails in M, N and K, plain and nested absmax, LoRA epilogue with dropout (dx) and bias.
// What it cannot check: the hardware's own reading of the PTX (the models restate the PTX ISA's
// layouts), timing, the asynchronous copy ordering. Exit status 1 on any mismatch.
#define LORA_OPS_CUDA_EMULATION 1
#include "emu_runtime.h"
// (emu_runtime.h must come first)
template <typename K>
cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int) { return cudaSuccess; }
#include "cuda/qlora_mma.cu"

#include <cstdio>
#include <random>
#include <string>

#include "cpu/float_convert.h"
#include "cpu/qlora_cpu.h"

using namespace lora_ops;

namespace {

int g_failures = 0, g_checks = 0;

float read16(const std::vector<uint16_t>& v, DType t, int64_t i) {
  return t == DType::kFloat16 ? cpu::fp16_to_float(v[i]) : cpu::bf16_to_float(v[i]);
}

std::vector<uint16_t> random16(int64_t n, DType t, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<uint16_t> v(n + 16);
  for (int64_t i = 0; i < n + 16; ++i) v[i] = t == DType::kFloat16 ? cpu::float_to_fp16(nd(rng)) : cpu::float_to_bf16(nd(rng));
  return v;
}

void check(DType t, int64_t M, int64_t N, int64_t K, bool transpose, int bs, bool nested, int rank, double drop_p,
           int a_shift, std::mt19937& rng) {
  const int64_t n_in = transpose ? N : K, n_out = transpose ? K : N;
  const int64_t nb = (N * K + bs - 1) / bs;
  std::vector<uint8_t> packed((N * K + 1) / 2 + 16), qabsmax(nb);
  for (auto& b : packed) b = static_cast<uint8_t>(rng());
  for (auto& q : qabsmax) q = static_cast<uint8_t>(rng());
  std::uniform_real_distribution<float> u(0.2f, 1.5f);
  std::vector<float> absmax(nb), absmax2((nb + 255) / 256), code(256);
  for (auto& a : absmax) a = u(rng);
  for (auto& a : absmax2) a = u(rng);
  for (int i = 0; i < 256; ++i) code[i] = (i - 127.5f) / 128.0f;
  const float offset = 0.05f;
  const auto a = random16(M * n_in + a_shift, t, rng);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> s(M * std::max(rank, 1)), lw(n_out * std::max(rank, 1));
  for (auto& v : s) v = nd(rng);
  for (auto& v : lw) v = nd(rng);
  const auto bias = random16(n_out, t, rng);

  QloraMatmulParams p;
  p.weight.packed = packed.data();
  p.weight.numel = N * K;
  p.weight.blocksize = bs;
  if (nested) {
    p.weight.qabsmax = qabsmax.data();
    p.weight.absmax2 = absmax2.data();
    p.weight.nested_code = code.data();
    p.weight.offset = &offset;
  } else {
    p.weight.absmax = absmax.data();
  }
  p.n = N;
  p.k = K;
  p.transpose_w = transpose;
  p.m = M;
  p.a = a.data() + a_shift;  // a_shift = 1: a misaligned view -> scalar path
  p.a_dtype = t;
  p.a_row_stride = n_in;
  p.out_row_stride = n_out;
  p.rank = rank;
  p.lora_s = s.data();
  p.lora_s_row_stride = rank;
  p.lora_w = lw.data();
  p.lora_w_dtype = DType::kFloat32;
  p.lora_w_stride_o = rank;
  p.lora_w_stride_q = 1;
  p.scale = 0.75f;
  p.bias = transpose ? nullptr : bias.data();
  p.bias_dtype = t;
  if (drop_p > 0) {
    p.dropout.threshold = dropout_threshold(drop_p);
    p.dropout.keep_scale = static_cast<float>(1.0 / (1.0 - drop_p));
    p.dropout.seed = 42;
    p.dropout.cols = K;
  }
  std::vector<uint16_t> want(M * n_out + 8, 0xEEEE), got(M * n_out + 8, 0xEEEE);
  p.out = want.data();
  cpu::qlora_matmul(p);
  p.out = got.data();
  char what[200];
  std::snprintf(what, sizeof what, "mma dtype=%d M=%lld N=%lld K=%lld T=%d bs=%d nested=%d r=%d p=%.2f shift=%d", int(t),
                (long long)M, (long long)N, (long long)K, transpose, bs, nested, rank, drop_p, a_shift);
  ++g_checks;
  if (cuda::qlora_mma(p, nullptr) != cudaSuccess) {
    ++g_failures;
    std::printf("LAUNCH FAILED %s\n", what);
    return;
  }
  double max_ref = 1.0, max_err = 0.0;
  int64_t worst = 0;
  for (int64_t i = 0; i < M * n_out; ++i) max_ref = std::max(max_ref, std::fabs(double(read16(want, t, i))));
  for (int64_t i = 0; i < M * n_out; ++i) {
    const double g = read16(got, t, i), w = read16(want, t, i);
    const double e = std::isfinite(g) ? std::fabs(g - w) : 1e30;
    if (e > max_err) max_err = e, worst = i;
  }
  const double tol = (t == DType::kFloat16 ? 1.0 / 1024 : 1.0 / 128) * max_ref;
  if (max_err > tol || got[M * n_out] != 0xEEEE) {
    ++g_failures;
    std::printf("MISMATCH %s: max err %.3e at %lld (got %g want %g), bound %.3e, guard %04x\n", what, max_err,
                (long long)worst, read16(got, t, worst), read16(want, t, worst), tol, got[M * n_out]);
  }
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  for (DType t : {DType::kBFloat16, DType::kFloat16}) {
    for (bool tr : {false, true}) {
      check(t, 70, 72, 128, tr, 64, true, 3, tr ? 0.3 : 0.0, 0, rng);   // fast path, M and N tails, 2 K tiles
      check(t, 5, 40, 224, tr, 128, false, 4, 0.0, 0, rng);             // fast, K % 64 == 32, 4 K tiles (ring wraps)
      check(t, 17, 33, 77, tr, 32, true, 2, tr ? 0.25 : 0.0, 0, rng);  // scalar path: odd K
      check(t, 9, 64, 96, tr, 64, false, 0, 0.0, 1, rng);               // scalar path: misaligned a
    }
  }
  std::printf("emu_qlora_mma_check: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
