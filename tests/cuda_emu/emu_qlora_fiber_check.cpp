// Runs the fused QLoRA CUDA kernels' SOURCE (decode, transposed decode, FFMA fallback + split-K
// finish, tensor-core mma.sync kernel, lora_down, lora_outer, dropout mask) under the fiber emulation
// of emu_fiber_runtime.h and compares them with the CPU kernels (csrc/kernels/cpu/qlora_cpu.cpp) and
// a float64 reference computed here from the dequantized weight (architecture.md section 4):
//   - max |gpu - ref| <= 2 * max |cpu - ref| + atol,  atol = 2 u(out dtype) * max |ref| + 1e-6 * mean |ref|
//   - mean |gpu - ref| <= 2 * mean |cpu - ref| + u(out dtype) * mean |ref|
//   - EXACT: dropout masks (bytes), weight values (one-hot activations make out = the dequantized
//     weight, which must equal the CPU kernel's output and nf4_dequantize bit for bit), and bytes
//     outside the output rows stay untouched (poison 0xFF).
// Usage: emu_qlora_fiber_check [group] [seed]
//   group = all | decode | decode_t | ffma | long | mma | tc_decode | window | dispatch | lora | mask | edge
// Prints one line per failure and a summary; exit status 1 on any failure.
#include "emu_fiber_runtime.h"
// (the runtime must come first)
#include <memory>
#include <string>

#include "cpu/float_convert.h"
#include "cpu/nf4_cpu.h"
#include "cpu/lora_factors_cpu.h"
#include "cpu/qlora_cpu.h"
#include "cuda/qlora_cuda.h"
#include "cuda/qlora_cuda_path.h"
#include "emu_nested_state.h"

using namespace lora_ops;

