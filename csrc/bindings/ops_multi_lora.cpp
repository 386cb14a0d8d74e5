// multi_lora_linear (schema and math: csrc/torch_bindings.cpp, csrc/kernels/common/multi_lora_params.h):
// validation, then the base term through lora_ops::qlora_matmul ONCE for all rows (whatever path the CPU
// dispatcher picks for this M: fused row-dot at decode sizes, the slab GEMM at large M), then the per-row
// LoRA term by cpu::multi_lora_add; a batch whose rows all name one loaded adapter is qlora_linear itself.
// The CPU registration is here so register_cpu.cpp stays as it is.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <optional>
#include <vector>

#include "bindings/ops_multi_lora.h"
#include "bindings/tensor_checks.h"
#include "common/qlora_params.h"
#include "cpu/multi_lora_cpu.h"

namespace lora_ops {
namespace {

constexpr const char* kOp = "multi_lora_linear";

at::Tensor base_matmul(const at::Tensor& x2, at::TensorList w, at::IntArrayRef w_meta,
                       const std::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lora_ops::qlora_matmul", "")
          .typed<at::Tensor(const at::Tensor&, at::TensorList, at::IntArrayRef, bool, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&, double,
                            const std::optional<at::Tensor>&)>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd; // forward only: straight to the kernel
  return op.call(x2, w, w_meta, false, std::nullopt, std::nullopt, 1.0, bias, 0.0, std::nullopt);
}

// Every row on one loaded adapter: the single-adapter fused op itself (its LoRA term inside the base GEMM,
// one rounding), so a batch with one adapter costs what qlora_linear costs.
at::Tensor single_adapter(const at::Tensor& x, at::TensorList w, at::IntArrayRef w_meta, const at::Tensor& A,
                          const at::Tensor& Bt, int64_t slot, int64_t rank, double scale,
                          const std::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lora_ops::qlora_linear", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::TensorList, at::IntArrayRef,
                                                    const at::Tensor&, const at::Tensor&,
                                                    const std::optional<at::Tensor>&, double, double,
                                                    const std::optional<at::Tensor>&)>();
  const at::Tensor a = A.select(0, slot).narrow(0, 0, rank);
  const at::Tensor b = Bt.select(0, slot).narrow(0, 0, rank).t(); // [N, r] view: the op takes any strides
  const at::AutoDispatchBelowADInplaceOrView below_autograd; // the kernel, not qlora_linear's Python autograd
  return std::get<0>(op.call(x, w, w_meta, a, b, bias, scale, 0.0, std::nullopt));
}

DType side_dtype(const at::Tensor& t, const at::Tensor& x, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, kOp, ": ", arg,
                   " must have x's dtype (", x.scalar_type(), ") or float32, got ", t.scalar_type());
  return kernel_dtype(t.scalar_type(), kOp, arg);
}

void check_device(const at::Tensor& t, const at::Tensor& x, const char* arg) {
  TORCH_CHECK(t.device() == x.device(), kOp, ": ", arg, " is on ", t.device(), " but x is on ", x.device(),
              "; move all inputs to one device");
}

} // namespace

