// Runs the CUDA QLoRA kernels' source that has no inline PTX (decode forward and transposed, the FFMA
// fallback, split-K finishing, lora_down / lora_outer, the dropout mask) under the CPU emulation
// (emu_runtime.h) and compares with the CPU kernels (csrc/kernels/cpu/qlora_cpu.cpp). Both sides
// accumulate in fp32 in different orders, so the comparison allows one rounding of the output dtype
// relative to the largest output. The tensor-core kernel (qlora_mma.cu: mma / ldmatrix / cp.async
// PTX) cannot run here. Prints one line per failure and a summary; exit status 1 on any mismatch.
#include "emu_runtime.h"
// (emu_runtime.h must come first)
#include "cuda/lora_small.cu"
#include "cuda/qlora_decode.cu"
#include "cuda/qlora_ffma.cu"

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "cpu/float_convert.h"
#include "cpu/qlora_cpu.h"

using namespace lora_ops;

namespace {

int g_failures = 0, g_checks = 0;

float read_elem(const std::vector<uint8_t>& buf, DType t, int64_t i) {
  if (t == DType::kFloat32) {
    float v;
    std::memcpy(&v, &buf[i * 4], 4);
    return v;
  }
  uint16_t h;
  std::memcpy(&h, &buf[i * 2], 2);
  return t == DType::kFloat16 ? cpu::fp16_to_float(h) : cpu::bf16_to_float(h);
}

std::vector<uint8_t> random_elems(int64_t n, DType t, std::mt19937& rng, float sd = 1.0f) {
  std::normal_distribution<float> nd(0.0f, sd);
  const int es = dtype_size(t);
  std::vector<uint8_t> buf(n * es + 16);
  for (int64_t i = 0; i < n; ++i) {
    const float v = nd(rng);
    if (t == DType::kFloat32) std::memcpy(&buf[i * 4], &v, 4);
    else {
      const uint16_t h = t == DType::kFloat16 ? cpu::float_to_fp16(v) : cpu::float_to_bf16(v);
      std::memcpy(&buf[i * 2], &h, 2);
    }
  }
  return buf;
}

double rel_tol(DType t) { return t == DType::kFloat32 ? 2e-5 : t == DType::kFloat16 ? 1.0 / 1024 : 1.0 / 128; }

void compare(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want, DType t, int64_t n, const std::string& what) {
  ++g_checks;
  double max_ref = 1.0, max_err = 0.0;
  int64_t worst = -1;
  for (int64_t i = 0; i < n; ++i) max_ref = std::max(max_ref, std::fabs(double(read_elem(want, t, i))));
  for (int64_t i = 0; i < n; ++i) {
    const double g = read_elem(got, t, i), w = read_elem(want, t, i);
    const double e = std::isfinite(g) ? std::fabs(g - w) : 1e30;
    if (e > max_err) max_err = e, worst = i;
  }
  if (max_err <= rel_tol(t) * max_ref) return;
  ++g_failures;
  std::printf("MISMATCH %s: max err %.3e at %lld (got %g want %g), bound %.3e\n", what.c_str(), max_err,
              static_cast<long long>(worst), read_elem(got, t, worst), read_elem(want, t, worst), rel_tol(t) * max_ref);
}

// A random NF4 weight state [n, k]: codes, and plain or nested absmax (the exact map does not matter:
// both sides decode the same state).
struct WeightState {
  std::vector<uint8_t> packed, qabsmax;
  std::vector<float> absmax, absmax2, code;
  float offset = 0.05f;
  Nf4Weight view(int64_t numel, int bs, bool nested) const {
    Nf4Weight w;
    w.packed = packed.data();
    w.numel = numel;
    w.blocksize = bs;
    if (nested) {
      w.qabsmax = qabsmax.data();
      w.absmax2 = absmax2.data();
      w.nested_code = code.data();
      w.offset = &offset;
    } else {
      w.absmax = absmax.data();
    }
    return w;
  }
};

WeightState make_weight(int64_t numel, int bs, std::mt19937& rng) {
  WeightState s;
  const int64_t nb = (numel + bs - 1) / bs;
  s.packed.resize((numel + 1) / 2 + 16);
  for (auto& b : s.packed) b = static_cast<uint8_t>(rng());
  std::uniform_real_distribution<float> u(0.2f, 1.5f);
  s.absmax.resize(nb);
  for (auto& a : s.absmax) a = u(rng);
  s.qabsmax.resize(nb);
  for (auto& q : s.qabsmax) q = static_cast<uint8_t>(rng());
  s.absmax2.resize((nb + 255) / 256);
  for (auto& a : s.absmax2) a = u(rng);
  s.code.resize(256);
  for (int i = 0; i < 256; ++i) s.code[i] = (i - 127.5f) / 128.0f;
  return s;
}

enum class Path { kDecode, kFfma };

void check_matmul(Path path, DType t, int64_t M, int64_t N, int64_t K, bool transpose, int bs, bool nested, int rank,
                  double drop_p, int sms, std::mt19937& rng) {
  const int64_t n_in = transpose ? N : K, n_out = transpose ? K : N;
  const WeightState ws = make_weight(N * K, bs, rng);
  const auto a = random_elems(M * n_in, t, rng);
  const auto s = random_elems(M * std::max(rank, 1), DType::kFloat32, rng);
  const auto lw = random_elems(n_out * std::max(rank, 1), DType::kFloat32, rng);
  const auto bias = random_elems(n_out, t, rng);
  QloraMatmulParams p;
  p.weight = ws.view(N * K, bs, nested);
  p.n = N;
  p.k = K;
  p.transpose_w = transpose;
  p.m = M;
  p.a = a.data();
  p.a_dtype = t;
  p.a_row_stride = n_in;
  p.a_col_stride = 1;
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
    p.dropout.seed = 0x1234567890ull;
    p.dropout.offset = 3;
    p.dropout.cols = K;
  }
  const int es = dtype_size(t);
  std::vector<uint8_t> want(M * n_out * es + 16, 0xEE), got(M * n_out * es + 16, 0xEE);
  p.out = want.data();
  cpu::qlora_matmul(p);
  p.out = got.data();
  lora_emu::g_sms = sms;
  int splits = 1;
  cudaError_t err;
  std::vector<float> work;
  if (path == Path::kDecode) {
    if (!cuda::qlora_decode_supported(p)) {
      ++g_failures;
      std::printf("decode unexpectedly unsupported (M=%lld K=%lld T=%d)\n", (long long)M, (long long)K, transpose);
      return;
    }
    splits = cuda::qlora_decode_splits(p, sms);
    work.assign(cuda::qlora_splitk_workspace_bytes(p, splits) / 4 + 1, 0.0f);
    err = cuda::qlora_decode(p, splits, work.data(), nullptr);
  } else {
    splits = cuda::qlora_ffma_splits(p, sms);
    work.assign(cuda::qlora_splitk_workspace_bytes(p, splits) / 4 + 1, 0.0f);
    err = cuda::qlora_ffma(p, splits, work.data(), nullptr);
  }
  char what[200];
  std::snprintf(what, sizeof what, "%s dtype=%d M=%lld N=%lld K=%lld T=%d bs=%d nested=%d r=%d p=%.2f splits=%d",
                path == Path::kDecode ? "decode" : "ffma", int(t), (long long)M, (long long)N, (long long)K, transpose,
                bs, nested, rank, drop_p, splits);
  if (err != cudaSuccess) {
    ++g_failures;
    std::printf("LAUNCH FAILED %s\n", what);
    return;
  }
  compare(got, want, t, M * n_out, what);
  if (got[M * n_out * es] != 0xEE) {
    ++g_failures;
    std::printf("wrote past the end: %s\n", what);
  }
}

