// Fused AdamW step op, shared by the CPU and CUDA registrations: validation and the folding of the
// hyper-parameters happen once here; each backend supplies only the kernel call.
#pragma once
#include <torch/library.h>

#include "common/adamw_params.h"

namespace lora_ops {

// Number of float64 columns of `hparams`: lr, beta1, beta2, weight_decay, eps, step, maximize.
constexpr int64_t kAdamwHparamCols = 7;

// Runs the kernel on validated inputs (`device_ref` is params[0], for the stream/device guard).
using AdamwKernel = void (*)(const AdamwStepParams& p, const at::Tensor& device_ref);

// Validates the lists (same length; per index: same numel; params/grads same float dtype; states
// float32; all contiguous, strided, on one device of type `device_type`), folds each hparams row
// as torch.optim.AdamW does (in float64, then rounded to float32 once) and calls `kernel`.
void adamw_step_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   const at::Tensor& hparams, c10::DeviceType device_type, AdamwKernel kernel);

// Columns of the int64 `pieces` table of adamw_step_pages_: param index, begin, end (elements of the
// flattened param), slot (first index of `pages`), offset (element offset inside the slot's page).
constexpr int64_t kAdamwPieceCols = 5;

// The page-table form: pieces of params whose state lies in `pages` [n_slots, 2, page_elems] float32
// (row 0 exp_avg, row 1 exp_avg_sq). Every piece is bounds-checked; hparams has one row per param.
void adamw_step_pages_op(at::TensorList params, at::TensorList grads, const at::Tensor& pages, const at::Tensor& pieces,
                         const at::Tensor& hparams, c10::DeviceType device_type, AdamwKernel kernel);

} // namespace lora_ops
