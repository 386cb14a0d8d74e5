// adamw_step_ and adamw_step_pages_ (schemas: csrc/torch_bindings.cpp): validation, and the folding
// of each hparams row as torch.optim.AdamW does (in float64, then rounded to float32 once).
#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <vector>

#include "bindings/ops.h"
#include "bindings/tensor_checks.h"

namespace lora_ops {
namespace {

// Number of float64 columns of `hparams`: lr, beta1, beta2, weight_decay, eps, step, maximize.
constexpr int64_t kAdamwHparamCols = 7;
// Columns of the int64 `pieces` table of adamw_step_pages_: param index, begin, end (elements of the
// flattened param), slot (first index of `pages`), offset (element offset inside the slot's page).
constexpr int64_t kAdamwPieceCols = 5;

void check_member(const at::Tensor& t, const at::Tensor& ref, at::ScalarType dtype, int64_t i, const char* list,
                  const char* op) {
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, op, ": ", list, "[", i, "] is ", t.layout(),
                   "; sparse tensors are not supported");
  TORCH_CHECK_TYPE(!t.is_complex(), op, ": ", list, "[", i, "] is complex; complex tensors are not supported");
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", list, "[", i, "] must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == ref.numel(), op, ": ", list, "[", i, "] has ", t.numel(), " elements but params[", i,
              "] has ", ref.numel());
  TORCH_CHECK(t.is_contiguous(), op, ": ", list, "[", i, "] must be contiguous");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", list, "[", i, "] is on ", t.device(), " but params[", i, "] is on ",
              ref.device());
}

// torch.optim.AdamW's scalars for one tensor (_single_tensor_adam, decoupled weight decay): computed
// in float64 as Python does, each rounded once to float32 where torch hands it to a float32 kernel.
AdamwHyper fold_hparams(const double* row, int64_t i, const char* op) {
  const double lr = row[0], beta1 = row[1], beta2 = row[2], wd = row[3], eps = row[4], step = row[5];
  TORCH_CHECK_VALUE(step >= 1, op, ": hparams[", i, "] step must be >= 1 (it counts this update), got ", step);
  TORCH_CHECK_VALUE(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, op, ": hparams[", i,
                    "] betas must be in [0, 1), got (", beta1, ", ", beta2, ")");
  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double bias_correction2 = 1 - std::pow(beta2, step);
  AdamwHyper h;
  h.decay = static_cast<float>(1 - lr * wd);
  h.w1 = static_cast<float>(1 - beta1);
  h.beta2 = static_cast<float>(beta2);
  h.omb2 = static_cast<float>(1 - beta2);
  h.bc2_sqrt = static_cast<float>(std::pow(bias_correction2, 0.5)); // Python's `** 0.5`
  h.eps = static_cast<float>(eps);
  h.neg_step_size = static_cast<float>(-(lr / bias_correction1));
  h.maximize = row[6] != 0 ? 1 : 0;
  return h;
}

void check_lists_and_hparams(at::TensorList params, at::TensorList grads, const at::Tensor& hparams,
                             c10::DeviceType device_type, const char* op) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(grads.size()) == n, op, ": params and grads must have the same length, got ",
                    n, " and ", grads.size());
  TORCH_CHECK_TYPE(hparams.scalar_type() == at::kDouble, op, ": hparams must be float64, got ", hparams.scalar_type());
  TORCH_CHECK(hparams.device().is_cpu(), op, ": hparams must be a CPU tensor (it is read on the host)");
  TORCH_CHECK_VALUE(hparams.dim() == 2 && hparams.size(0) == n && hparams.size(1) == kAdamwHparamCols, op,
                    ": hparams must be [len(params), ", kAdamwHparamCols,
                    "] (lr, beta1, beta2, weight_decay, eps, step, maximize), got ", hparams.sizes());
  if (n > 0) {
    TORCH_CHECK(params[0].device().type() == device_type, op, ": params[0] is on ", params[0].device(),
                " but this kernel is for ", device_type);
  }
}

// Checks params[i] and grads[i] and returns the folded hyper-parameters of row i.
AdamwHyper check_param(at::TensorList params, at::TensorList grads, const double* hparam_rows, int64_t i,
                       const char* op) {
  const at::Tensor& p = params[i];
  TORCH_CHECK_TYPE(!p.is_complex(), op, ": params[", i, "] is complex; complex parameters are not supported");
  TORCH_CHECK_TYPE(p.layout() == at::kStrided, op, ": params[", i, "] must be a strided (dense) tensor");
  TORCH_CHECK(p.is_contiguous(), op, ": params[", i, "] must be contiguous");
  TORCH_CHECK(p.device() == params[0].device(), op, ": params[", i, "] is on ", p.device(), " but params[0] is on ",
              params[0].device(), "; call the op once per device");
  kernel_dtype(p.scalar_type(), op, "params");
  check_member(grads[i], p, p.scalar_type(), i, "grads", op);
  return fold_hparams(hparam_rows + i * kAdamwHparamCols, i, op);
}

void run(const Backend& be, std::vector<AdamwTensor>& tensors, std::vector<AdamwHyper>& hypers,
         const at::Tensor& ref) {
  if (tensors.empty())
    return;
  const c10::DeviceGuard guard(ref.device());
  AdamwStepParams sp;
  sp.tensors = tensors.data();
  sp.n_tensors = static_cast<int64_t>(tensors.size());
  sp.hypers = hypers.data();
  sp.n_hypers = static_cast<int64_t>(hypers.size());
  be.adamw_step(sp);
}

} // namespace

