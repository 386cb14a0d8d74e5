// CPU registrations of the fused multi-tensor AdamW step (list and page-table forms).
#include <torch/library.h>

#include "bindings/adamw_ops.h"
#include "cpu/adamw_cpu.h"

namespace lora_ops {
namespace {

void step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
          const at::Tensor& hparams) {
  adamw_step_op(params, grads, exp_avgs, exp_avg_sqs, hparams, c10::DeviceType::CPU,
                [](const AdamwStepParams& p, const at::Tensor&) { cpu::adamw_step(p); });
}

void step_pages(at::TensorList params, at::TensorList grads, at::Tensor& pages, const at::Tensor& pieces,
                const at::Tensor& hparams) {
  adamw_step_pages_op(params, grads, pages, pieces, hparams, c10::DeviceType::CPU,
                      [](const AdamwStepParams& p, const at::Tensor&) { cpu::adamw_step(p); });
}

} // namespace

TORCH_LIBRARY_IMPL(lora_ops, CPU, m) {
  m.impl("adamw_step_", &step);
  m.impl("adamw_step_pages_", &step_pages);
}

} // namespace lora_ops