namespace {

int g_failures = 0, g_checks = 0;
std::mt19937 g_rng(1234);

const char* dname(DType t) {
  return t == DType::kFloat32 ? "f32" : t == DType::kFloat16 ? "f16" : t == DType::kBFloat16 ? "bf16" : "f64";
}
double unit_roundoff(DType t) {
  return t == DType::kFloat32 ? std::ldexp(1.0, -24) : t == DType::kFloat16 ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
}

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define EMU_ASAN 1
#else
#define ASAN_POISON_MEMORY_REGION(a, n) ((void)(a), (void)(n))
#define ASAN_UNPOISON_MEMORY_REGION(a, n) ((void)(a), (void)(n))
#endif

// A device buffer (host memory here): 16-byte aligned base plus `shift` bytes, guard bytes after.
// Under AddressSanitizer (build_emu.py OUT -fsanitize=address) the bytes around [ptr, ptr + n) are
// poisoned, so a kernel reading or writing past an operand aborts with a report.
struct Buf {
  std::vector<uint8_t> store;
  uint8_t* ptr = nullptr;
  size_t bytes = 0;
  Buf(size_t n, size_t shift = 0, uint8_t fill = 0xFF) : store(n + shift + 64, fill), bytes(n) {
    ptr = store.data() + ((16 - reinterpret_cast<uintptr_t>(store.data()) % 16) % 16) + shift;
    ASAN_POISON_MEMORY_REGION(store.data(), ptr - store.data());
    ASAN_POISON_MEMORY_REGION(ptr + n, store.data() + store.size() - (ptr + n));
  }
  Buf(Buf&& o) noexcept : store(std::move(o.store)), ptr(o.ptr), bytes(o.bytes) {}
  Buf& operator=(Buf&& o) noexcept {
    ASAN_UNPOISON_MEMORY_REGION(store.data(), store.size());
    store = std::move(o.store);
    ptr = o.ptr;
    bytes = o.bytes;
    return *this;
  }
  ~Buf() { ASAN_UNPOISON_MEMORY_REGION(store.data(), store.size()); }
  // True when the 64 bytes after the buffer still hold `fill` (under ASan a write there aborts).
  bool guard_intact(uint8_t fill = 0xFF) const {
#ifdef EMU_ASAN
    (void)fill;
    return true;
#else
    for (int b = 0; b < 64; ++b)
      if (ptr[bytes + b] != fill) return false;
    return true;
#endif
  }
};

double load(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat16: return cpu::fp16_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::kBFloat16: return cpu::bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
void store(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kFloat16: static_cast<uint16_t*>(p)[i] = cpu::float_to_fp16(v); break;
    case DType::kBFloat16: static_cast<uint16_t*>(p)[i] = cpu::float_to_bf16(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// Strided [rows, cols] matrix of random values in dtype t; returns the buffer (elements at
// r * row_stride + c * col_stride from ptr).
Buf random_matrix(int64_t rows, int64_t cols, DType t, int64_t row_stride, int64_t col_stride, size_t shift_elems,
                  float sd) {
  const int es = dtype_size(t);
  const int64_t span = rows == 0 ? 0 : (rows - 1) * row_stride + (cols - 1) * col_stride + 1;
  Buf b(static_cast<size_t>(span) * es, shift_elems * es, 0);
  std::normal_distribution<float> nd(0.0f, sd);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) store(b.ptr, t, r * row_stride + c * col_stride, nd(g_rng));
  return b;
}

// ---- the quantized weight ---------------------------------------------------------------------------
struct Weight {
  int64_t n, k;
  int bs;
  bool nested;
  Buf packed{0};
  std::vector<float> absmax, absmax2;
  std::vector<uint8_t> qabsmax;
  std::unique_ptr<lora_emu::NestedState> nested_state;  // map and offset (nested only)
  Nf4Weight view;
  Weight(int64_t n_, int64_t k_, int bs_, bool nested_, size_t packed_shift) : n(n_), k(k_), bs(bs_), nested(nested_) {
    const int64_t numel = n * k, nb = (numel + bs - 1) / bs, nbytes = (numel + 1) / 2;
    std::vector<float> w(numel);
    std::normal_distribution<float> nd(0.0f, 0.05f);
    for (auto& v : w) v = nd(g_rng);
    packed = Buf(nbytes, packed_shift, 0);
    absmax.resize(nb);
    Nf4QuantizeParams q;
    q.input = w.data();
    q.input_dtype = DType::kFloat32;
    q.numel = numel;
    q.blocksize = bs;
    q.packed = packed.ptr;
    q.absmax = absmax.data();
    cpu::nf4_quantize(q);
    view.packed = packed.ptr;
    view.numel = numel;
    view.blocksize = bs;
    if (!nested) {
      view.absmax = absmax.data();
      return;
    }
    nested_state = std::make_unique<lora_emu::NestedState>(absmax);
    qabsmax.resize(nb);
    absmax2.resize((nb + 255) / 256);
    const Nf4DoubleQuantParams d = nested_state->params(absmax, qabsmax.data(), absmax2.data());
    cpu::nf4_double_quantize(d);
    view.qabsmax = qabsmax.data();
    view.absmax2 = absmax2.data();
    view.nested_code = nested_state->code.data();
    view.offset = &nested_state->offset;
  }
  // W rounded once to the compute dtype (nf4_dequantize(dtype = t)), widened.
  std::vector<double> dequant(DType t) const {
    Nf4DequantizeParams q;
    q.weight = view;
    q.out_dtype = t;
    Buf out(static_cast<size_t>(n * k) * dtype_size(t));
    q.out = out.ptr;
    cpu::nf4_dequantize(q);
    std::vector<double> r(n * k);
    for (int64_t i = 0; i < n * k; ++i) r[i] = load(out.ptr, t, i);
    return r;
  }
};

// A float64 reference sum and the sum of its terms' magnitudes (the scale of the accumulation floor).
struct RefSum {
  double acc = 0, mag = 0;
  void add(double term) {
    acc += term;
    mag += std::fabs(term);
  }
};

// Few-output LoRA factors are summed in fp64 and rounded once to fp32 (lora_small.cu, lora_factors_cpu.cpp):
// within one fp32 ulp of the float64 value (checked without dropout: the kernels scale kept x by keep_scale
// in fp32 before the product, the reference in double, which under cancellation can exceed an ulp).
bool within_fp32_ulp(float got, const RefSum& ref) {
  return std::fabs(static_cast<double>(got) - ref.acc) <= std::ldexp(std::fabs(ref.acc), -23) + 1e-300;
}

// Errors of one output tensor against the float64 reference. `slack` per element is the fp32
// accumulation floor u32 * sqrt(terms) * sum|terms| (any summation order; it matters only where the
// terms cancel, e.g. a single output element whose CPU error happens to be near zero).
struct Errors {
  double max_abs = 0, sum_abs = 0, max_ref = 0, sum_ref = 0, sum_slack = 0;
  std::vector<double> err, slack;
  bool nonfinite = false;
  void add(double v, double ref, double mag, int64_t terms) {
    if (!std::isfinite(v)) nonfinite = true;
    const double e = std::fabs(v - ref);
    const double sl = std::ldexp(1.0, -24) * std::sqrt(static_cast<double>(std::max<int64_t>(terms, 1))) * mag;
    max_abs = std::max(max_abs, e);
    sum_abs += e;
    max_ref = std::max(max_ref, std::fabs(ref));
    sum_ref += std::fabs(ref);
    sum_slack += sl;
    err.push_back(e);
    slack.push_back(sl);
  }
  void add(double v, const RefSum& ref, int64_t terms) { add(v, ref.acc, ref.mag, terms); }
  int64_t count() const { return static_cast<int64_t>(err.size()); }
  double mean() const { return count() ? sum_abs / count() : 0; }
  double mean_ref() const { return count() ? sum_ref / count() : 0; }
};

// The section-4 rule: gpu error within 2x the CPU kernel's error plus the output rounding (and the
// fp32 accumulation floor of each element).
void judge(const std::string& what, const Errors& gpu, const Errors& cpu, DType out_t) {
  ++g_checks;
  const double u = unit_roundoff(out_t);
  const double atol = 2 * u * gpu.max_ref + 1e-6 * gpu.mean_ref();
  double worst = -1;  // largest err / allowed
  for (int64_t i = 0; i < gpu.count(); ++i)
    worst = std::max(worst, gpu.err[i] / (2 * cpu.max_abs + atol + gpu.slack[i]));
  const bool ok_mean = gpu.mean() <= 2 * cpu.mean() + u * gpu.mean_ref() + gpu.sum_slack / std::max<int64_t>(gpu.count(), 1);
  if (!gpu.nonfinite && worst <= 1.0 && ok_mean && gpu.count() > 0) return;
  ++g_failures;
  std::printf("FAIL %s: gpu max err %.3g mean %.3g | cpu max err %.3g mean %.3g | max|ref| %.3g atol %.3g "
              "worst err/allowed %.3g%s\n",
              what.c_str(), gpu.max_abs, gpu.mean(), cpu.max_abs, cpu.mean(), gpu.max_ref, atol, worst,
              gpu.nonfinite ? " NON-FINITE" : "");
}

void expect(bool ok, const std::string& what) {
  ++g_checks;
  if (ok) return;
  ++g_failures;
  std::printf("FAIL %s\n", what.c_str());
}

bool keep(const DropoutParams& d, int64_t i, int64_t j) { return !d.enabled() || dropout_keep(d, i, j); }

DropoutParams make_dropout(double prob, int64_t cols, uint64_t offset) {
  DropoutParams d;
  d.threshold = dropout_threshold(prob);
  d.keep_scale = static_cast<float>(1.0 / (1.0 - prob));
  d.seed = (static_cast<uint64_t>(g_rng()) << 32) | g_rng();
  d.offset = offset;
  d.cols = cols;
  return d;
}

// ---- qlora_matmul -----------------------------------------------------------------------------------
enum class Path { kDecode, kFfma, kMma, kTcDecode };
const char* pname(Path p) {
  return p == Path::kDecode ? "decode" : p == Path::kFfma ? "ffma" : p == Path::kMma ? "mma" : "tc_decode";
}

struct MatmulCase {
  Path path = Path::kFfma;
  int64_t m = 1, n = 40, k = 64;
  bool transpose = false;
  DType dt = DType::kBFloat16;
  int bs = 64;
  bool nested = false;
  int rank = 8;
  bool lora_fp32 = true;
  int bias = 0;          // 0 none, 1 fp32, 2 dtype (forward only)
  double drop = 0.0;     // transposed only
  int splits = 1;        // 0: the launcher's own choice for a 132-SM device
  int a_col_stride = 1;  // 2: non-contiguous columns
  int a_shift = 0;       // elements of misalignment of a
  int packed_shift = 0;  // bytes of misalignment of the packed codes
  int a_row_pad = 0;     // extra elements per row of a
  bool onehot = false;   // exact weight check: a rows one-hot, no LoRA, no bias
};

std::string describe(const MatmulCase& c) {
  char b[400];
  std::snprintf(b, sizeof b,
                "%s%s M=%lld N=%lld K=%lld %s bs=%d %s r=%d lora=%s bias=%d drop=%.2f splits=%d colstride=%d "
                "ashift=%d pshift=%d rowpad=%d%s",
                pname(c.path), c.transpose ? "(T)" : "", (long long)c.m, (long long)c.n, (long long)c.k, dname(c.dt),
                c.bs, c.nested ? "nested" : "plain", c.rank, c.lora_fp32 ? "f32" : "dtype", c.bias, c.drop, c.splits,
                c.a_col_stride, c.a_shift, c.packed_shift, c.a_row_pad, c.onehot ? " ONEHOT" : "");
  return b;
}

void check_matmul(const MatmulCase& c) {
  const std::string name = describe(c);
  const int64_t n_in = c.transpose ? c.n : c.k, n_out = c.transpose ? c.k : c.n;
  const Weight w(c.n, c.k, c.bs, c.nested, c.packed_shift);
  const int rank = c.onehot ? 0 : c.rank;

  QloraMatmulParams p;
  p.weight = w.view;
  p.n = c.n;
  p.k = c.k;
  p.transpose_w = c.transpose;
  p.m = c.m;
  p.a_dtype = c.dt;
  p.a_col_stride = c.a_col_stride;
  p.a_row_stride = n_in * c.a_col_stride + c.a_row_pad;
  Buf a = random_matrix(c.m, n_in, c.dt, p.a_row_stride, p.a_col_stride, c.a_shift, 1.0f);
  if (c.onehot) {  // row m = e_{j(m)}: out[m, o] = Wop[j(m), o] exactly
    for (int64_t m = 0; m < c.m; ++m)
      for (int64_t i = 0; i < n_in; ++i)
        store(a.ptr, c.dt, m * p.a_row_stride + i * p.a_col_stride, i == (m * 37 + 5) % n_in ? 1.0f : 0.0f);
  }
  p.a = a.ptr;

  // LoRA: s [M, r] fp32; forward lora_w = B [N, r]; transposed lora_w = Aᵀ view of A [r, K].
  const DType lw_t = c.lora_fp32 ? DType::kFloat32 : c.dt;
  Buf s = random_matrix(c.m, std::max(rank, 1), DType::kFloat32, std::max(rank, 1), 1, 0, 1.0f);
  Buf lw = c.transpose ? random_matrix(std::max(rank, 1), c.k, lw_t, c.k, 1, 0, 0.1f)
                       : random_matrix(c.n, std::max(rank, 1), lw_t, std::max(rank, 1), 1, 0, 0.1f);
  p.rank = rank;
  p.lora_s = s.ptr;
  p.lora_s_row_stride = std::max(rank, 1);
  p.lora_w = lw.ptr;
  p.lora_w_dtype = lw_t;
  p.lora_w_stride_o = c.transpose ? 1 : std::max(rank, 1);
  p.lora_w_stride_q = c.transpose ? c.k : 1;
  p.scale = 0.75f;
  const DType bias_t = c.bias == 2 ? c.dt : DType::kFloat32;
  Buf bias = random_matrix(1, n_out, bias_t, n_out, 1, 0, 0.5f);
  p.bias = (c.bias && !c.onehot) ? bias.ptr : nullptr;
  p.bias_dtype = bias_t;
  // offset close below 2^32 so the counters of some rows cross into the next high word
  if (c.drop > 0 && !c.onehot) p.dropout = make_dropout(c.drop, c.k, (uint64_t(1) << 32) - 3 * c.k - 7);

  const int es = dtype_size(c.dt);
  p.out_row_stride = n_out + 3;
  const size_t out_bytes = static_cast<size_t>(c.m * p.out_row_stride) * es;
  Buf out_gpu(out_bytes), out_cpu(out_bytes);

  p.out = out_cpu.ptr;
  cpu::qlora_matmul(p, cpu::choose_matmul_path(p, cpu::crossover_for(cpu::cpu_isa()), cpu::cpu_isa()));

  p.out = out_gpu.ptr;
  cudaError_t err = cudaSuccess;
  std::vector<float> ws;
  int splits = c.splits;
  if (splits == 0)
    splits = c.path == Path::kDecode     ? cuda::qlora_decode_splits(p, 132)
             : c.path == Path::kTcDecode ? cuda::qlora_tc_decode_splits(p, 132, lora_emu::g_smem_optin)
                                         : cuda::qlora_ffma_splits(p, 132);
  switch (c.path) {
    case Path::kDecode:
      if (!cuda::qlora_decode_supported(p)) {
        expect(false, name + ": qlora_decode_supported() rejected a supported case");
        return;
      }
      ws.assign(cuda::qlora_splitk_workspace_bytes(p, splits) / 4 + 1, std::nanf(""));
      err = cuda::qlora_decode(p, splits, ws.data(), nullptr);
      break;
    case Path::kFfma:
      ws.assign(cuda::qlora_splitk_workspace_bytes(p, splits) / 4 + 1, std::nanf(""));
      err = cuda::qlora_ffma(p, splits, ws.data(), nullptr);
      break;
    case Path::kMma:
      if (!cuda::qlora_mma_supported(p)) {
        expect(false, name + ": qlora_mma_supported() rejected a supported case");
        return;
      }
      err = cuda::qlora_mma(p, nullptr);
      break;
    case Path::kTcDecode:
      if (!cuda::qlora_tc_decode_supported(p)) {
        expect(false, name + ": qlora_tc_decode_supported() rejected a supported case");
        return;
      }
      ws.assign(cuda::qlora_splitk_workspace_bytes(p, splits) / 4 + 1, std::nanf(""));
      err = cuda::qlora_tc_decode(p, splits, ws.data(), nullptr);
      break;
  }
  expect(err == cudaSuccess, name + ": launcher returned an error");

  // Untouched bytes: the 3 padding elements of every row.
  bool pad_ok = true;
  for (int64_t m = 0; m < c.m && pad_ok; ++m)
    for (size_t b = static_cast<size_t>((m * p.out_row_stride + n_out) * es); b < static_cast<size_t>((m + 1) * p.out_row_stride * es); ++b)
      if (out_gpu.ptr[b] != 0xFF) pad_ok = false;
  if (!out_gpu.guard_intact()) pad_ok = false;
  expect(pad_ok, name + ": wrote outside the output rows");

  // float64 reference from the dequantized weight (rounded to the compute dtype).
  const std::vector<double> W = w.dequant(c.dt);
  Errors eg, ec;
  bool exact = true;
  int64_t first_bad_m = -1, first_bad_o = -1;
  for (int64_t m = 0; m < c.m; ++m) {
    for (int64_t o = 0; o < n_out; ++o) {
      RefSum ref;
      for (int64_t i = 0; i < n_in; ++i) {
        const double wv = c.transpose ? W[i * c.k + o] : W[o * c.k + i];
        ref.add(load(a.ptr, c.dt, m * p.a_row_stride + i * p.a_col_stride) * wv);
      }
      if (rank > 0) {
        RefSum l;
        for (int q = 0; q < rank; ++q)
          l.add(load(s.ptr, DType::kFloat32, m * p.lora_s_row_stride + q) *
                load(lw.ptr, lw_t, o * p.lora_w_stride_o + q * p.lora_w_stride_q));
        const double ks = p.dropout.enabled() ? (dropout_keep(p.dropout, m, o) ? p.dropout.keep_scale : 0.0) : 1.0;
        ref.acc += static_cast<double>(p.scale) * l.acc * ks;
        ref.mag += std::fabs(static_cast<double>(p.scale) * ks) * l.mag;
      }
      if (p.bias) ref.add(load(bias.ptr, bias_t, o));
      const double g = load(out_gpu.ptr, c.dt, m * p.out_row_stride + o);
      const double cv = load(out_cpu.ptr, c.dt, m * p.out_row_stride + o);
      eg.add(g, ref, n_in + rank + 2);
      ec.add(cv, ref, n_in + rank + 2);
      if (c.onehot && (g != ref.acc || cv != ref.acc) && exact) {
        exact = false;
        first_bad_m = m;
        first_bad_o = o;
      }
    }
  }
  if (c.onehot) {
    char b[200];
    std::snprintf(b, sizeof b, ": weight values not exact (first at m=%lld o=%lld)", (long long)first_bad_m,
                  (long long)first_bad_o);
    expect(exact, name + b);
  } else {
    judge(name, eg, ec, c.dt);
  }
}

// ---- lora_down / lora_outer / mask -------------------------------------------------------------------
// The CPU kernel into cpu_out, then the emulated CUDA launcher into gpu_out with a NaN-filled split-K
// workspace (a partial sum read before it is written shows up as NaN).
template <typename P>
void run_cpu_and_cuda(P& p, Buf& cpu_out, Buf& gpu_out, int splits, void (*cpu_kernel)(const P&),
                      cudaError_t (*cuda_launcher)(const P&, int, float*, cudaStream_t),
                      size_t (*workspace_bytes)(const P&, int), const std::string& what) {
  p.out = cpu_out.ptr;
  cpu_kernel(p);
  p.out = gpu_out.ptr;
  std::vector<float> ws(workspace_bytes(p, splits) / 4 + 1, std::nanf(""));
  expect(cuda_launcher(p, splits, ws.data(), nullptr) == cudaSuccess, what + ": launcher error");
}

void check_down(int64_t m, int64_t l, int rank, DType dt, bool f_fp32, bool f_is_bt, double drop, int splits,
                int a_col_stride) {
  char nb[240];
  std::snprintf(nb, sizeof nb, "lora_down M=%lld L=%lld r=%d %s f=%s%s drop=%.2f splits=%d colstride=%d", (long long)m,
                (long long)l, rank, dname(dt), f_fp32 ? "f32" : "dtype", f_is_bt ? "(B^T view)" : "(A)", drop, splits,
                a_col_stride);
  LoraDownParams p;
  p.m = m;
  p.l = l;
  p.rank = rank;
  p.a_dtype = dt;
  p.a_col_stride = a_col_stride;
  p.a_row_stride = l * a_col_stride + 1;
  Buf a = random_matrix(m, l, dt, p.a_row_stride, a_col_stride, 1, 1.0f);
  p.a = a.ptr;
  const DType ft = f_fp32 ? DType::kFloat32 : dt;
  // A [r, l] (stride_q = l, stride_l = 1) or Bᵀ view of B [l, r] (stride_q = 1, stride_l = r)
  Buf f = f_is_bt ? random_matrix(l, rank, ft, rank, 1, 0, 0.1f) : random_matrix(rank, l, ft, l, 1, 0, 0.1f);
  p.f = f.ptr;
  p.f_dtype = ft;
  p.f_stride_q = f_is_bt ? 1 : l;
  p.f_stride_l = f_is_bt ? rank : 1;
  if (drop > 0) p.dropout = make_dropout(drop, l, 12345);
  p.out_row_stride = rank + 2;
  Buf og(static_cast<size_t>(m * p.out_row_stride) * 4), oc(static_cast<size_t>(m * p.out_row_stride) * 4);
  run_cpu_and_cuda(p, oc, og, splits, cpu::lora_down, cuda::lora_down, cuda::lora_down_workspace_bytes, nb);
  Errors eg, ec;
  for (int64_t i = 0; i < m; ++i)
    for (int q = 0; q < rank; ++q) {
      RefSum ref;
      for (int64_t t = 0; t < l; ++t)
        if (keep(p.dropout, i, t))
          ref.add(load(a.ptr, dt, i * p.a_row_stride + t * a_col_stride) *
                  (p.dropout.enabled() ? p.dropout.keep_scale : 1.0f) * load(f.ptr, ft, q * p.f_stride_q + t * p.f_stride_l));
      eg.add(load(og.ptr, DType::kFloat32, i * p.out_row_stride + q), ref, l);
      ec.add(load(oc.ptr, DType::kFloat32, i * p.out_row_stride + q), ref, l);
      if (m * rank <= 16 && !p.dropout.enabled()) {
        expect(within_fp32_ulp(load(og.ptr, DType::kFloat32, i * p.out_row_stride + q), ref),
               std::string(nb) + ": few outputs, CUDA not within 1 ulp of float64");
        expect(within_fp32_ulp(load(oc.ptr, DType::kFloat32, i * p.out_row_stride + q), ref),
               std::string(nb) + ": few outputs, CPU not within 1 ulp of float64");
      }
    }
  // dropout scaling: kernels multiply x by keep_scale in fp32 before the product (the reference above
  // multiplies in double; both within the rule)
  judge(nb, eg, ec, DType::kFloat32);
  bool pad_ok = true;
  for (int64_t i = 0; i < m; ++i)
    for (int b = rank * 4; b < (rank + 2) * 4; ++b)
      if (og.ptr[i * p.out_row_stride * 4 + b] != 0xFF) pad_ok = false;
  expect(pad_ok, std::string(nb) + ": wrote outside the output rows");
}

// dA-style (left fp32 u [M, r], right x [M, K] dtype with dropout) or dB-style (left dy [M, N] dtype,
// right s [M, r] fp32).
void check_outer(bool da, int64_t m, int64_t pdim, int64_t qdim, DType dt, DType out_t, double drop, int splits,
                 int right_col_stride) {
  char nb[240];
  std::snprintf(nb, sizeof nb, "lora_outer(%s) M=%lld P=%lld Q=%lld %s out=%s drop=%.2f splits=%d rcolstride=%d",
                da ? "dA" : "dB", (long long)m, (long long)pdim, (long long)qdim, dname(dt), dname(out_t), drop, splits,
                right_col_stride);
  LoraOuterParams p;
  p.m = m;
  p.p = pdim;
  p.q = qdim;
  p.left_dtype = da ? DType::kFloat32 : dt;
  p.right_dtype = da ? dt : DType::kFloat32;
  p.left_row_stride = pdim;
  p.left_col_stride = 1;
  p.right_col_stride = right_col_stride;
  p.right_row_stride = qdim * right_col_stride + 3;
  Buf left = random_matrix(m, pdim, p.left_dtype, p.left_row_stride, 1, 0, 1.0f);
  Buf right = random_matrix(m, qdim, p.right_dtype, p.right_row_stride, right_col_stride, 1, 1.0f);
  p.left = left.ptr;
  p.right = right.ptr;
  p.scale = 0.5f;
  if (drop > 0) p.dropout = make_dropout(drop, qdim, 999);
  p.out_dtype = out_t;
  const size_t ob = static_cast<size_t>(pdim * qdim) * dtype_size(out_t);
  Buf og(ob), oc(ob);
  run_cpu_and_cuda(p, oc, og, splits, cpu::lora_outer, cuda::lora_outer, cuda::lora_outer_workspace_bytes, nb);
  Errors eg, ec;
  for (int64_t i = 0; i < pdim; ++i)
    for (int64_t j = 0; j < qdim; ++j) {
      RefSum ref;
      for (int64_t t = 0; t < m; ++t)
        if (keep(p.dropout, t, j))
          ref.add(load(left.ptr, p.left_dtype, t * p.left_row_stride + i) *
                  load(right.ptr, p.right_dtype, t * p.right_row_stride + j * right_col_stride) *
                  (p.dropout.enabled() ? p.dropout.keep_scale : 1.0f));
      ref.acc *= p.scale;
      ref.mag *= std::fabs(p.scale);
      eg.add(load(og.ptr, out_t, i * qdim + j), ref, m);
      ec.add(load(oc.ptr, out_t, i * qdim + j), ref, m);
      if (pdim * qdim <= 16 && out_t == DType::kFloat32 && !p.dropout.enabled()) {
        expect(within_fp32_ulp(load(og.ptr, out_t, i * qdim + j), ref),
               std::string(nb) + ": few outputs, CUDA not within 1 ulp of float64");
        expect(within_fp32_ulp(load(oc.ptr, out_t, i * qdim + j), ref),
               std::string(nb) + ": few outputs, CPU not within 1 ulp of float64");
      }
    }
  judge(nb, eg, ec, out_t);
  expect(og.guard_intact(), std::string(nb) + ": wrote past the output");
}

void check_mask(int64_t rows, int64_t cols, double prob, uint64_t offset) {
  char nb[160];
  std::snprintf(nb, sizeof nb, "dropout_mask rows=%lld cols=%lld p=%.3f offset=%llu", (long long)rows, (long long)cols,
                prob, (unsigned long long)offset);
  DropoutMaskParams p;
  p.rows = rows;
  p.dropout = prob > 0 ? make_dropout(prob, cols, offset) : DropoutParams{};
  p.dropout.cols = cols;
  Buf g(rows * cols), c(rows * cols);
  p.out = c.ptr;
  cpu::dropout_mask(p);
  p.out = g.ptr;
  expect(cuda::lora_dropout_mask(p, nullptr) == cudaSuccess, std::string(nb) + ": launcher error");
  expect(std::memcmp(g.ptr, c.ptr, rows * cols) == 0 && g.guard_intact(), std::string(nb) + ": mask bytes differ");
  if (prob > 0) {  // keep rate sanity (the CPU kernel is checked against reference.py elsewhere)
    int64_t kept = 0;
    for (int64_t i = 0; i < rows * cols; ++i) kept += g.ptr[i];
    const double rate = double(kept) / double(rows * cols), sd = std::sqrt(prob * (1 - prob) / double(rows * cols));
    expect(std::fabs(rate - (1 - prob)) < 6 * sd + 1e-9, std::string(nb) + ": keep rate off");
  }
}

// ---- the case lists ---------------------------------------------------------------------------------
// An exact-weight case: rows of a one-hot, no LoRA, no bias, so out holds dequantized weight values.
void check_onehot(Path path, bool transpose, int64_t m, int64_t n, int64_t k, DType dt, bool nested, int bs,
                  int splits) {
  MatmulCase c;
  c.path = path;
  c.onehot = true;
  c.transpose = transpose;
  c.m = m;
  c.n = n;
  c.k = k;
  c.dt = dt;
  c.nested = nested;
  c.bs = bs;
  c.splits = splits;
  check_matmul(c);
}

void run_decode() {
  MatmulCase c;
  c.path = Path::kDecode;
  int i = 0;
  // forward decode: M in {1, 2, 3, 5, 8, 16} (the three row-count instances MT = 1, 4, 16), K % 32 == 0
  // (K = 2080: 65 chunks = 3 pieces, split-K 1 and 3 with a partial last piece), N tail (40, 136).
  for (int64_t m : {1, 2, 3, 5, 8, 16})
    for (int64_t k : {96, 2080}) {
      c.m = m;
      c.k = k;
      c.n = (i % 2) ? 136 : 40;
      c.dt = i % 3 == 0 ? DType::kFloat32 : i % 3 == 1 ? DType::kFloat16 : DType::kBFloat16;
      c.nested = i % 2 == 0;
      c.bs = k == 96 ? 32 : (i % 4 == 1 ? 4096 : 64);
      c.rank = i % 3 == 0 ? 1 : i % 3 == 1 ? 8 : 16;
      c.lora_fp32 = i % 2 == 1;
      c.bias = i % 3;
      c.splits = k > 1024 && i % 2 == 0 ? 3 : (i % 4 == 3 ? 0 : 1);
      c.a_row_pad = i % 2 == 0 ? 0 : 8;
      ++i;
      check_matmul(c);
    }
  // exact weight values through the decode path
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16})
    check_onehot(Path::kDecode, false, 16, 40, 2080, t, t != DType::kFloat16, 64, 3);
}

// qlora_decode_supported must refuse layouts its 16-byte loads cannot take (the binding then uses the
// tensor-core or FFMA path, which the ffma / mma groups run on such layouts).
void run_decode_predicates() {
  Weight w(40, 96, 64, false, 0), w_odd(40, 96, 64, false, 1);
  Buf a(16 * 200 * 4 + 64);
  QloraMatmulParams p;
  p.weight = w.view;
  p.n = 40;
  p.k = 96;
  p.m = 4;
  p.a = a.ptr;
  p.a_dtype = DType::kBFloat16;
  p.a_row_stride = 96;
  expect(cuda::qlora_decode_supported(p), "decode_supported: aligned bf16 case refused");
  QloraMatmulParams q = p;
  q.a = a.ptr + 2;
  expect(!cuda::qlora_decode_supported(q), "decode_supported: accepted a misaligned a");
  q = p;
  q.a_row_stride = 100;
  expect(!cuda::qlora_decode_supported(q), "decode_supported: accepted rows not 16-byte aligned");
  q = p;
  q.a_col_stride = 2;
  q.a_row_stride = 192;
  expect(!cuda::qlora_decode_supported(q), "decode_supported: accepted a non-unit column stride");
  q = p;
  q.weight = w_odd.view;
  expect(!cuda::qlora_decode_supported(q), "decode_supported: accepted misaligned packed codes");
  q.transpose_w = true;
  expect(!cuda::qlora_decode_supported(q), "decode_supported(T): accepted misaligned packed codes");
  q = p;
  q.k = 72;
  expect(!cuda::qlora_decode_supported(q), "decode_supported: accepted K % 32 != 0");
  q = p;
  q.m = 17;
  expect(!cuda::qlora_decode_supported(q), "decode_supported: accepted M = 17");
  q = p;
  q.transpose_w = true;
  q.m = 5;
  expect(!cuda::qlora_decode_supported(q), "decode_supported(T): accepted M = 5");
}

void run_decode_t() {
  MatmulCase c;
  c.path = Path::kDecode;
  c.transpose = true;
  int i = 0;
  // transposed decode (dx): M in {1, 2, 3} (MT = 1, 4), output K = 96 / 1056 (33 chunks: 2 CTAs, inactive
  // lanes), N = 40 / 136 (N split 1 and 3), dropout on the LoRA term, adapters fp32 / dtype.
  for (int64_t m : {1, 2, 3})
    for (int64_t k : {96, 1056}) {
      c.m = m;
      c.k = k;
      c.n = (i % 2) ? 136 : 200;
      c.dt = i % 3 == 0 ? DType::kBFloat16 : i % 3 == 1 ? DType::kFloat32 : DType::kFloat16;
      c.nested = i % 2 == 1;
      c.bs = i % 3 == 0 ? 32 : 128;
      c.rank = i % 3 == 0 ? 16 : i % 3 == 1 ? 1 : 8;
      c.lora_fp32 = i % 2 == 0;
      c.drop = i % 2 == 0 ? 0.25 : 0.0;
      c.splits = i % 2 == 0 ? 3 : (i == 5 ? 0 : 1);
      c.a_col_stride = i == 3 ? 2 : 1;  // dy may have any strides here
      ++i;
      check_matmul(c);
    }
  check_onehot(Path::kDecode, true, 4, 136, 1056, DType::kFloat16, true, 64, 2);
}

void run_ffma() {
  MatmulCase c;
  c.path = Path::kFfma;
  int i = 0;
  // FFMA fallback: every M of the list, odd K / N, both orientations, split-K, non-contiguous and
  // misaligned a, misaligned packed codes (odd K makes rows start mid-byte).
  for (int64_t m : {1, 2, 3, 5, 8, 16, 17, 33, 64, 130}) {
    for (bool tr : {false, true}) {
      c.m = m;
      c.transpose = tr;
      c.k = i % 3 == 0 ? 72 : i % 3 == 1 ? 200 : 264;
      c.n = i % 2 ? 136 : 40;
      if (i % 5 == 4) c.k = 33;  // odd K: W rows start at odd nibbles
      c.dt = i % 3 == 0 ? DType::kFloat32 : i % 3 == 1 ? DType::kBFloat16 : DType::kFloat16;
      c.nested = i % 2 == 0;
      c.bs = i % 4 == 0 ? 32 : i % 4 == 1 ? 64 : i % 4 == 2 ? 256 : 4096;
      c.rank = i % 3 == 0 ? 16 : i % 3 == 1 ? 1 : 8;
      c.lora_fp32 = i % 2 == 1;
      c.bias = tr ? 0 : i % 3;
      c.drop = tr && i % 2 == 1 ? 0.1 : 0.0;
      c.splits = (i % 3 == 2) ? 3 : (i % 7 == 3 ? 0 : 1);
      c.a_col_stride = i % 4 == 3 ? 2 : 1;
      c.a_shift = i % 4 == 1 ? 1 : 0;
      c.packed_shift = i % 6 == 5 ? 1 : 0;
      ++i;
      check_matmul(c);
    }
  }
  for (bool tr : {false, true}) check_onehot(Path::kFfma, tr, 33, 40, 72, DType::kBFloat16, true, 32, 2);
}

void run_mma() {
  MatmulCase c;
  c.path = Path::kMma;
  int i = 0;
  // tensor-core kernel: fast path (aligned, K % 32 == 0, n_in % 8 == 0) and scalar path (odd K,
  // non-contiguous / misaligned a, misaligned codes), both orientations, M tails.
  for (int64_t m : {1, 2, 3, 5, 8, 16, 17, 33, 64, 130}) {
    for (bool tr : {false, true}) {
      c.m = m;
      c.transpose = tr;
      const bool fast = i % 2 == 0;
      c.k = fast ? (i % 4 == 0 ? 96 : 160) : (i % 3 == 0 ? 72 : i % 3 == 1 ? 200 : 264);
      c.n = i % 3 == 0 ? 136 : 40;
      if (!fast && i % 5 == 1) c.k = 33;
      c.dt = i % 4 < 2 ? DType::kBFloat16 : DType::kFloat16;
      c.nested = i % 3 != 1;
      c.bs = i % 4 == 0 ? 64 : i % 4 == 1 ? 32 : i % 4 == 2 ? 128 : 4096;
      c.rank = i % 3 == 0 ? 8 : i % 3 == 1 ? 16 : 1;
      c.lora_fp32 = i % 2 == 0;
      c.bias = tr ? 0 : (i % 3);
      c.drop = tr && i % 3 != 2 ? 0.2 : 0.0;
      c.a_col_stride = !fast && i % 4 == 1 ? 2 : 1;
      c.a_shift = !fast && i % 4 == 3 ? 1 : 0;
      c.packed_shift = !fast && i % 3 == 2 ? 1 : 0;
      ++i;
      check_matmul(c);
    }
  }
  for (bool tr : {false, true})
    for (bool fast : {true, false})
      check_onehot(Path::kMma, tr, 64, 136, fast ? 96 : 72, fast ? DType::kFloat16 : DType::kBFloat16, true, 32, 1);
  // The LoRA sum runs as tensor-core k-steps over 32-wide rank chunks: ranks across a chunk boundary and
  // not a multiple of 16, fp32 adapters with large and small magnitudes mixed (the hi + lo split).
  for (int rank : {33, 40, 100}) {
    for (bool tr : {false, true}) {
      c = MatmulCase{};
      c.path = Path::kMma;
      c.transpose = tr;
      c.m = 70; c.n = 72; c.k = 96; c.rank = rank; c.lora_fp32 = rank != 40; c.bias = tr ? 0 : 1;
      c.drop = tr ? 0.3 : 0.0; c.dt = rank == 100 ? DType::kFloat16 : DType::kBFloat16;
      check_matmul(c);
    }
  }
}

// Tensor-core weight-streaming forward (M <= 64): every n8-tile instance (M = 1, 3, 8 | 9, 16 | 17, 32 |
// 33, 63, 64), N tails (rows past N in the 16-row CTA), K = 64 (one lane chunk), 192 (partial super step),
// 2112 (a partial round: warps without a super step), 4352 .. 12288 (full rounds, the steady loop), K splits
// (1, 2, 3, the launcher's own), blocksizes 64 .. 2048, nested and plain absmax, padded rows of x.
void run_tc_decode() {
  MatmulCase c;
  c.path = Path::kTcDecode;
  int i = 0;
  for (int64_t m : {1, 3, 8, 9, 16, 17, 32, 33, 63, 64}) {
    for (int64_t k : {192, 2112}) {
      c.m = m;
      c.k = (i % 5 == 4) ? 64 : k;
      c.n = i % 3 == 0 ? 40 : i % 3 == 1 ? 136 : 16;
      c.dt = i % 2 == 0 ? DType::kBFloat16 : DType::kFloat16;
      c.nested = i % 3 != 1;
      c.bs = c.k == 64 || c.k == 192 ? 64 : (i % 4 == 1 ? 2048 : i % 4 == 3 ? 128 : 64);
      c.rank = i % 4 == 0 ? 0 : i % 4 == 1 ? 8 : i % 4 == 2 ? 16 : 1;
      c.lora_fp32 = i % 2 == 1;
      c.bias = i % 3;
      c.splits = c.k > 1024 && i % 3 == 0 ? 3 : (i % 4 == 2 ? 0 : 1);
      c.a_row_pad = i % 2 == 0 ? 0 : 8;
      ++i;
      check_matmul(c);
    }
  }
  // The unmasked steady-state loop runs for rounds 0 .. full - kStages - 1 (kStages = 4 rounds of 2048
  // columns): K = 12288 gives 6 full rounds (2 steady), K = 10304 five full rounds and a partial super step.
  c.m = 5; c.n = 24; c.k = 12288; c.bs = 64; c.nested = true; c.splits = 1; c.rank = 16; c.dt = DType::kBFloat16;
  check_matmul(c);
  c.m = 16; c.n = 16; c.k = 10304; c.bs = 1024; c.nested = false; c.dt = DType::kFloat16;
  check_matmul(c);
  c.m = 40; c.n = 40; c.k = 4352; c.bs = 128; c.nested = true; c.splits = 2;
  check_matmul(c);
  // Rows that start inside a quantization block (K % blocksize != 0): the staged absmax of each row begin
  // at a block that the previous row ends in.
  c.m = 3; c.n = 33; c.k = 192; c.bs = 128; c.nested = false; c.splits = 1; c.dt = DType::kBFloat16;
  check_matmul(c);
  c.m = 12; c.n = 20; c.k = 2880; c.bs = 256; c.nested = true; c.splits = 0;
  check_matmul(c);
  // The same long rows run on an emulated 99 KB device (sm_86 / sm_89), whose driver refuses a launch over
  // its limit: with the launcher's own splits for it (rows that fill the SMs, so only the limit splits K).
  {
    const int saved = lora_emu::g_smem_optin;
    lora_emu::g_smem_optin = 101376;
    c.m = 2; c.n = 16; c.k = 53248; c.bs = 64; c.nested = true; c.rank = 8; c.bias = 1; c.dt = DType::kBFloat16;
    QloraMatmulParams q;
    q.m = c.m; q.n = c.n; q.k = c.k; q.weight.blocksize = c.bs;
    c.splits = cuda::qlora_tc_decode_splits(q, 1, lora_emu::g_smem_optin);
    expect(c.splits >= 2, "tc_decode_splits: one split of K = 53248 on a 99 KB device");
    check_matmul(c);
    lora_emu::g_smem_optin = saved;
  }
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    check_onehot(Path::kTcDecode, false, 64, 40, 2112, t, t == DType::kBFloat16, 64, 1);
    check_onehot(Path::kTcDecode, false, 7, 17, 4352, t, t != DType::kBFloat16, 128, 2);
    check_onehot(Path::kTcDecode, false, 9, 16, 12288, t, true, 64, 1);
  }
}