void adamw_step_op(const Backend& be, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, const at::Tensor& hparams) {
  constexpr const char* op = "adamw_step_";
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(exp_avgs.size()) == n && static_cast<int64_t>(exp_avg_sqs.size()) == n, op,
                    ": params, grads, exp_avgs and exp_avg_sqs must have the same length, got ", n, ", ", grads.size(),
                    ", ", exp_avgs.size(), ", ", exp_avg_sqs.size());
  check_lists_and_hparams(params, grads, hparams, be.device_type, op);
  const at::Tensor hp = hparams.contiguous();
  std::vector<AdamwHyper> hypers;
  std::vector<AdamwTensor> tensors;
  hypers.reserve(n);
  tensors.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    hypers.push_back(check_param(params, grads, hp.data_ptr<double>(), i, op));
    check_member(exp_avgs[i], p, at::kFloat, i, "exp_avgs", op);
    check_member(exp_avg_sqs[i], p, at::kFloat, i, "exp_avg_sqs", op);
    if (p.numel() == 0)
      continue;
    AdamwTensor t;
    t.param = p.data_ptr();
    t.grad = grads[i].data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr<float>();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    t.numel = p.numel();
    t.hyper = static_cast<int32_t>(i);
    t.dtype = kernel_dtype(p.scalar_type(), op, "params");
    tensors.push_back(t);
  }
  if (n > 0)
    run(be, tensors, hypers, params[0]);
}

void adamw_step_pages_op(const Backend& be, at::TensorList params, at::TensorList grads, at::Tensor& pages,
                         const at::Tensor& pieces, const at::Tensor& hparams) {
  constexpr const char* op = "adamw_step_pages_";
  check_lists_and_hparams(params, grads, hparams, be.device_type, op);
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK_TYPE(pages.scalar_type() == at::kFloat, op, ": pages must be float32, got ", pages.scalar_type());
  TORCH_CHECK_VALUE(pages.dim() == 3 && pages.size(1) == 2, op, ": pages must be [n_slots, 2, page_elems], got ",
                    pages.sizes());
  TORCH_CHECK(pages.is_contiguous(), op, ": pages must be contiguous");
  TORCH_CHECK_TYPE(pieces.scalar_type() == at::kLong, op, ": pieces must be int64, got ", pieces.scalar_type());
  TORCH_CHECK(pieces.device().is_cpu(), op, ": pieces must be a CPU tensor (it is read on the host)");
  TORCH_CHECK_VALUE(pieces.dim() == 2 && pieces.size(1) == kAdamwPieceCols, op, ": pieces must be [n, ",
                    kAdamwPieceCols, "] (param, begin, end, slot, offset), got ", pieces.sizes());
  if (n == 0 || pieces.size(0) == 0)
    return;
  TORCH_CHECK(pages.device() == params[0].device(), op, ": pages is on ", pages.device(), " but params[0] is on ",
              params[0].device());
  const int64_t n_slots = pages.size(0), page_elems = pages.size(2);
  float* base = pages.data_ptr<float>();
  const at::Tensor pc = pieces.contiguous();
  const int64_t* rows = pc.data_ptr<int64_t>();
  const at::Tensor hp = hparams.contiguous();
  // Only the params that pieces name are checked (and their rows folded): a per-page call names a few.
  std::vector<AdamwHyper> hypers(n);
  std::vector<char> checked(n, 0);
  std::vector<AdamwTensor> tensors;
  tensors.reserve(pc.size(0));
  for (int64_t r = 0; r < pc.size(0); ++r) {
    const int64_t* row = rows + r * kAdamwPieceCols;
    const int64_t i = row[0], begin = row[1], end = row[2], slot = row[3], offset = row[4];
    TORCH_CHECK_VALUE(i >= 0 && i < n, op, ": pieces[", r, "] names params[", i, "], there are ", n);
    if (!checked[i]) {
      hypers[i] = check_param(params, grads, hp.data_ptr<double>(), i, op);
      checked[i] = 1;
    }
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(0 <= begin && begin <= end && end <= p.numel(), op, ": pieces[", r, "] range [", begin, ", ", end,
                      ") is outside params[", i, "] (", p.numel(), " elements)");
    TORCH_CHECK_VALUE(slot >= 0 && slot < n_slots && offset >= 0 && offset + (end - begin) <= page_elems, op,
                      ": pieces[", r, "] (slot ", slot, ", offset ", offset, ", ", end - begin,
                      " elements) does not fit pages ", pages.sizes());
    if (end == begin)
      continue;
    const int64_t elem = p.element_size();
    float* page = base + slot * 2 * page_elems;
    AdamwTensor t;
    t.param = static_cast<char*>(p.data_ptr()) + begin * elem;
    t.grad = static_cast<const char*>(grads[i].data_ptr()) + begin * elem;
    t.exp_avg = page + offset;
    t.exp_avg_sq = page + page_elems + offset;
    t.numel = end - begin;
    t.hyper = static_cast<int32_t>(i);
    t.dtype = kernel_dtype(p.scalar_type(), op, "params");
    tensors.push_back(t);
  }
  run(be, tensors, hypers, params[0]);
}

} // namespace lora_ops
