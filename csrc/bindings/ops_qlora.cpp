#include <ATen/ATen.h>

#include <cmath>

#include "bindings/qlora_ops.h"
#include "bindings/tensor_checks.h"

namespace lora_ops {
namespace {

DType qlora_dtype(at::ScalarType t, bool allow_f64, const char* op, const char* arg) {
  if (t == at::kDouble) {
    TORCH_CHECK_TYPE(allow_f64, op, ": ", arg,
                     " is float64, which only the CPU path supports (for gradcheck); "
                     "use float32, float16 or bfloat16");
    return DType::kFloat64;
  }
  return kernel_dtype(t, op, arg);
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

Nf4Weight make_weight(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                      const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& nested_code,
                      const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t n, int64_t k,
                      const char* op) {
  TORCH_CHECK_VALUE(n > 0 && k > 0, op, ": out_features and in_features must be positive, got ", n, " and ", k);
  TORCH_CHECK_VALUE(packed.numel() == (n * k + 1) / 2, op, ": the NF4 weight holds ", packed.numel(), " bytes but a [",
                    n, ", ", k, "] weight needs ", (n * k + 1) / 2,
                    " (in_features / out_features do not match the quantized weight)");
  check_device(packed, x, op, "packed weight");
  return make_nf4_weight(packed, absmax, absmax2, nested_code, offset, blocksize, n * k, op);
}

void check_scale(double scale, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

} // namespace

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

std::tuple<at::Tensor, at::Tensor>
qlora_linear_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& nested_code,
                const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features, const at::Tensor& A,
                const at::Tensor& B, const std::optional<at::Tensor>& bias, double scale, double dropout_p,
                const std::optional<at::Tensor>& rng, const QloraBackend& be) {
  constexpr const char* op = "qlora_linear";
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension [..., K]");
  const DType xt = qlora_dtype(x.scalar_type(), be.supports_float64, op, "x");
  const int64_t K = x.size(-1), N = out_features;
  check_scale(scale, op);
  TORCH_CHECK_VALUE(A.dim() == 2 && A.size(1) == K, op, ": A must be [r, K] with K = ", K, " (x's last dim), got ",
                    A.sizes());
  const int64_t r = A.size(0);
  TORCH_CHECK_VALUE(r >= 1 && r <= kMaxLoraRank, op, ": rank must be in 1..", kMaxLoraRank, ", got ", r);
  TORCH_CHECK_VALUE(B.dim() == 2 && B.size(1) == r, op, ": B must be [N, r] with the rank of A (r = ", r, "), got ",
                    B.sizes(), " (rank mismatch between A and B)");
  TORCH_CHECK_VALUE(B.size(0) == N, op, ": B must be [N, r] with N = out_features = ", N, ", got ", B.sizes());
  const DType at_ = side_dtype(A, x, op, "A");
  const DType bt = side_dtype(B, x, op, "B");
  check_device(A, x, op, "A");
  check_device(B, x, op, "B");
  QloraMatmulParams mp;
  mp.weight = make_weight(x, packed, absmax, absmax2, nested_code, offset, blocksize, N, K, op);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [N = ", N, "], got ", bias->sizes());
    check_device(*bias, x, op, "bias");
    mp.bias_dtype = side_dtype(*bias, x, op, "bias");
  }
  const DropoutParams drop = make_dropout(dropout_p, rng, K, op);

  const at::Tensor x2 = rows_view(x, K);
  const int64_t M = x2.size(0);
  const auto acc_type = xt == DType::kFloat64 ? at::kDouble : at::kFloat;
  at::Tensor y = new_output(out_shape(x, N), x.options());
  at::Tensor s = new_output({M, r}, x.options().dtype(acc_type));
  if (M == 0)
    return {y, s};
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();

  LoraDownParams dp;
  dp.m = M;
  dp.l = K;
  dp.rank = static_cast<int32_t>(r);
  dp.a = x2.data_ptr();
  dp.a_dtype = xt;
  dp.a_row_stride = x2.stride(0);
  dp.a_col_stride = x2.stride(1);
  dp.f = A.data_ptr();
  dp.f_dtype = at_;
  dp.f_stride_q = A.stride(0);
  dp.f_stride_l = A.stride(1);
  dp.out = s.data_ptr();
  dp.out_row_stride = r;
  dp.dropout = drop;
  be.down(dp);

