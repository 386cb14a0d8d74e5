// The seam between bindings and the fused QLoRA linear kernels (CPU and CUDA): plain structs of raw
// pointers, sizes and strides, one comment per field. Nothing here knows about torch.
//
// The layer, with x viewed as [M, K] (leading dims flattened), W = dequant(NF4) [N, K], A [r, K],
// B [N, r], drop(x) = x ∘ mask · keep_scale (common/dropout_rng.h):
//
//   forward    s  = drop(x) · Aᵀ                        LoraDownParams      (a = x, f = A)
//              y  = x · Wᵀ + scale · s · Bᵀ + bias      QloraMatmulParams   (transpose_w = false)
//   backward   u  = dy · B                              LoraDownParams      (a = dy, f = Bᵀ view)
//              dx = dy · W + scale · (u · A) ∘ mask · keep_scale
//                                                       QloraMatmulParams   (transpose_w = true, lora_w = Aᵀ view)
//              dA = scale · uᵀ · drop(x)                LoraOuterParams     (left = u, right = x, dropout on)
//              dB = scale · dyᵀ · s                     LoraOuterParams     (left = dy, right = s, dropout off)
//
// Numerics (architecture.md section 4):
//   - The weight value used at W[n, k] is nf4_decode(code, absmax) ROUNDED ONCE TO THE COMPUTE DTYPE
//     (a_dtype below), i.e. bit-identical to nf4_dequantize(..., dtype = a_dtype). Tensor-core paths
//     need exactly that operand; fp32 paths keep the fp32 product.
//   - Every product accumulates in fp32 (fp64 for the CPU-only float64 path used by gradcheck); the
//     LoRA term and bias are added to the fp32 accumulator and the output is rounded once.
//   - No kernel materializes a dense W or an [M, N] intermediate beyond its own tiles.
//
// Strides are in ELEMENTS. Row = the flattened leading dims of x / dy. Kernels may require a unit
// column stride for some operand (16-byte loads); the binding then passes a contiguous copy.
// Indices and strides are 64-bit: M * K may exceed 2^31.
#pragma once
#include <cstdint>

#include "common/dropout_rng.h"
#include "common/dtype.h"
#include "common/nf4_params.h"

namespace lora_ops {

// Largest LoRA rank the kernels support (fixed-size register / stack tiles of the rank dimension).
// Python states it as lora_ops.format.MAX_LORA_RANK; tests/test_format.py checks that they agree.
constexpr int kMaxLoraRank = 256;

// out[m, o] = Σ_i a[m, i] · Wop[i, o]  +  scale · Σ_q lora_s[m, q] · lora_w[o, q] · drop(m, o)  +  bias[o]
//   transpose_w = false (forward y):    a = x [M, K],  Wop = Wᵀ,  n_in = K, n_out = N, no dropout term
//   transpose_w = true  (backward dx):  a = dy [M, N], Wop = W,   n_in = N, n_out = K, drop = mask·keep_scale
// The same kernel family serves both; W is never stored transposed.
struct QloraMatmulParams {
  Nf4Weight weight;         // W [N, K] row-major flattened, numel = N * K (codes run along K)
  int64_t n = 0;            // N = out_features = rows of W
  int64_t k = 0;            // K = in_features = cols of W
  bool transpose_w = false; // false: out = a · Wᵀ (a has K cols); true: out = a · W (a has N cols)
  int64_t m = 0;            // M = rows of a and out (1 .. 65536+)

  const void* a = nullptr;          // [M, n_in] activations (x forward, dy backward)
  DType a_dtype = DType::kBFloat16; // also the compute dtype: W values are rounded to it, out has it
  int64_t a_row_stride = 0;         // elements between rows of a
  int64_t a_col_stride = 1;         // elements between columns of a (1 unless x was non-contiguous)

  void* out = nullptr;        // [M, n_out] in a_dtype, column stride 1
  int64_t out_row_stride = 0; // elements between rows of out

