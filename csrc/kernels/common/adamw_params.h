// Fused AdamW: the plain structs shared by the CPU and CUDA kernels, and the per-element update.
//
// The update restates torch.optim.AdamW (torch/optim/adam.py, _single_tensor_adam with
// decoupled_weight_decay=True) op by op, each op rounding once in float32 like torch's CPU kernels:
//   p  = p * decay                               decay = 1 - lr * weight_decay
//   m  = lerp(m, g, w1)                          w1 = 1 - beta1 (torch's two-branch lerp)
//   v  = v * beta2;  v = v + (omb2 * g) * g      omb2 = 1 - beta2   (mul_ then addcmul_)
//   d  = sqrt(v) / bias_correction2_sqrt + eps
//   p  = p + (neg_step_size * m) / d             neg_step_size = -lr / (1 - beta1^step)  (addcdiv_)
// The scalars are computed on the host in float64 (as Python does) and rounded to float32 once, as
// torch does when a Python scalar meets a float32 tensor. No FMA contraction anywhere, so the CPU
// and CUDA kernels produce the same bits, and a paged run the same bits as a resident one.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/macros.h"

#if defined(__CUDA_ARCH__)
#define LORA_FDIV_RN(a, b) __fdiv_rn((a), (b))
#define LORA_FSQRT_RN(a) __fsqrt_rn(a)
#else
#include <cmath>
#define LORA_FDIV_RN(a, b) ((a) / (b))
#define LORA_FSQRT_RN(a) std::sqrt(a)
#endif

namespace lora_ops {

// Hyper-parameters of one tensor (rows of the `hparams` argument of adamw_step_), already folded.
struct AdamwHyper {
  float decay;         // 1 - lr * weight_decay
  float w1;            // 1 - beta1 (lerp weight of exp_avg towards the gradient)
  float beta2;         // exp_avg_sq decay
  float omb2;          // 1 - beta2
  float bc2_sqrt;      // sqrt(1 - beta2^step)
  float eps;           // added after the bias correction, as torch does
  float neg_step_size; // -lr / (1 - beta1^step)
  int32_t maximize;    // 1: ascend (the gradient is negated first)
};

// One tensor (or one page-sized piece of a tensor) to update. All arrays hold `numel` elements.
struct AdamwTensor {
  void* param;       // float32 / float16 / bfloat16 (`dtype`), updated in place
  const void* grad;  // same dtype as param
  float* exp_avg;    // float32, updated in place
  float* exp_avg_sq; // float32, updated in place
  int64_t numel;
  int32_t hyper; // row of the hyper-parameter table
  DType dtype;   // of param and grad
};

// A multi-tensor step: `n_tensors` tensors, hyper-parameter rows `hypers[0..n_hypers)`. Both arrays
// live in host memory; the CUDA launcher copies them into kernel arguments.
struct AdamwStepParams {
  const AdamwTensor* tensors;
  int64_t n_tensors;
  const AdamwHyper* hypers;
  int64_t n_hypers;
};

// One element of the AdamW step; p, m, v are updated in place. NaN/Inf propagate as in torch.
// The two per-tensor branches are template parameters so that CPU loops have no control flow and
// vectorize: kMaximize negates the gradient; kSmallW1 picks torch's lerp branch (ATen/native/Lerp.h:
// `self + w * (end - self)` when |w| < 0.5, else `end - (end - self) * (1 - w)`).
template <bool kMaximize, bool kSmallW1>
LORA_HD void adamw_update_element(float& p, float g, float& m, float& v, const AdamwHyper& h) {
  if (kMaximize)
    g = -g;
  p = LORA_FMUL_RN(p, h.decay);
  const float diff = LORA_FSUB_RN(g, m);
  m = kSmallW1 ? LORA_FADD_RN(m, LORA_FMUL_RN(h.w1, diff))
               : LORA_FSUB_RN(g, LORA_FMUL_RN(diff, LORA_FSUB_RN(1.0f, h.w1)));
  v = LORA_FADD_RN(LORA_FMUL_RN(v, h.beta2), LORA_FMUL_RN(LORA_FMUL_RN(h.omb2, g), g));
  const float denom = LORA_FADD_RN(LORA_FDIV_RN(LORA_FSQRT_RN(v), h.bc2_sqrt), h.eps);
  p = LORA_FADD_RN(p, LORA_FDIV_RN(LORA_FMUL_RN(h.neg_step_size, m), denom));
}

LORA_HD bool adamw_small_w1(const AdamwHyper& h) { return h.w1 < 0.5f && h.w1 > -0.5f; }

// Dispatches the per-tensor branches at run time (used where they are uniform anyway: CUDA blocks).
LORA_HD void adamw_update_element(float& p, float g, float& m, float& v, const AdamwHyper& h) {
  if (h.maximize) {
    if (adamw_small_w1(h))
      adamw_update_element<true, true>(p, g, m, v, h);
    else
      adamw_update_element<true, false>(p, g, m, v, h);
  } else {
    if (adamw_small_w1(h))
      adamw_update_element<false, true>(p, g, m, v, h);
    else
      adamw_update_element<false, false>(p, g, m, v, h);
  }
}

} // namespace lora_ops
