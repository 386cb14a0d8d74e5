// qlora_linear, qlora_matmul, lora_down, lora_outer, lora_dropout_mask (schemas and math:
// csrc/torch_bindings.cpp, csrc/kernels/common/qlora_params.h): validation, output allocation and the
// tensor -> params translation, once for every device.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <cmath>

#include "bindings/ops.h"
#include "bindings/tensor_checks.h"
#include "bindings/weight_arg.h"

namespace lora_ops {
namespace {

// The float64 policy, stated once: float64 runs only on the CPU (a reference-grade path for
// gradcheck); every message says so, so an int x and a float64 x on CUDA get the same story.
DType qlora_dtype(at::ScalarType t, bool allow_f64, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || (t == at::kDouble && allow_f64), op,
                   ": ", arg, " must be float32, float16 or bfloat16 (float64: CPU only, for gradcheck), got ", t,
                   t == at::kDouble ? " on this device" : "");
  return t == at::kDouble ? DType::kFloat64 : kernel_dtype(t, op, arg);
}

// Adapter / bias tensors: x's dtype or float32 (PEFT keeps adapters in fp32); float64 only with float64 x.
DType side_dtype(const at::Tensor& t, const at::Tensor& x, const char* op, const char* arg) {
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK_TYPE(st == x.scalar_type() || st == at::kFloat, op, ": ", arg, " must have x's dtype (", x.scalar_type(),
                   ") or float32, got ", st);
  return st == at::kFloat ? DType::kFloat32 : qlora_dtype(st, true, op, arg);
}

void check_device(const at::Tensor& t, const at::Tensor& x, const char* op, const char* arg) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", arg, " is on ", t.device(), " but x is on ", x.device(),
              "; move all inputs to one device");
}

// x [..., K] as a 2-D [M, K] view when the strides allow it (else a contiguous copy).
at::Tensor rows_view(const at::Tensor& x, int64_t cols) {
  if (x.dim() == 2)
    return x;
  return x.reshape({-1, cols});
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = last;
  return s;
}

// The NF4 weight of a QLoRA op: a 2-D [N, K] weight on x's device.
Nf4WeightArg qlora_weight(const at::Tensor& x, at::TensorList w, at::IntArrayRef w_meta, const char* op) {
  Nf4WeightArg weight = nf4_weight_arg(w, w_meta, op);
  TORCH_CHECK_VALUE(weight.shape.size() == 2, op, ": the NF4 weight must be 2-D [N, K], got shape ", w_meta.slice(1));
  check_device(w[0], x, op, "packed weight");
  return weight;
}

void check_scale(double scale, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

DropoutParams make_dropout(double dropout_p, const std::optional<at::Tensor>& rng, int64_t cols, const char* op) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  DropoutParams d;
  d.cols = cols;
  d.threshold = dropout_threshold(dropout_p);
  if (d.threshold == 0)
    return d; // p below 2^-24: no dropout at all (keep_scale stays 1)
  TORCH_CHECK_VALUE(rng.has_value(), op, ": dropout_p > 0 needs rng, an int64 tensor [2] = (seed, offset)");
  TORCH_CHECK_TYPE(rng->scalar_type() == at::kLong, op, ": rng must be int64, got ", rng->scalar_type());
  TORCH_CHECK_VALUE(rng->numel() == 2, op, ": rng must hold 2 values (seed, offset), got ", rng->numel());
  TORCH_CHECK(rng->device().is_cpu(), op, ": rng must be a CPU tensor (it is read on the host), got ", rng->device());
  const at::Tensor r = rng->contiguous();
  d.seed = static_cast<uint64_t>(r.data_ptr<int64_t>()[0]);
  d.offset = static_cast<uint64_t>(r.data_ptr<int64_t>()[1]);
  d.keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  return d;
}

// Bias [n_out] in x's dtype or float32, on x's device; returns its kernel dtype.
DType check_bias(const at::Tensor& bias, const at::Tensor& x, int64_t n_out, const char* op) {
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == n_out, op, ": bias must be [", n_out, "], got ", bias.sizes());
  check_device(bias, x, op, "bias");
  return side_dtype(bias, x, op, "bias");
}