// Transposed tc decode (dx = dy·W, M <= 64): every n8-tile instance (U = 16 / NT output pairs per lane),
// output K tails (CTAs of 16·U columns with idle lanes), N tails (row groups of 16 past N), N splits,
// blocksizes 32 .. 4096, nested and plain, dropout on the LoRA term, padded dy rows.
void run_tc_decode_t() {
  MatmulCase c;
  c.path = Path::kTcDecode;
  c.transpose = true;
  int i = 0;
  for (int64_t m : {1, 3, 8, 9, 16, 17, 33, 63, 64}) {
    for (int64_t k : {96, 544}) {
      c.m = m;
      c.k = (i % 5 == 4) ? 32 : k;
      c.n = i % 3 == 0 ? 40 : i % 3 == 1 ? 200 : 16;
      c.dt = i % 2 == 0 ? DType::kBFloat16 : DType::kFloat16;
      c.nested = i % 3 != 2;
      c.bs = i % 4 == 0 ? 32 : i % 4 == 1 ? 64 : i % 4 == 2 ? 4096 : 128;
      c.rank = i % 4 == 0 ? 0 : i % 4 == 1 ? 16 : i % 4 == 2 ? 8 : 1;
      c.lora_fp32 = i % 2 == 0;
      c.drop = i % 3 == 1 ? 0.25 : 0.0;
      c.splits = c.n == 200 ? (i % 2 ? 3 : 0) : 1;
      c.a_row_pad = i % 2 == 0 ? 0 : 2;
      ++i;
      check_matmul(c);
    }
  }
  c.m = 4; c.n = 1100; c.k = 288; c.bs = 64; c.nested = true; c.rank = 8; c.drop = 0.1; c.splits = 1;
  check_matmul(c);  // long reduction: the register double buffer runs many row groups per warp
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    check_onehot(Path::kTcDecode, true, 64, 40, 96, t, t == DType::kBFloat16, 64, 1);
    check_onehot(Path::kTcDecode, true, 5, 136, 544, t, t != DType::kBFloat16, 32, 2);
  }
}