  // LoRA epilogue (rank == 0: none). lora_s is the already-reduced left factor.
  int32_t rank = 0;                     // r, 0 .. kMaxLoraRank
  const void* lora_s = nullptr;         // [M, r] float32 (double when a_dtype is kFloat64): s = drop(x)·Aᵀ
                                        // (forward) or u = dy·B (backward)
  int64_t lora_s_row_stride = 0;        // elements between rows of lora_s (column stride 1)
  const void* lora_w = nullptr;         // [n_out, r] viewed: B [N, r] (forward) or Aᵀ (backward, A is [r, K])
  DType lora_w_dtype = DType::kFloat32; // a_dtype or float32 (PEFT keeps adapters in fp32)
  int64_t lora_w_stride_o = 0;          // elements between output indices: B: r; Aᵀ view: 1
  int64_t lora_w_stride_q = 1;          // elements between rank indices:   B: 1; Aᵀ view: K
  double scale = 1.0;                   // alpha / r (or alpha / sqrt(r)): fp32 paths round it to float
                                        // once; the float64 path uses it as given

  const void* bias = nullptr;         // [n_out] or nullptr (forward only); frozen, never differentiated
  DType bias_dtype = DType::kFloat32; // a_dtype or float32

  DropoutParams dropout; // backward only: mask of x at (m, o) scales the LoRA term;
                         // dropout.cols == K. Forward passes threshold = 0.
};

// s[m, q] = Σ_l drop(a)[m, l] · f[q, l]     (float32 out [M, r]; a small skinny GEMM)
//   forward s = drop(x)·Aᵀ: a = x [M, K], f = A [r, K], dropout on (cols = K)
//   backward u = dy·B:       a = dy [M, N], f = Bᵀ viewed [r, N] (stride_q = 1, stride_l = r), no dropout
struct LoraDownParams {
  int64_t m = 0;    // M rows of a
  int64_t l = 0;    // reduction length (K forward, N backward)
  int32_t rank = 0; // r, 1 .. kMaxLoraRank

  const void* a = nullptr;          // [M, l] activations
  DType a_dtype = DType::kBFloat16; // fp16 / bf16 / fp32 (fp64 on the CPU gradcheck path)
  int64_t a_row_stride = 0;         // elements between rows of a
  int64_t a_col_stride = 1;         // elements between columns of a

  const void* f = nullptr;         // factor viewed [r, l]
  DType f_dtype = DType::kFloat32; // a_dtype or float32
  int64_t f_stride_q = 0;          // elements between rank indices (A: K; Bᵀ view: 1)
  int64_t f_stride_l = 1;          // elements between reduction indices (A: 1; Bᵀ view: r)

  void* out = nullptr;        // [M, r] float32 (double when a_dtype is kFloat64)
  int64_t out_row_stride = 0; // elements between rows of out (column stride 1)

  DropoutParams dropout; // applied to a at (m, l) when enabled (forward only); cols == l
};

// g[p, q] = scale · Σ_m left[m, p] · drop(right)[m, q]     (reduction over the M rows)
//   dA [r, K] = scale · uᵀ · drop(x):  left = u [M, r] fp32, right = x [M, K], dropout on (cols = K)
//   dB [N, r] = scale · dyᵀ · s:       left = dy [M, N],     right = s [M, r] fp32, dropout off
struct LoraOuterParams {
  int64_t m = 0; // M, the reduction length (may be large: split it and reduce in fp32)
  int64_t p = 0; // rows of g (r for dA, N for dB)
  int64_t q = 0; // cols of g (K for dA, r for dB)

  const void* left = nullptr;         // [M, p]
  DType left_dtype = DType::kFloat32; // fp32 (u) or x's dtype (dy)
  int64_t left_row_stride = 0;        // elements between rows
  int64_t left_col_stride = 1;        // elements between columns

  const void* right = nullptr;         // [M, q]
  DType right_dtype = DType::kFloat32; // x's dtype (x) or fp32 (s)
  int64_t right_row_stride = 0;        // elements between rows
  int64_t right_col_stride = 1;        // elements between columns

  double scale = 1.0;    // multiplies the sum before the single rounding to out_dtype (rounded to
                         // float once on fp32 paths; as given on the float64 path)
  DropoutParams dropout; // applied to right at (m, q) when enabled; cols == q

  void* out = nullptr; // [p, q] row-major contiguous, out_dtype (the adapter's own dtype)
  DType out_dtype = DType::kFloat32;
};

// mask[i, j] = keep(i, j) as bytes 0/1 (tests and debugging; the kernels never store a mask).
struct DropoutMaskParams {
  int64_t rows = 0;       // M
  DropoutParams dropout;  // dropout.cols = row length K
  uint8_t* out = nullptr; // [rows, cols] contiguous (torch.bool storage)
};

} // namespace lora_ops