// s [M, r] = drop(a2)·fᵀ: a2 [M, l] (2-D view), f [r, l], out [M, r] contiguous.
LoraDownParams down_params(const at::Tensor& a2, DType a_dtype, const at::Tensor& f, DType f_dtype,
                           const at::Tensor& out, const DropoutParams& dropout) {
  LoraDownParams dp;
  dp.m = a2.size(0);
  dp.l = a2.size(1);
  dp.rank = static_cast<int32_t>(f.size(0));
  dp.a = a2.data_ptr();
  dp.a_dtype = a_dtype;
  dp.a_row_stride = a2.stride(0);
  dp.a_col_stride = a2.stride(1);
  dp.f = f.data_ptr();
  dp.f_dtype = f_dtype;
  dp.f_stride_q = f.stride(0);
  dp.f_stride_l = f.stride(1);
  dp.out = out.data_ptr();
  dp.out_row_stride = f.size(0);
  dp.dropout = dropout;
  return dp;
}

// One qlora_matmul call: a2 [M, n_in] (2-D view) times op(W) into out [..., n_out] (contiguous), plus
// the LoRA term scale·s·lora_wᵀ when s is defined (s [M, r] with unit column stride) and bias.
struct MatmulOperands {
  MatmulOperands(const Nf4WeightArg& w, bool t, at::Tensor a, DType d)
      : weight(&w), transpose_w(t), a2(std::move(a)), a_dtype(d) {}
  const Nf4WeightArg* weight;
  bool transpose_w;
  at::Tensor a2;
  DType a_dtype;
  at::Tensor s, lora_w, bias; // undefined: absent
  DType lora_w_dtype = DType::kFloat32, bias_dtype = DType::kFloat32;
  double scale = 1.0;
  DropoutParams dropout;
};

void run_matmul(const Backend& be, const MatmulOperands& o, const at::Tensor& out) {
  QloraMatmulParams mp;
  mp.weight = o.weight->kernel;
  mp.n = o.weight->shape[0];
  mp.k = o.weight->shape[1];
  mp.transpose_w = o.transpose_w;
  mp.m = o.a2.size(0);
  mp.a = o.a2.data_ptr();
  mp.a_dtype = o.a_dtype;
  mp.a_row_stride = o.a2.stride(0);
  mp.a_col_stride = o.a2.stride(1);
  mp.out = out.data_ptr();
  mp.out_row_stride = o.transpose_w ? mp.k : mp.n;
  mp.scale = o.scale;
  mp.dropout = o.dropout;
  if (o.s.defined()) {
    mp.rank = static_cast<int32_t>(o.s.size(1));
    mp.lora_s = o.s.data_ptr();
    mp.lora_s_row_stride = o.s.stride(0);
    mp.lora_w = o.lora_w.data_ptr();
    mp.lora_w_dtype = o.lora_w_dtype;
    mp.lora_w_stride_o = o.lora_w.stride(0);
    mp.lora_w_stride_q = o.lora_w.stride(1);
  }
  if (o.bias.defined()) {
    mp.bias = o.bias.data_ptr();
    mp.bias_dtype = o.bias_dtype;
  }
  be.qlora_matmul(mp);
}

} // namespace

std::tuple<at::Tensor, at::Tensor> qlora_linear_op(const Backend& be, const at::Tensor& x, at::TensorList w,
                                                   at::IntArrayRef w_meta, const at::Tensor& A, const at::Tensor& B,
                                                   const std::optional<at::Tensor>& bias, double scale,
                                                   double dropout_p, const std::optional<at::Tensor>& rng) {
  constexpr const char* op = "qlora_linear";
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension [..., K], got a 0-d tensor");
  const c10::DeviceGuard guard(x.device());
  const Nf4WeightArg weight = qlora_weight(x, w, w_meta, op);
  const int64_t N = weight.shape[0], K = weight.shape[1];
  TORCH_CHECK_VALUE(x.size(-1) == K, op, ": x has ", x.size(-1), " features but the weight is [", N, ", ", K, "]");
  const DType xt = qlora_dtype(x.scalar_type(), be.supports_float64, op, "x");
  check_scale(scale, op);
  TORCH_CHECK_VALUE(A.dim() == 2 && A.size(1) == K, op, ": A must be [r, K] with K = ", K, " (x's last dim), got ",
                    A.sizes());
  const int64_t r = A.size(0);
  TORCH_CHECK_VALUE(r >= 1 && r <= kMaxLoraRank, op, ": rank must be in 1..", kMaxLoraRank, ", got ", r);
  TORCH_CHECK_VALUE(B.dim() == 2 && B.size(1) == r, op, ": B must be [N, r] with the rank of A (r = ", r, "), got ",
                    B.sizes(), " (rank mismatch between A and B)");
  TORCH_CHECK_VALUE(B.size(0) == N, op, ": B must be [N, r] with N = out_features = ", N, ", got ", B.sizes());
  const DType a_dtype = side_dtype(A, x, op, "A");
  check_device(A, x, op, "A");
  check_device(B, x, op, "B");
  MatmulOperands o(weight, /*transpose_w=*/false, rows_view(x, K), xt);
  o.lora_w = B;
  o.lora_w_dtype = side_dtype(B, x, op, "B");
  if (bias.has_value()) {
    o.bias_dtype = check_bias(*bias, x, N, op);
    o.bias = bias->contiguous();
  }
  o.scale = scale;
  const DropoutParams drop = make_dropout(dropout_p, rng, K, op);

  const int64_t M = o.a2.size(0);
  at::Tensor y = new_output(out_shape(x, N), x.options());
  o.s = new_output({M, r}, x.options().dtype(xt == DType::kFloat64 ? at::kDouble : at::kFloat));
  if (M == 0)
    return {y, o.s};
  be.lora_down(down_params(o.a2, xt, A, a_dtype, o.s, drop)); // s = drop(x)·Aᵀ, then y uses it
  run_matmul(be, o, y);
  return {y, o.s};
}