// qlora_tc_decode_supported must refuse what the kernel cannot take.
void run_tc_decode_predicates() {
  Weight w(40, 128, 64, false, 0), w_odd(40, 128, 64, false, 1), w32(40, 128, 32, false, 0),
      w4096(40, 128, 4096, false, 0);
  Buf a(64 * 200 * 4 + 64);
  QloraMatmulParams p;
  p.weight = w.view;
  p.n = 40;
  p.k = 128;
  p.m = 64;
  p.a = a.ptr;
  p.a_dtype = DType::kBFloat16;
  p.a_row_stride = 128;
  expect(cuda::qlora_tc_decode_supported(p), "tc_decode_supported: aligned bf16 case refused");
  QloraMatmulParams q = p;
  q.m = 65;
  expect(!cuda::qlora_tc_decode_supported(q), "tc_decode_supported: accepted M = 65");
  q = p;
  q.a_dtype = DType::kFloat32;
  expect(!cuda::qlora_tc_decode_supported(q), "tc_decode_supported: accepted fp32 activations");
  q = p;
  q.transpose_w = true;
  q.a_row_stride = 40;  // dy [M, N]
  expect(cuda::qlora_tc_decode_supported(q), "tc_decode_supported(T): aligned bf16 case refused");
  q.a_col_stride = 2;
  q.a_row_stride = 80;
  expect(!cuda::qlora_tc_decode_supported(q), "tc_decode_supported(T): accepted a strided dy");
  q = p;
  q.transpose_w = true;
  q.a_row_stride = 41;
  expect(!cuda::qlora_tc_decode_supported(q), "tc_decode_supported(T): accepted dy rows not 4-byte aligned");
  q.a_row_stride = 40;
  q.k = 48;
  expect(!cuda::qlora_tc_decode_supported(q), "tc_decode_supported(T): accepted K % 32 != 0");
  q = p;
  q.k = 96;
  expect(!cuda::qlora_tc_decode_supported(q), "tc_decode_supported: accepted K % 64 != 0");
  q = p;
  q.a = a.ptr + 2;
  expect(!cuda::qlora_tc_decode_supported(q), "tc_decode_supported: accepted a misaligned x");
  q = p;
  q.a_row_stride = 132;
  expect(!cuda::qlora_tc_decode_supported(q), "tc_decode_supported: accepted x rows not 16-byte aligned");
  q = p;
  q.weight = w_odd.view;
  expect(!cuda::qlora_tc_decode_supported(q), "tc_decode_supported: accepted misaligned packed codes");
  q = p;
  q.weight = w32.view;
  expect(!cuda::qlora_tc_decode_supported(q), "tc_decode_supported: accepted blocksize 32");
  q = p;
  q.weight = w4096.view;
  expect(!cuda::qlora_tc_decode_supported(q), "tc_decode_supported: accepted blocksize 4096");
  // Very long rows: the staged absmax of a split (16 rows x blocks x 4 B) must stay within 64 KiB, so the
  // launcher splits K even when the rows alone fill the SMs.
  q = p;
  q.n = int64_t{1} << 16;
  q.k = int64_t{1} << 20;
  expect(cuda::qlora_tc_decode_splits(q, 132, 232448) >= 17, "tc_decode_splits: staged absmax of a split exceed 64 KiB");
  q.k = 4096;
  expect(cuda::qlora_tc_decode_splits(q, 132, 232448) == 1, "tc_decode_splits: split a layer whose rows fill the SMs");
  // One split of K = 53,248 at blocksize 64 stages 833 absmax per row: 64 KiB ring + 53 KB = 116 KB of dynamic
  // shared memory, which fits sm_90's 227 KB but not sm_86 / sm_89's 99 KB: there the launcher splits K.
  q.k = 53248;
  expect(cuda::qlora_tc_decode_splits(q, 132, 232448) == 1, "tc_decode_splits: split K on a 227 KB device");
  expect(cuda::qlora_tc_decode_splits(q, 132, 101376) >= 2, "tc_decode_splits: one split over a 99 KB device");
}

