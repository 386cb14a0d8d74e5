#include "bindings/weight_arg.h"

#include "bindings/tensor_checks.h"

namespace lora_ops {
Nf4WeightArg nf4_weight_arg(at::TensorList w, at::IntArrayRef w_meta, const char* op) {
  TORCH_CHECK_VALUE(w.size() == 2 || w.size() == 5, op,
                    ": the NF4 weight must be 2 tensors (packed, absmax) or 5 (packed, absmax codes, absmax2, "
                    "nested_code, offset), got ",
                    w.size());
  TORCH_CHECK_VALUE(w_meta.size() >= 2, op, ": w_meta must be [blocksize, *shape] with a shape of at least one ",
                    "dimension (0-d weights are not stored), got ", w_meta);
  const int64_t blocksize = w_meta[0];
  check_blocksize(blocksize, op);
  int64_t numel = 1;
  for (int64_t d : w_meta.slice(1)) {
    TORCH_CHECK(d >= 0, op, ": negative dimension in shape ", w_meta.slice(1));
    numel *= d;
  }
  TORCH_CHECK(numel > 0, op, ": the weight must have at least one element");
  const at::Tensor& packed = w[0];
  const at::Tensor& absmax = w[1];
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed weight must be uint8, got ",
                   packed.scalar_type(), " (view other storage dtypes as uint8 first)");
  TORCH_CHECK(packed.numel() == (numel + 1) / 2, op, ": packed weight has ", packed.numel(), " bytes, a weight of ",
              numel, " elements needs ", (numel + 1) / 2, " (the shape does not match the quantized weight)");
  TORCH_CHECK(packed.is_contiguous(), op, ": packed weight must be contiguous");
  Nf4WeightArg arg{Nf4Weight{}, std::vector<int64_t>(w_meta.begin() + 1, w_meta.end()), packed.device()};
  Nf4Weight& k = arg.kernel;
  k.packed = packed.data_ptr<uint8_t>();
  k.numel = numel;
  k.blocksize = static_cast<int32_t>(blocksize);
  const int64_t n_blocks = k.n_blocks();
  if (absmax.scalar_type() == at::kFloat) {
    TORCH_CHECK(w.size() == 2, op,
                ": absmax is float32 (plain) but nested absmax2/offset were given; pass uint8 absmax codes");
    check_tensor(absmax, at::kFloat, n_blocks, packed, op, "absmax");
    k.absmax = absmax.data_ptr<float>();
    return arg;
  }
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kByte, op,
                   ": absmax must be float32 (plain) or uint8 (double-quantized), got ", absmax.scalar_type());
  TORCH_CHECK(w.size() == 5, op, ": absmax is uint8 (double-quantized): absmax2, nested_code and offset are required");
  check_tensor(absmax, at::kByte, n_blocks, packed, op, "absmax");
  check_tensor(w[2], at::kFloat, (n_blocks + kNestedBlocksize - 1) / kNestedBlocksize, packed, op, "absmax2");
  check_tensor(w[3], at::kFloat, 256, packed, op, "nested_code");
  check_tensor(w[4], at::kFloat, 1, packed, op, "offset"); // any shape of one element ([] or [1])
  k.qabsmax = absmax.data_ptr<uint8_t>();
  k.absmax2 = w[2].data_ptr<float>();
  k.nested_code = w[3].data_ptr<float>();
  k.offset = w[4].data_ptr<float>();
  return arg;
}

} // namespace lora_ops