at::Tensor multi_lora_linear_op(const at::Tensor& x, at::TensorList w, at::IntArrayRef w_meta, const at::Tensor& A,
                                const at::Tensor& Bt, const at::Tensor& scales, const at::Tensor& ranks,
                                const at::Tensor& adapter_ids, const std::optional<at::Tensor>& bias,
                                void (*add)(const MultiLoraParams&)) {
  const c10::DeviceGuard guard(x.device());
  TORCH_CHECK_VALUE(x.dim() >= 1, kOp, ": x must have at least one dimension [..., K], got a 0-d tensor");
  TORCH_CHECK_VALUE(w_meta.size() == 3, kOp, ": the NF4 weight must be 2-D [N, K], got w_meta ", w_meta);
  const int64_t N = w_meta[1], K = w_meta[2];
  TORCH_CHECK_VALUE(x.size(-1) == K, kOp, ": x has ", x.size(-1), " features but the weight is [", N, ", ", K, "]");
  const DType xt = kernel_dtype(x.scalar_type(), kOp, "x");
  TORCH_CHECK_VALUE(A.dim() == 3 && A.size(2) == K, kOp, ": A must be the pool [capacity, r_max, K] with K = ", K,
                    ", got ", A.sizes());
  const int64_t C = A.size(0), r_max = A.size(1);
  TORCH_CHECK_VALUE(r_max >= 1 && r_max <= kMaxLoraRank, kOp, ": r_max must be in 1..", kMaxLoraRank, ", got ",
                    r_max);
  TORCH_CHECK_VALUE(Bt.dim() == 3 && Bt.size(0) == C && Bt.size(1) == r_max && Bt.size(2) == N, kOp,
                    ": Bt must be the pool [capacity, r_max, N] = [", C, ", ", r_max, ", ", N,
                    "] (B transposed per slot), got ", Bt.sizes());
  TORCH_CHECK_VALUE(A.is_contiguous() && Bt.is_contiguous(), kOp, ": the A and Bt pools must be contiguous");
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == C && scales.scalar_type() == at::kFloat, kOp,
                    ": scales must be float32 [capacity = ", C, "], got ", scales.scalar_type(), " ", scales.sizes());
  TORCH_CHECK_VALUE(ranks.dim() == 1 && ranks.size(0) == C && ranks.scalar_type() == at::kInt, kOp,
                    ": ranks must be int32 [capacity = ", C, "], got ", ranks.scalar_type(), " ", ranks.sizes());
  const int64_t M = x.numel() / K;
  TORCH_CHECK_VALUE(adapter_ids.scalar_type() == at::kLong && adapter_ids.numel() == M, kOp,
                    ": adapter_ids must be int64 with one id per row of x (", M, "), got ",
                    adapter_ids.scalar_type(), " ", adapter_ids.sizes());
  for (const auto& [t, arg] : {std::pair{A, "A"}, {Bt, "Bt"}, {scales, "scales"}, {ranks, "ranks"},
                               {adapter_ids, "adapter_ids"}})
    check_device(t, x, arg);
  MultiLoraParams p;
  p.a_dtype = side_dtype(A, x, "A");
  p.b_dtype = side_dtype(Bt, x, "Bt");

  // The kernels read the device tensors; the checks (and the one-adapter test) read host copies (a copy, and
  // a synchronization, on CUDA only).
  const at::Tensor ids = adapter_ids.reshape({M}).contiguous();
  const at::Tensor rk = ranks.contiguous(), sc = scales.contiguous();
  const at::Tensor ids_h = ids.cpu(), rk_h = rk.cpu(), sc_h = sc.cpu();
  const int64_t* idp = ids_h.data_ptr<int64_t>();
  const int32_t* rp = rk_h.data_ptr<int32_t>();
  for (int64_t c = 0; c < C; ++c)
    TORCH_CHECK_VALUE(rp[c] >= 0 && rp[c] <= r_max, kOp, ": ranks[", c, "] = ", rp[c], " is outside 0..r_max = ",
                      r_max);
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK_VALUE(idp[m] >= -1 && idp[m] < C, kOp, ": adapter_ids[", m, "] = ", idp[m],
                      " is not a slot of the pool (0..", C - 1, ") or -1 (the base alone)");
  const float* sp = sc_h.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c)
    TORCH_CHECK_VALUE(rp[c] == 0 || std::isfinite(sp[c]), kOp, ": scales[", c, "] = ", sp[c], " is not finite");

  if (M > 0 && idp[0] >= 0 && rp[idp[0]] > 0 && std::all_of(idp, idp + M, [&](int64_t c) { return c == idp[0]; }))
    return single_adapter(x, w, w_meta, A, Bt, idp[0], rp[idp[0]], sp[idp[0]], bias);

  const at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, K});
  at::Tensor y2 = base_matmul(x2, w, w_meta, bias); // [M, N] in x's dtype, contiguous
  if (M > 0) {
    p.m = M;
    p.n = N;
    p.k = K;
    p.slots = C;
    p.r_max = static_cast<int32_t>(r_max);
    p.x = x2.data_ptr();
    p.x_dtype = xt;
    p.x_row_stride = x2.stride(0);
    p.x_col_stride = x2.stride(1);
    p.out = y2.data_ptr();
    p.out_row_stride = y2.stride(0);
    p.a_pool = A.data_ptr();
    p.bt_pool = Bt.data_ptr();
    p.scales = sc.data_ptr<float>();
    p.ranks = rk.data_ptr<int32_t>();
    p.ids = ids.data_ptr<int64_t>();
    add(p);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y2.view(shape);
}

namespace {

at::Tensor multi_lora_linear_cpu(const at::Tensor& x, at::TensorList w, at::IntArrayRef w_meta, const at::Tensor& A,
                                 const at::Tensor& Bt, const at::Tensor& scales, const at::Tensor& ranks,
                                 const at::Tensor& adapter_ids, const std::optional<at::Tensor>& bias) {
  return multi_lora_linear_op(x, w, w_meta, A, Bt, scales, ranks, adapter_ids, bias, &cpu::multi_lora_add);
}

} // namespace

TORCH_LIBRARY_IMPL(lora_ops, CPU, m) { m.impl("multi_lora_linear", &multi_lora_linear_cpu); }

} // namespace lora_ops
