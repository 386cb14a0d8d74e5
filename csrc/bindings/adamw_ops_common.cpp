// Validation and hyper-parameter folding of adamw_step_ (see adamw_ops.h).
#include <cmath>
#include <vector>

#include "bindings/adamw_ops.h"

#include <ATen/ops/empty.h>  // tensor_checks.h uses at::empty without including it

#include "bindings/tensor_checks.h"

namespace lora_ops {
namespace {

constexpr const char* kOp = "adamw_step_";

void check_member(const at::Tensor& t, const at::Tensor& ref, at::ScalarType dtype, int64_t i, const char* list) {
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, kOp, ": ", list, "[", i, "] is ", t.layout(),
                   "; sparse tensors are not supported");
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, kOp, ": ", list, "[", i, "] must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK(t.numel() == ref.numel(), kOp, ": ", list, "[", i, "] has ", t.numel(), " elements but params[", i,
              "] has ", ref.numel());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", list, "[", i, "] must be contiguous");
  TORCH_CHECK(t.device() == ref.device(), kOp, ": ", list, "[", i, "] is on ", t.device(), " but params[", i,
              "] is on ", ref.device());
}

// torch.optim.AdamW's scalars for one tensor (_single_tensor_adam, decoupled weight decay): computed
// in float64 as Python does, each rounded once to float32 where torch hands it to a float32 kernel.
AdamwHyper fold_hparams(const double* row, int64_t i) {
  const double lr = row[0], beta1 = row[1], beta2 = row[2], wd = row[3], eps = row[4], step = row[5];
  TORCH_CHECK_VALUE(step >= 1, kOp, ": hparams[", i, "] step must be >= 1 (it counts this update), got ", step);
  TORCH_CHECK_VALUE(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, kOp, ": hparams[", i,
                    "] betas must be in [0, 1), got (", beta1, ", ", beta2, ")");
  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double bias_correction2 = 1 - std::pow(beta2, step);
  AdamwHyper h;
  h.decay = static_cast<float>(1 - lr * wd);
  h.w1 = static_cast<float>(1 - beta1);
  h.beta2 = static_cast<float>(beta2);
  h.omb2 = static_cast<float>(1 - beta2);
  h.bc2_sqrt = static_cast<float>(std::pow(bias_correction2, 0.5));  // Python's `** 0.5`
  h.eps = static_cast<float>(eps);
  h.neg_step_size = static_cast<float>(-(lr / bias_correction1));
  h.maximize = row[6] != 0 ? 1 : 0;
  return h;
}

}  // namespace

void adamw_step_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, const at::Tensor& hparams, c10::DeviceType device_type,
                   AdamwKernel kernel) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(exp_avgs.size()) == n &&
                        static_cast<int64_t>(exp_avg_sqs.size()) == n,
                    kOp, ": params, grads, exp_avgs and exp_avg_sqs must have the same length, got ", n, ", ",
                    grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size());
  TORCH_CHECK_TYPE(hparams.scalar_type() == at::kDouble, kOp, ": hparams must be float64, got ",
                   hparams.scalar_type());
  TORCH_CHECK(hparams.device().is_cpu(), kOp, ": hparams must be a CPU tensor (it is read on the host)");
  TORCH_CHECK_VALUE(hparams.dim() == 2 && hparams.size(0) == n && hparams.size(1) == kAdamwHparamCols, kOp,
                    ": hparams must be [len(params), ", kAdamwHparamCols,
                    "] (lr, beta1, beta2, weight_decay, eps, step, maximize), got ", hparams.sizes());
  if (n == 0) return;
  const at::Tensor hp = hparams.contiguous();
  const double* rows = hp.data_ptr<double>();

  std::vector<AdamwTensor> tensors;
  std::vector<AdamwHyper> hypers;
  tensors.reserve(n);
  hypers.reserve(n);
  const at::Tensor& ref0 = params[0];
  TORCH_CHECK(ref0.device().type() == device_type, kOp, ": params[0] is on ", ref0.device(),
              " but this kernel is for ", device_type);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_TYPE(!p.is_complex(), kOp, ": params[", i, "] is complex; complex parameters are not supported");
    TORCH_CHECK_TYPE(!grads[i].is_complex(), kOp, ": grads[", i, "] is complex; complex gradients are not supported");
    TORCH_CHECK_TYPE(p.layout() == at::kStrided, kOp, ": params[", i, "] must be a strided (dense) tensor");
    TORCH_CHECK(p.is_contiguous(), kOp, ": params[", i, "] must be contiguous");
    TORCH_CHECK(p.device() == ref0.device(), kOp, ": params[", i, "] is on ", p.device(), " but params[0] is on ",
                ref0.device(), "; call the op once per device");
    const DType dt = kernel_dtype(p.scalar_type(), kOp, "params");
    check_member(grads[i], p, p.scalar_type(), i, "grads");
    check_member(exp_avgs[i], p, at::kFloat, i, "exp_avgs");
    check_member(exp_avg_sqs[i], p, at::kFloat, i, "exp_avg_sqs");
    hypers.push_back(fold_hparams(rows + i * kAdamwHparamCols, i));
    if (p.numel() == 0) continue;
    AdamwTensor t;
    t.param = p.data_ptr();
    t.grad = grads[i].data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr<float>();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    t.numel = p.numel();
    t.hyper = static_cast<int32_t>(i);
    t.dtype = dt;
    tensors.push_back(t);
  }
  if (tensors.empty()) return;
  AdamwStepParams sp;
  sp.tensors = tensors.data();
  sp.n_tensors = static_cast<int64_t>(tensors.size());
  sp.hypers = hypers.data();
  sp.n_hypers = static_cast<int64_t>(hypers.size());
  kernel(sp, ref0);
}

}  // namespace lora_ops