// The CUDA dispatcher's table (qlora_cuda_path.h) on one aligned layer: which path each M, dtype and form
// takes, and what a forced path falls back to where it does not apply.
void run_dispatch() {
  using cuda::CudaMatmulPath;
  Weight w(40, 128, 64, false, 0);
  Buf a(512 * 128 * 4 + 64);
  QloraMatmulParams p;
  p.weight = w.view;
  p.n = 40;
  p.k = 128;
  p.a = a.ptr;
  p.a_row_stride = 128;
  const auto path = [&](int64_t m, DType t, bool transpose, int cc, const CudaMatmulPath* forced = nullptr) {
    QloraMatmulParams q = p;
    q.m = m;
    q.a_dtype = t;
    q.transpose_w = transpose;
    if (transpose) q.a_row_stride = 40;  // dy [M, N]
    return cuda::choose_matmul_path(q, cuda::kCudaCrossover, cc, forced);
  };
  const DType bf = DType::kBFloat16, h = DType::kFloat16, f = DType::kFloat32;
  const int64_t bf_slab = cuda::kCudaCrossover.slab_min_m_bf16, f_slab = cuda::kCudaCrossover.slab_min_m_fp32;
  expect(path(1, bf, false, 9) == CudaMatmulPath::kTcDecode, "dispatch: bf16 M=1 not tc_decode");
  expect(path(bf_slab - 1, bf, false, 9) == CudaMatmulPath::kTensorCore, "dispatch: bf16 below the slab M not mma");
  expect(path(bf_slab, bf, false, 9) == CudaMatmulPath::kSlabGemm, "dispatch: bf16 at the slab M not slab");
  expect(path(bf_slab, bf, true, 9) == CudaMatmulPath::kSlabGemm, "dispatch: bf16 dx at the slab M not slab");
  expect(path(4 * bf_slab, h, false, 9) == CudaMatmulPath::kTensorCore, "dispatch: fp16 at large M not mma");
  expect(path(bf_slab, bf, false, 7) == CudaMatmulPath::kFfma, "dispatch: bf16 on sm70 not ffma");
  expect(path(f_slab, f, false, 9) == CudaMatmulPath::kSlabGemm, "dispatch: fp32 at the slab M not slab");
  expect(path(f_slab - 1, f, false, 9) != CudaMatmulPath::kSlabGemm, "dispatch: fp32 below the slab M on slab");
  const CudaMatmulPath slab = CudaMatmulPath::kSlabGemm;
  expect(path(5, bf, false, 9, &slab) == CudaMatmulPath::kSlabGemm, "dispatch: forced slab refused for bf16");
  expect(path(5, h, false, 9, &slab) != CudaMatmulPath::kSlabGemm, "dispatch: forced slab taken for fp16");
  // dx with a dropout-masked LoRA term: the slab loop has no CUDA epilogue for it
  QloraMatmulParams q = p;
  q.m = bf_slab;
  q.a_dtype = bf;
  q.transpose_w = true;
  q.a_row_stride = 40;
  q.rank = 4;
  q.dropout.threshold = 1u << 20;
  expect(cuda::choose_matmul_path(q, cuda::kCudaCrossover, 9, nullptr) == CudaMatmulPath::kTensorCore,
         "dispatch: masked dx LoRA sent to the slab path");
}

