// The seam between bindings and the per-row multi-adapter LoRA kernels (serving: each row of x picks its
// adapter from a pool). Plain structs of raw pointers, sizes and strides; nothing here knows about torch.
//
// With x viewed as [M, K] and a pool of C adapter slots, ranks[c] in 0..r_max (0: empty slot):
//
//   y[m] = base[m] + scale[c] · (x[m] · A[c][:r_c]ᵀ) · Bt[c][:r_c]      c = ids[m]; ids[m] < 0 or
//                                                                        ranks[c] == 0: y[m] = base[m]
// A pool [C, r_max, K], Bt pool [C, r_max, N] (B transposed: a rank index selects a contiguous output row,
// so the up-projection is a run of axpys over contiguous outputs). Only the first ranks[c] rank rows of a
// slot are read: a small adapter in a pool of r_max costs its own rank.
//
// Numerics: `out` holds the base term (x·Wᵀ + bias, already rounded to x's dtype by qlora_matmul) on entry;
// the kernel widens it to fp32, adds the LoRA term accumulated in fp32 and rounds once more. Per row the
// result depends only on that row's x, base and adapter, never on other rows or other slots.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace lora_ops {

struct MultiLoraParams {
  int64_t m = 0;     // rows of x / out
  int64_t n = 0;     // N = out_features
  int64_t k = 0;     // K = in_features
  int64_t slots = 0; // C = pool capacity
  int32_t r_max = 0; // rank rows per slot in the pool tensors

  const void* x = nullptr;          // [M, K]
  DType x_dtype = DType::kBFloat16; // fp32 / fp16 / bf16; also out's dtype
  int64_t x_row_stride = 0;         // elements between rows of x
  int64_t x_col_stride = 1;         // elements between columns of x

  void* out = nullptr;        // [M, N] in x_dtype, column stride 1: the base term in, the layer's output out
  int64_t out_row_stride = 0; // elements between rows of out

  const void* a_pool = nullptr;         // [C, r_max, K] contiguous
  DType a_dtype = DType::kFloat32;      // x_dtype or fp32
  const void* bt_pool = nullptr;        // [C, r_max, N] contiguous (Bᵀ per slot)
  DType b_dtype = DType::kFloat32;      // x_dtype or fp32
  const float* scales = nullptr;        // [C]
  const int32_t* ranks = nullptr;       // [C], each in 0..r_max
  const int64_t* ids = nullptr;         // [M]: slot of each row, negative for the base alone
};

} // namespace lora_ops
