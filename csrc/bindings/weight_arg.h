// An NF4 weight as every op receives it, one value: Tensor[] w + int[] w_meta (built by
// lora_ops.NF4Weight.op_args, spec ../shared/spec/nf4-format.md):
//   w      = [packed, absmax]                                    plain: absmax float32 [nb]
//          | [packed, absmax, absmax2, nested_code, offset]       double-quantized: absmax uint8 codes [nb]
//   w_meta = [blocksize, *shape]                                  shape of the original (dequantized) weight
// nf4_weight_arg is the only validator of that value and the only place it becomes the kernels' Nf4Weight.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

#include "common/nf4_params.h"

namespace lora_ops {

struct Nf4WeightArg {
  Nf4Weight kernel;           // raw pointers for the kernels
  std::vector<int64_t> shape; // the weight's shape (w_meta[1:])
  at::Device device;          // where the tensors live (all on one device)
};

// Validates w / w_meta (tensor count, dtypes, sizes against the shape and blocksize, contiguity, one
// device); every message names `op` and the offending part.
Nf4WeightArg nf4_weight_arg(at::TensorList w, at::IntArrayRef w_meta, const char* op);

} // namespace lora_ops