at::Tensor qlora_matmul_op(const Backend& be, const at::Tensor& a, at::TensorList w, at::IntArrayRef w_meta,
                           bool transpose_w, const std::optional<at::Tensor>& lora_s,
                           const std::optional<at::Tensor>& lora_w, double scale, const std::optional<at::Tensor>& bias,
                           double dropout_p, const std::optional<at::Tensor>& rng) {
  constexpr const char* op = "qlora_matmul";
  TORCH_CHECK_VALUE(a.dim() >= 1, op, ": a must have at least one dimension");
  const c10::DeviceGuard guard(a.device());
  const Nf4WeightArg weight = qlora_weight(a, w, w_meta, op);
  const DType xt = qlora_dtype(a.scalar_type(), be.supports_float64, op, "a");
  const int64_t N = weight.shape[0], K = weight.shape[1];
  const int64_t n_in = transpose_w ? N : K, n_out = transpose_w ? K : N;
  TORCH_CHECK_VALUE(a.size(-1) == n_in, op, ": a must be [..., ", n_in, "] (", transpose_w ? "out" : "in",
                    "_features), got ", a.sizes());
  check_scale(scale, op);
  MatmulOperands o(weight, transpose_w, rows_view(a, n_in), xt);
  const int64_t M = o.a2.size(0);
  TORCH_CHECK_VALUE(lora_s.has_value() == lora_w.has_value(), op, ": give both lora_s and lora_w, or neither");
  if (lora_s.has_value()) {
    const auto acc_type = xt == DType::kFloat64 ? at::kDouble : at::kFloat;
    TORCH_CHECK_VALUE(lora_s->dim() == 2 && lora_s->size(0) == M, op, ": lora_s must be [M = ", M, ", r], got ",
                      lora_s->sizes());
    TORCH_CHECK_TYPE(lora_s->scalar_type() == acc_type, op, ": lora_s must be ", acc_type, ", got ",
                     lora_s->scalar_type());
    const int64_t r = lora_s->size(1);
    TORCH_CHECK_VALUE(r >= 1 && r <= kMaxLoraRank, op, ": rank must be in 1..", kMaxLoraRank, ", got ", r);
    TORCH_CHECK_VALUE(lora_w->dim() == 2 && lora_w->size(0) == n_out && lora_w->size(1) == r, op, ": lora_w must be [",
                      n_out, ", r = ", r, "], got ", lora_w->sizes());
    check_device(*lora_s, a, op, "lora_s");
    check_device(*lora_w, a, op, "lora_w");
    o.s = lora_s->stride(1) == 1 ? *lora_s : lora_s->contiguous();
    o.lora_w = *lora_w;
    o.lora_w_dtype = side_dtype(*lora_w, a, op, "lora_w");
  }
  if (bias.has_value()) {
    o.bias_dtype = check_bias(*bias, a, n_out, op);
    o.bias = bias->contiguous();
  }
  o.scale = scale;
  o.dropout = make_dropout(dropout_p, rng, K, op);
  TORCH_CHECK_VALUE(!o.dropout.enabled() || transpose_w, op,
                    ": dropout applies to the LoRA term only in the transposed (dx) form; the forward applies it "
                    "when computing lora_s");
  at::Tensor out = new_output(out_shape(a, n_out), a.options());
  if (M == 0)
    return out;
  run_matmul(be, o, out);
  return out;
}

