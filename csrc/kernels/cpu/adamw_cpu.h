// Torch-free CPU (OpenMP) multi-tensor AdamW step. See common/adamw_params.h for the math.
#pragma once
#include "common/adamw_params.h"

namespace lora_ops::cpu {

// Updates every tensor of `p` in place. The work is cut into fixed-size blocks across all tensors,
// so one call keeps every core busy whether it holds one large tensor or thousands of small ones.
void adamw_step(const AdamwStepParams& p);

} // namespace lora_ops::cpu