// The slab path's window decode (nf4_window.cu) against cpu::nf4_decode_window, bit for bit: forward
// windows (rows, all columns) and dx windows (all rows, a column range), odd K (rows start mid-byte),
// every compute dtype, nested and plain, a pitch wider than the window.
void run_window() {
  int i = 0;
  for (int64_t k : {64, 33, 200}) {
    for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
      const int bs = i % 3 == 0 ? 32 : i % 3 == 1 ? 64 : 4096;
      const Weight w(37, k, bs, i % 2 == 0, 0);
      const int64_t r0 = i % 2 ? 3 : 0, r1 = i % 2 ? 37 : 20, c0 = i % 3 ? 5 : 0, c1 = k - (i % 2);
      const int64_t ld = c1 - c0 + 7;
      std::vector<float> got((r1 - r0) * ld, std::nanf("")), want((r1 - r0) * ld, std::nanf(""));
      cpu::nf4_decode_window(w.view, t, k, r0, r1, c0, c1, want.data(), ld);
      expect(cuda::nf4_decode_window(w.view, t, k, r0, r1, c0, c1, got.data(), ld, nullptr) == cudaSuccess,
             "nf4_decode_window: launcher error");
      char b[160];
      std::snprintf(b, sizeof b, "nf4_decode_window K=%lld %s bs=%d rows [%lld, %lld) cols [%lld, %lld)", (long long)k,
                    dname(t), bs, (long long)r0, (long long)r1, (long long)c0, (long long)c1);
      expect(std::memcmp(got.data(), want.data(), got.size() * 4) == 0, std::string(b) + ": values differ");
      if (t != DType::kFloat32) { // the 16-bit window (bf16 GEMM kind): the same values' bits
        std::vector<uint16_t> got16((r1 - r0) * ld, 0xFFFF);
        expect(cuda::nf4_decode_window_16bit(w.view, t, k, r0, r1, c0, c1, got16.data(), ld, nullptr) == cudaSuccess,
               "nf4_decode_window_16bit: launcher error");
        bool same = true;
        for (int64_t r = 0; r < r1 - r0; ++r)
          for (int64_t c = 0; c < ld; ++c) {
            const float v = want[r * ld + c];
            const uint16_t bits = c < c1 - c0 ? (t == DType::kBFloat16 ? cpu::float_to_bf16(v) : cpu::float_to_fp16(v))
                                              : uint16_t{0xFFFF}; // the pitch's padding stays unwritten
            same = same && got16[r * ld + c] == bits;
          }
        expect(same, std::string(b) + ": 16-bit window differs");
      }
      ++i;
    }
  }
  expect(cuda::nf4_decode_window_16bit(Weight(4, 64, 64, false, 0).view, DType::kFloat32, 64, 0, 4, 0, 64, nullptr, 64,
                                       nullptr) == cudaErrorInvalidValue,
         "nf4_decode_window_16bit: accepted an fp32 window");
}