  mp.n = N;
  mp.k = K;
  mp.transpose_w = false;
  mp.m = M;
  mp.a = x2.data_ptr();
  mp.a_dtype = xt;
  mp.a_row_stride = x2.stride(0);
  mp.a_col_stride = x2.stride(1);
  mp.out = y.data_ptr();
  mp.out_row_stride = N;
  mp.rank = static_cast<int32_t>(r);
  mp.lora_s = s.data_ptr();
  mp.lora_s_row_stride = r;
  mp.lora_w = B.data_ptr();
  mp.lora_w_dtype = bt;
  mp.lora_w_stride_o = B.stride(0);
  mp.lora_w_stride_q = B.stride(1);
  mp.scale = scale;
  mp.bias = bias.has_value() ? bias_c.data_ptr() : nullptr;
  be.matmul(mp);
  return {y, s};
}

at::Tensor qlora_matmul_op(const at::Tensor& a, const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features,
                           int64_t in_features, bool transpose_w, const std::optional<at::Tensor>& lora_s,
                           const std::optional<at::Tensor>& lora_w, double scale, const std::optional<at::Tensor>& bias,
                           double dropout_p, const std::optional<at::Tensor>& rng, const QloraBackend& be) {
  constexpr const char* op = "qlora_matmul";
  TORCH_CHECK_VALUE(a.dim() >= 1, op, ": a must have at least one dimension");
  const DType xt = qlora_dtype(a.scalar_type(), be.supports_float64, op, "a");
  const int64_t N = out_features, K = in_features;
  const int64_t n_in = transpose_w ? N : K, n_out = transpose_w ? K : N;
  TORCH_CHECK_VALUE(a.size(-1) == n_in, op, ": a must be [..., ", n_in, "] (", transpose_w ? "out" : "in",
                    "_features), got ", a.sizes());
  check_scale(scale, op);
  QloraMatmulParams mp;
  mp.weight = make_weight(a, packed, absmax, absmax2, nested_code, offset, blocksize, N, K, op);
  const at::Tensor a2 = rows_view(a, n_in);
  const int64_t M = a2.size(0);
  const auto acc_type = xt == DType::kFloat64 ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(lora_s.has_value() == lora_w.has_value(), op, ": give both lora_s and lora_w, or neither");
  at::Tensor s_c;
  if (lora_s.has_value()) {
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
    s_c = lora_s->stride(1) == 1 ? *lora_s : lora_s->contiguous();
    mp.rank = static_cast<int32_t>(r);
    mp.lora_s = s_c.data_ptr();
    mp.lora_s_row_stride = s_c.stride(0);
    mp.lora_w = lora_w->data_ptr();
    mp.lora_w_dtype = side_dtype(*lora_w, a, op, "lora_w");
    mp.lora_w_stride_o = lora_w->stride(0);
    mp.lora_w_stride_q = lora_w->stride(1);
  }
  at::Tensor bias_c;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n_out, op, ": bias must be [", n_out, "], got ",
                      bias->sizes());
    check_device(*bias, a, op, "bias");
    mp.bias_dtype = side_dtype(*bias, a, op, "bias");
    bias_c = bias->contiguous();
    mp.bias = bias_c.data_ptr();
  }
  mp.dropout = make_dropout(dropout_p, rng, K, op);
  TORCH_CHECK_VALUE(!mp.dropout.enabled() || transpose_w, op,
                    ": dropout applies to the LoRA term only in the transposed (dx) form; the forward applies it "
                    "when computing lora_s");
  at::Tensor out = new_output(out_shape(a, n_out), a.options());
  if (M == 0)
    return out;
  mp.n = N;
  mp.k = K;
  mp.transpose_w = transpose_w;
  mp.m = M;
  mp.a = a2.data_ptr();
  mp.a_dtype = xt;
  mp.a_row_stride = a2.stride(0);
  mp.a_col_stride = a2.stride(1);
  mp.out = out.data_ptr();
  mp.out_row_stride = n_out;
  mp.scale = scale;
  be.matmul(mp);
  return out;
}

at::Tensor lora_down_op(const at::Tensor& a, const at::Tensor& f, double dropout_p,
                        const std::optional<at::Tensor>& rng, const QloraBackend& be) {
  constexpr const char* op = "lora_down";
  TORCH_CHECK_VALUE(a.dim() >= 1, op, ": a must have at least one dimension [..., l]");
  const DType xt = qlora_dtype(a.scalar_type(), be.supports_float64, op, "a");
  const int64_t L = a.size(-1);
  TORCH_CHECK_VALUE(f.dim() == 2 && f.size(1) == L, op, ": f must be [r, ", L, "] (a's last dim), got ", f.sizes());
  const int64_t r = f.size(0);
  TORCH_CHECK_VALUE(r >= 1 && r <= kMaxLoraRank, op, ": rank must be in 1..", kMaxLoraRank, ", got ", r);
  check_device(f, a, op, "f");
  LoraDownParams dp;
  dp.f_dtype = side_dtype(f, a, op, "f");
  dp.dropout = make_dropout(dropout_p, rng, L, op);
  const at::Tensor a2 = rows_view(a, L);
  const int64_t M = a2.size(0);
  at::Tensor out = new_output({M, r}, a.options().dtype(xt == DType::kFloat64 ? at::kDouble : at::kFloat));
  if (M == 0)
    return out;
  dp.m = M;
  dp.l = L;
  dp.rank = static_cast<int32_t>(r);
  dp.a = a2.data_ptr();
  dp.a_dtype = xt;
  dp.a_row_stride = a2.stride(0);
  dp.a_col_stride = a2.stride(1);
  dp.f = f.data_ptr();
  dp.f_stride_q = f.stride(0);
  dp.f_stride_l = f.stride(1);
  dp.out = out.data_ptr();
  dp.out_row_stride = r;
  be.down(dp);
  return out;
}

at::Tensor lora_outer_op(const at::Tensor& left, const at::Tensor& right, double scale, double dropout_p,
                         const std::optional<at::Tensor>& rng, at::ScalarType out_dtype, const QloraBackend& be) {
  constexpr const char* op = "lora_outer";
  TORCH_CHECK_VALUE(left.dim() >= 1 && right.dim() >= 1, op, ": left and right need at least one dimension");
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
  be.outer(op_);
  return out;
}

} // namespace lora_ops
