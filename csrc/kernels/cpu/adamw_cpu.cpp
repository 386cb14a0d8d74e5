// CPU multi-tensor AdamW step (OpenMP). Elementwise, so the result does not depend on the thread
// count or on how tensors are cut into pages: paged and resident runs give the same bits.
#include "cpu/adamw_cpu.h"

#include <algorithm>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "cpu/float_convert.h"

namespace lora_ops::cpu {
namespace {

constexpr int64_t kBlockElems = 16384; // OpenMP work unit: 64 KiB of each fp32 state array
constexpr int64_t kTileElems = 256;    // 16-bit params are widened to fp32 through a tile this size

// The fp32 core on contiguous arrays. SSE2 (part of every x86-64) does four lanes with the same
// IEEE-rounded ops as the scalar path (mul, add, sub, div, sqrt are all exactly rounded), so both
// give identical bits. Written with intrinsics because GCC will not vectorize sqrtf in a loop
// without -fno-math-errno, which the build does not set.
template <bool kMaximize, bool kSmallW1>
void update_f32(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
                const AdamwHyper& h, int64_t n) {
  int64_t i = 0;
#if defined(__SSE2__)
  const __m128 decay = _mm_set1_ps(h.decay), w1 = _mm_set1_ps(h.w1), one_m_w1 = _mm_set1_ps(1.0f - h.w1);
  const __m128 beta2 = _mm_set1_ps(h.beta2), omb2 = _mm_set1_ps(h.omb2), bc2 = _mm_set1_ps(h.bc2_sqrt);
  const __m128 eps = _mm_set1_ps(h.eps), nss = _mm_set1_ps(h.neg_step_size), sign = _mm_set1_ps(-0.0f);
  for (; i + 4 <= n; i += 4) {
    __m128 gi = _mm_loadu_ps(g + i);
    if (kMaximize)
      gi = _mm_xor_ps(gi, sign);
    __m128 pi = _mm_mul_ps(_mm_loadu_ps(p + i), decay);
    __m128 mi = _mm_loadu_ps(m + i);
    const __m128 diff = _mm_sub_ps(gi, mi);
    mi = kSmallW1 ? _mm_add_ps(mi, _mm_mul_ps(w1, diff)) : _mm_sub_ps(gi, _mm_mul_ps(diff, one_m_w1));
    __m128 vi = _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(v + i), beta2), _mm_mul_ps(_mm_mul_ps(omb2, gi), gi));
    const __m128 denom = _mm_add_ps(_mm_div_ps(_mm_sqrt_ps(vi), bc2), eps);
    pi = _mm_add_ps(pi, _mm_div_ps(_mm_mul_ps(nss, mi), denom));
    _mm_storeu_ps(p + i, pi);
    _mm_storeu_ps(m + i, mi);
    _mm_storeu_ps(v + i, vi);
  }
#endif
  for (; i < n; ++i)
    adamw_update_element<kMaximize, kSmallW1>(p[i], g[i], m[i], v[i], h);
}

template <bool kMaximize, bool kSmallW1, DType T>
void update_range(const AdamwTensor& t, const AdamwHyper& h, int64_t begin, int64_t end) {
  if constexpr (T == DType::kFloat32) {
    update_f32<kMaximize, kSmallW1>(static_cast<float*>(t.param) + begin, static_cast<const float*>(t.grad) + begin,
                                    t.exp_avg + begin, t.exp_avg_sq + begin, h, end - begin);
  } else {
    using S = Storage<T>;
    auto* param = static_cast<uint16_t*>(t.param);
    const auto* grad = static_cast<const uint16_t*>(t.grad);
    float p32[kTileElems], g32[kTileElems];
    for (int64_t t0 = begin; t0 < end; t0 += kTileElems) {
      const int64_t n = std::min(kTileElems, end - t0);
      for (int64_t i = 0; i < n; ++i) {
        p32[i] = S::load(param[t0 + i]);
        g32[i] = S::load(grad[t0 + i]);
      }
      update_f32<kMaximize, kSmallW1>(p32, g32, t.exp_avg + t0, t.exp_avg_sq + t0, h, n);
      for (int64_t i = 0; i < n; ++i)
        param[t0 + i] = S::store(p32[i]);
    }
  }
}

template <bool kMaximize, bool kSmallW1>
void update_block(const AdamwTensor& t, const AdamwHyper& h, int64_t begin, int64_t end) {
  switch (t.dtype) {
  case DType::kFloat32:
    return update_range<kMaximize, kSmallW1, DType::kFloat32>(t, h, begin, end);
  case DType::kFloat16:
    return update_range<kMaximize, kSmallW1, DType::kFloat16>(t, h, begin, end);
  case DType::kBFloat16:
    return update_range<kMaximize, kSmallW1, DType::kBFloat16>(t, h, begin, end);
  }
}

void update_block(const AdamwTensor& t, const AdamwHyper& h, int64_t begin, int64_t end) {
  const bool small_w1 = adamw_small_w1(h);
  if (h.maximize) {
    small_w1 ? update_block<true, true>(t, h, begin, end) : update_block<true, false>(t, h, begin, end);
  } else {
    small_w1 ? update_block<false, true>(t, h, begin, end) : update_block<false, false>(t, h, begin, end);
  }
}

} // namespace

void adamw_step(const AdamwStepParams& p) {
  // block_start[i] = index of the first work block of tensor i.
  std::vector<int64_t> block_start(static_cast<size_t>(p.n_tensors) + 1, 0);
  for (int64_t i = 0; i < p.n_tensors; ++i) {
    block_start[i + 1] = block_start[i] + (p.tensors[i].numel + kBlockElems - 1) / kBlockElems;
  }
  const int64_t n_blocks = block_start.back();
#pragma omp parallel for schedule(static) if (n_blocks > 1)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t ti = std::upper_bound(block_start.begin(), block_start.end(), b) - block_start.begin() - 1;
    const AdamwTensor& t = p.tensors[ti];
    const int64_t begin = (b - block_start[ti]) * kBlockElems;
    update_block(t, p.hypers[t.hyper], begin, std::min(begin + kBlockElems, t.numel));
  }
}

} // namespace lora_ops::cpu