void check_lora(int64_t M, int64_t K, int64_t N, int rank, double drop_p, int sms, std::mt19937& rng) {
  const DType t = DType::kBFloat16;
  const auto x = random_elems(M * K, t, rng);
  const auto A = random_elems(rank * K, DType::kFloat32, rng, 0.1f);
  DropoutParams d;
  if (drop_p > 0) {
    d.threshold = dropout_threshold(drop_p);
    d.keep_scale = static_cast<float>(1.0 / (1.0 - drop_p));
    d.seed = 77;
    d.offset = 1ull << 32;  // counters cross a 2^32 boundary: the hi-key path
    d.cols = K;
  }
  lora_emu::g_sms = sms;
  char what[160];
  // lora_down: s = drop(x)·Aᵀ
  LoraDownParams dp;
  dp.m = M;
  dp.l = K;
  dp.rank = rank;
  dp.a = x.data();
  dp.a_dtype = t;
  dp.a_row_stride = K;
  dp.f = A.data();
  dp.f_dtype = DType::kFloat32;
  dp.f_stride_q = K;
  dp.f_stride_l = 1;
  dp.out_row_stride = rank;
  dp.dropout = d;
  std::vector<uint8_t> s_want(M * rank * 4 + 16), s_got(M * rank * 4 + 16);
  dp.out = s_want.data();
  cpu::lora_down(dp);
  dp.out = s_got.data();
  int splits = cuda::lora_down_splits(dp, sms);
  std::vector<float> work(cuda::lora_down_workspace_bytes(dp, splits) / 4 + 1);
  std::snprintf(what, sizeof what, "lora_down M=%lld K=%lld r=%d p=%.2f splits=%d", (long long)M, (long long)K, rank,
                drop_p, splits);
  if (cuda::lora_down(dp, splits, work.data(), nullptr) != cudaSuccess) ++g_failures, std::printf("LAUNCH FAILED %s\n", what);
  compare(s_got, s_want, DType::kFloat32, M * rank, what);

  // lora_outer: dA = scale·uᵀ·drop(x) (bf16 out), dB = scale·dyᵀ·s (fp32 out)
  const auto u = random_elems(M * rank, DType::kFloat32, rng);
  LoraOuterParams op;
  op.m = M;
  op.p = rank;
  op.q = K;
  op.left = u.data();
  op.left_dtype = DType::kFloat32;
  op.left_row_stride = rank;
  op.right = x.data();
  op.right_dtype = t;
  op.right_row_stride = K;
  op.scale = 0.5f;
  op.dropout = d;
  op.out_dtype = t;
  std::vector<uint8_t> a_want(rank * K * 2 + 16), a_got(rank * K * 2 + 16);
  op.out = a_want.data();
  cpu::lora_outer(op);
  op.out = a_got.data();
  splits = cuda::lora_outer_splits(op, sms);
  work.assign(cuda::lora_outer_workspace_bytes(op, splits) / 4 + 1, 0.0f);
  std::snprintf(what, sizeof what, "lora_outer dA M=%lld K=%lld r=%d p=%.2f splits=%d", (long long)M, (long long)K,
                rank, drop_p, splits);
  if (cuda::lora_outer(op, splits, work.data(), nullptr) != cudaSuccess) ++g_failures, std::printf("LAUNCH FAILED %s\n", what);
  compare(a_got, a_want, t, rank * K, what);

  const auto dy = random_elems(M * N, t, rng);
  LoraOuterParams ob;
  ob.m = M;
  ob.p = N;
  ob.q = rank;
  ob.left = dy.data();
  ob.left_dtype = t;
  ob.left_row_stride = N;
  ob.right = s_want.data();
  ob.right_dtype = DType::kFloat32;
  ob.right_row_stride = rank;
  ob.scale = 0.5f;
  ob.out_dtype = DType::kFloat32;
  std::vector<uint8_t> b_want(N * rank * 4 + 16), b_got(N * rank * 4 + 16);
  ob.out = b_want.data();
  cpu::lora_outer(ob);
  ob.out = b_got.data();
  splits = cuda::lora_outer_splits(ob, sms);
  work.assign(cuda::lora_outer_workspace_bytes(ob, splits) / 4 + 1, 0.0f);
  std::snprintf(what, sizeof what, "lora_outer dB M=%lld N=%lld r=%d splits=%d", (long long)M, (long long)N, rank, splits);
  if (cuda::lora_outer(ob, splits, work.data(), nullptr) != cudaSuccess) ++g_failures, std::printf("LAUNCH FAILED %s\n", what);
  compare(b_got, b_want, DType::kFloat32, N * rank, what);

  // The mask itself, byte for byte.
  DropoutMaskParams mp;
  mp.rows = std::min<int64_t>(M, 5);
  mp.dropout = d;
  mp.dropout.cols = K;
  std::vector<uint8_t> m_want(mp.rows * K), m_got(mp.rows * K, 0xEE);
  mp.out = m_want.data();
  cpu::dropout_mask(mp);
  mp.out = m_got.data();
  ++g_checks;
  if (cuda::lora_dropout_mask(mp, nullptr) != cudaSuccess || m_got != m_want) {
    ++g_failures;
    std::printf("MISMATCH dropout mask rows=%lld cols=%lld p=%.2f\n", (long long)mp.rows, (long long)K, drop_p);
  }
}

}  // namespace

