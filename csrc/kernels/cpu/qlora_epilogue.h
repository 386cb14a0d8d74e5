// The shared epilogue of the CPU matmul paths: the LoRA term (dropout-masked in the dx form), bias and the
// single rounding to the output dtype, applied to 64-column panels of fp32 base products.
#pragma once
#include <cstdint>

#include "common/qlora_params.h"

namespace lora_ops::cpu {

constexpr int kPanel = 64; // output columns per epilogue panel (and per thread task of the matmul paths)

struct Epilogue {
  const QloraMatmulParams& p;
  uint32_t key = 0;

  explicit Epilogue(const QloraMatmulParams& params);

  // lw[q * kPanel + t] = lora_w[o0 + t, q] in fp32 (zero beyond ow).
  void load_lora_panel(int64_t o0, int64_t ow, float* lw) const;

  // Asks for the panel's lora_w rows ahead of load_lora_panel (B in forward, contiguous rows).
  void prefetch_lora_panel(int64_t o0, int64_t ow) const;

  // Finishes row m (global) of the panel: c[t] holds the fp32 base product for columns o0 + t (with
  // lw == nullptr: the LoRA term is in it already, folded into the reduction by the caller).
  void finish_row(int64_t m, int64_t o0, int64_t ow, float* c, const float* lw) const;

  // v *= keep ? keep_scale : 0 for row m, columns [o0, o0 + ow).
  void apply_mask(int64_t m, int64_t o0, int64_t ow, float* v) const;

  // Rounds row m's columns [o0, o0 + ow) once into p.out.
  void store_row(int64_t m, int64_t o0, int64_t ow, const float* c) const;
};

} // namespace lora_ops::cpu