void run_lora() {
  int i = 0;
  for (int64_t m : {1, 5, 17, 130})
    for (int rank : {1, 8, 16}) {
      const DType dt = i % 3 == 0 ? DType::kFloat32 : i % 3 == 1 ? DType::kFloat16 : DType::kBFloat16;
      // forward s = drop(x)·Aᵀ (l = K) and backward u = dy·B (l = N, Bᵀ view)
      check_down(m, i % 2 ? 200 : 600, rank, dt, i % 2 == 0, false, i % 2 == 0 ? 0.3 : 0.0, i % 2 ? 1 : 2, i == 5 ? 2 : 1);
      check_down(m, 136, rank, dt, i % 2 == 1, true, 0.0, 1, 1);
      // dA = scale·uᵀ·drop(x) [r, K] and dB = scale·dyᵀ·s [N, r]; M split when long
      check_outer(true, m, rank, i % 2 ? 72 : 264, dt, i % 2 ? dt : DType::kFloat32, i % 2 ? 0.0 : 0.4,
                  m > 100 ? 3 : 1, i == 7 ? 2 : 1);
      check_outer(false, m, 40, rank, dt, i % 2 ? DType::kFloat32 : dt, 0.0, m > 100 ? 2 : 1, 1);
      ++i;
    }
  check_outer(true, 600, 8, 72, DType::kBFloat16, DType::kFloat32, 0.5, 3, 1);  // 3 splits of 256 rows
  // few outputs (fp64 sums): dA of a K = 1 layer with dropout, dB of an N = 1 layer, s of one row at r = 2
  check_outer(true, 700, 4, 1, DType::kBFloat16, DType::kFloat32, 0.3, 1, 1);
  check_outer(true, 500, 3, 2, DType::kBFloat16, DType::kFloat32, 0.0, 2, 1);
  check_outer(false, 300, 1, 8, DType::kFloat32, DType::kBFloat16, 0.0, 2, 1);
  check_outer(false, 900, 2, 4, DType::kFloat32, DType::kFloat32, 0.0, 1, 1);
  check_down(1, 3000, 2, DType::kFloat32, true, true, 0.0, 4, 1);
}