int main() {
  std::mt19937 rng(2024);
  const DType types[] = {DType::kBFloat16, DType::kFloat16, DType::kFloat32};
  for (DType t : types) {
    // Decode forward: M regimes (1 / 4 / 16 instances), N tails, K = 3 chunks (idle lanes) and 33 chunks
    // (a second, partial piece), split-K (sms = 8 -> several splits) and none.
    check_matmul(Path::kDecode, t, 1, 72, 1056, false, 64, true, 4, 0.0, 8, rng);
    check_matmul(Path::kDecode, t, 3, 40, 96, false, 128, false, 4, 0.0, 1, rng);
    check_matmul(Path::kDecode, t, 16, 33, 2048, false, 64, true, 3, 0.0, 4, rng);
    check_matmul(Path::kDecode, t, 7, 64, 1024, false, 32, false, 0, 0.0, 1, rng);
    // Decode transposed (dx): dropout on the LoRA term, N split across CTAs, K tail within 1024 columns.
    check_matmul(Path::kDecode, t, 1, 200, 96, true, 64, true, 4, 0.3, 1, rng);
    check_matmul(Path::kDecode, t, 4, 300, 1088, true, 128, false, 5, 0.3, 8, rng);
    // FFMA fallback: odd K, both orientations, split-K.
    check_matmul(Path::kFfma, t, 5, 70, 77, false, 64, true, 3, 0.0, 1, rng);
    check_matmul(Path::kFfma, t, 3, 40, 1000, true, 64, false, 2, 0.25, 8, rng);
    check_matmul(Path::kFfma, t, 70, 65, 33, false, 32, true, 0, 0.0, 1, rng);
  }
  check_lora(37, 300, 72, 16, 0.3, 1, rng);
  check_lora(700, 96, 40, 8, 0.5, 8, rng);  // split over M in lora_outer
  check_lora(3, 1100, 20, 1, 0.0, 8, rng);  // split over l in lora_down
  std::printf("emu_qlora_check: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