at::Tensor lora_down_op(const Backend& be, const at::Tensor& a, const at::Tensor& f, double dropout_p,
                        const std::optional<at::Tensor>& rng) {
  constexpr const char* op = "lora_down";
  TORCH_CHECK_VALUE(a.dim() >= 1, op, ": a must have at least one dimension [..., l]");
  const c10::DeviceGuard guard(a.device());
  const DType xt = qlora_dtype(a.scalar_type(), be.supports_float64, op, "a");
  const int64_t L = a.size(-1);
  TORCH_CHECK_VALUE(f.dim() == 2 && f.size(1) == L, op, ": f must be [r, ", L, "] (a's last dim), got ", f.sizes());
  const int64_t r = f.size(0);
  TORCH_CHECK_VALUE(r >= 1 && r <= kMaxLoraRank, op, ": rank must be in 1..", kMaxLoraRank, ", got ", r);
  check_device(f, a, op, "f");
  const DType f_dtype = side_dtype(f, a, op, "f");
  const DropoutParams drop = make_dropout(dropout_p, rng, L, op);
  const at::Tensor a2 = rows_view(a, L);
  at::Tensor out = new_output({a2.size(0), r}, a.options().dtype(xt == DType::kFloat64 ? at::kDouble : at::kFloat));
  if (a2.size(0) == 0)
    return out;
  be.lora_down(down_params(a2, xt, f, f_dtype, out, drop));
  return out;
}

at::Tensor lora_outer_op(const Backend& be, const at::Tensor& left, const at::Tensor& right, double scale,
                         double dropout_p, const std::optional<at::Tensor>& rng, at::ScalarType out_dtype) {
  constexpr const char* op = "lora_outer";
  TORCH_CHECK_VALUE(left.dim() >= 1 && right.dim() >= 1, op, ": left and right need at least one dimension");
  const c10::DeviceGuard guard(left.device());
  const DType lt = qlora_dtype(left.scalar_type(), be.supports_float64, op, "left");
  const DType rt = qlora_dtype(right.scalar_type(), be.supports_float64, op, "right");
  const DType ot = qlora_dtype(out_dtype, be.supports_float64, op, "out_dtype");
  check_device(right, left, op, "right");
  check_scale(scale, op);
  const int64_t P = left.size(-1), Q = right.size(-1);
  const at::Tensor l2 = rows_view(left, P), r2 = rows_view(right, Q);
  TORCH_CHECK_VALUE(l2.size(0) == r2.size(0), op, ": left and right must have the same number of rows, got ",
                    left.sizes(), " and ", right.sizes());
  LoraOuterParams op_;
  op_.dropout = make_dropout(dropout_p, rng, Q, op);
  at::Tensor out = new_output({P, Q}, left.options().dtype(out_dtype));
  if (P == 0 || Q == 0)
    return out;
  op_.m = l2.size(0);
  op_.p = P;
  op_.q = Q;
  op_.left = l2.data_ptr();
  op_.left_dtype = lt;
  op_.left_row_stride = l2.stride(0);
  op_.left_col_stride = l2.stride(1);
  op_.right = r2.data_ptr();
  op_.right_dtype = rt;
  op_.right_row_stride = r2.stride(0);
  op_.right_col_stride = r2.stride(1);
  op_.scale = scale;
  op_.out = out.data_ptr();
  op_.out_dtype = ot;
  be.lora_outer(op_);
  return out;
}

at::Tensor lora_dropout_mask_op(const Backend& be, int64_t rows, int64_t cols, double dropout_p, const at::Tensor& rng) {
  constexpr const char* op = "lora_dropout_mask";
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, op, ": rows and cols must be >= 0, got ", rows, ", ", cols);
  DropoutMaskParams mp;
  mp.rows = rows;
  mp.dropout = make_dropout(dropout_p, rng, cols, op);
  at::Tensor out = new_output({rows, cols}, at::TensorOptions().dtype(at::kBool));
  mp.out = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  be.lora_dropout_mask(mp);
  return out;
}

} // namespace lora_ops