// Degenerate sizes: one chunk / one row / one column, fewer W rows than warps, rank 256.
void run_edge() {
  MatmulCase c;
  c.path = Path::kDecode;
  c.m = 1; c.n = 1; c.k = 32; c.bs = 32; c.rank = 256; c.bias = 1;
  check_matmul(c);
  c.m = 16; c.n = 3; c.dt = DType::kFloat16;
  check_matmul(c);
  c.transpose = true; c.m = 4; c.n = 5; c.k = 32; c.drop = 0.5; c.bias = 0; c.splits = 2;
  check_matmul(c);  // N = 5 rows: most warps of the CTA own no row
  c.m = 1; c.n = 1;
  check_matmul(c);
  for (Path path : {Path::kFfma, Path::kMma}) {
    for (bool tr : {false, true}) {
      c = MatmulCase{};
      c.path = path;
      c.transpose = tr;
      c.dt = DType::kBFloat16;
      c.m = 1; c.n = 1; c.k = 1; c.bs = 32; c.rank = 1; c.bias = tr ? 0 : 2; c.drop = tr ? 0.5 : 0.0;
      check_matmul(c);
      c.m = 65; c.n = 65; c.k = 65; c.rank = 256; c.nested = true; c.splits = 2;
      check_matmul(c);
    }
  }
  check_down(1, 1, 256, DType::kFloat32, true, false, 0.0, 1, 1);
  check_down(70, 3, 256, DType::kBFloat16, false, true, 0.0, 1, 1);
  check_outer(true, 1, 256, 1, DType::kFloat16, DType::kFloat16, 0.5, 1, 1);
  check_outer(false, 3, 1, 256, DType::kBFloat16, DType::kFloat32, 0.0, 1, 1);
}

void run_mask() {
  check_mask(3, 1000, 0.1, 0);
  check_mask(17, 264, 0.5, (uint64_t(1) << 32) - 1000);  // counters cross a high word
  check_mask(5, 72, 0.0, 77);
  check_mask(130, 40, 0.9, uint64_t(0xFFFFFFFFFFFFFF00ull));  // counter wraps 2^64
}

}  // namespace

// fp32 with 4096-long reductions (K forward, N in dx), decode and FFMA paths, one K split and the
// launcher's own: the CPU kernels sum such reductions in blocks (a BLAS GEMM's error), and the CUDA
// kernels must stay within 2x of that.
void run_long() {
  for (Path path : {Path::kDecode, Path::kFfma}) {
    for (bool tr : {false, true}) {
      for (int64_t m : {1, 3, 17, 40}) {
        if (path == Path::kDecode && m > (tr ? 4 : 16)) continue;
        MatmulCase c;
        c.path = path; c.transpose = tr; c.m = m; c.dt = DType::kFloat32; c.nested = true; c.rank = 16;
        c.n = tr ? 4096 : 40; c.k = tr ? 64 : 4096; c.splits = 1;
        check_matmul(c);
        c.splits = 0;
        check_matmul(c);
      }
    }
  }
}

int main(int argc, char** argv) {
  const std::string group = argc > 1 ? argv[1] : "all";
  cpu::select_cpu_kernels(cpu::CpuIsa::kAvx512Bf16); // as the library does at load
  g_rng.seed(argc > 2 ? std::atoi(argv[2]) : 1234);
  if (argc > 3) lora_emu::g_policy = std::atoi(argv[3]);
  const auto want = [&](const char* g) { return group == "all" || group == g; };
  if (want("mask")) run_mask();
  if (want("edge")) run_edge();
  if (want("lora")) run_lora();
  if (want("window")) run_window();
  if (want("dispatch")) run_dispatch();
  if (want("decode")) run_decode_predicates();
  if (want("decode")) run_decode();
  if (want("decode_t")) run_decode_t();
  if (want("ffma")) run_ffma();
  if (want("long")) run_long();
  if (want("mma")) run_mma();
  if (want("tc_decode")) run_tc_decode_predicates();
  if (want("tc_decode")) run_tc_decode();
  if (want("tc_decode")) run_tc_decode_t();
  std::printf("emulated CUDA QLoRA kernels (%s, schedule %d) vs CPU kernels: %d checks, %d failures (%lld CTAs run)\n",
              group.c_str(), lora_emu::g_policy, g_checks, g_failures, lora_emu::g_ctas);
  return g_failures == 0 ? 0 : 1;
}
