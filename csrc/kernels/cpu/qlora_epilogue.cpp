// The CPU matmul epilogue (qlora_epilogue.h) and qlora_finish_tile, the slab path's entry to it.
#include "cpu/qlora_epilogue.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/dropout_rng.h"
#include "cpu/cpu_isa.h"
#include "cpu/float_convert.h"
#include "cpu/qlora_cpu.h"
#include "cpu/row_convert.h"
#include "cpu/x86_target.h"

namespace lora_ops::cpu {
namespace {

#ifdef LORA_OPS_X86
// fp32 -> bf16 / fp16 with round-to-nearest-even, 8 at a time (bf16: NaN is kept quiet as in
// float_to_bf16; fp16: F16C vcvtps2ph).
LORA_AVX2 void store_row_16bit_avx2(uint16_t* out, const float* c, int64_t n, DType t) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(c + i);
    __m128i h;
    if (t == DType::kFloat16) {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      const __m256i u = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
      r = _mm256_blendv_epi8(r, qnan, nan);
      // pack the low 16 bits of 8 lanes (values < 2^16, so unsigned saturation is exact)
      h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  for (; i < n; ++i)
    out[i] = t == DType::kFloat16 ? float_to_fp16(c[i]) : float_to_bf16(c[i]);
}
#endif

// lr[t] = Σ_q s[q] · lw[q * kPanel + t] for the kPanel columns, q in order: the LoRA term of one output
// row (AVX2: one fused multiply-add per term, the 64 columns in 8 ymm accumulators).
void lora_panel_term_portable(const float* s, const float* lw, int64_t rank, float* lr) {
  for (int t = 0; t < kPanel; ++t)
    lr[t] = 0.0f;
  for (int64_t q = 0; q < rank; ++q)
    for (int t = 0; t < kPanel; ++t)
      lr[t] += s[q] * lw[q * kPanel + t];
}
#ifdef LORA_OPS_X86
static_assert(kPanel == 64, "lora_panel_term_avx2 holds kPanel columns in 8 ymm registers");
LORA_AVX2 void lora_panel_term_avx2(const float* s, const float* lw, int64_t rank, float* lr) {
  __m256 acc[8];
  for (int v = 0; v < 8; ++v)
    acc[v] = _mm256_setzero_ps();
  for (int64_t q = 0; q < rank; ++q) {
    const __m256 sv = _mm256_set1_ps(s[q]);
    for (int v = 0; v < 8; ++v)
      acc[v] = _mm256_fmadd_ps(sv, _mm256_loadu_ps(lw + q * kPanel + 8 * v), acc[v]);
  }
  for (int v = 0; v < 8; ++v)
    _mm256_storeu_ps(lr + 8 * v, acc[v]);
}
#endif
void lora_panel_term(const float* s, const float* lw, int64_t rank, float* lr) {
#ifdef LORA_OPS_X86
  if (cpu_isa() >= CpuIsa::kAvx2)
    return lora_panel_term_avx2(s, lw, rank, lr);
#endif
  lora_panel_term_portable(s, lw, rank, lr);
}

} // namespace

Epilogue::Epilogue(const QloraMatmulParams& params) : p(params) { key = dropout_key(p.dropout.seed); }

// lw[q * kPanel + t] = lora_w[o0 + t, q] in fp32 (zero beyond ow).
// Reads along lora_w's contiguous index (B [N, r] in forward: q; the Aᵀ view in dx: t): column-wise
// reads of B touched a new cache line per element and cost ~10% of an M = 1 forward.
void Epilogue::load_lora_panel(int64_t o0, int64_t ow, float* lw) const {
  const auto elem = [&](int64_t t, int64_t q) {
    return load_elem<float>(p.lora_w, p.lora_w_dtype, (o0 + t) * p.lora_w_stride_o + q * p.lora_w_stride_q);
  };
  if (ow < kPanel)
    std::fill(lw, lw + p.rank * kPanel, 0.0f);
  if (p.lora_w_dtype == DType::kFloat32 && p.lora_w_stride_q == 1) { // PEFT's fp32 B: no per-element switch
    const float* b = static_cast<const float*>(p.lora_w) + o0 * p.lora_w_stride_o;
    for (int64_t t = 0; t < ow; ++t)
      for (int64_t q = 0; q < p.rank; ++q)
        lw[q * kPanel + t] = b[t * p.lora_w_stride_o + q];
    return;
  }
  if (p.lora_w_stride_q < p.lora_w_stride_o) {
    for (int64_t t = 0; t < ow; ++t)
      for (int64_t q = 0; q < p.rank; ++q)
        lw[q * kPanel + t] = elem(t, q);
  } else {
    for (int64_t q = 0; q < p.rank; ++q)
      for (int64_t t = 0; t < ow; ++t)
        lw[q * kPanel + t] = elem(t, q);
  }
}

// Asks for the panel's lora_w rows ahead of load_lora_panel (B in forward, contiguous rows): issued
// before the panel's W rows are decoded, so they arrive during that work instead of after it.
void Epilogue::prefetch_lora_panel(int64_t o0, int64_t ow) const {
#ifdef LORA_OPS_X86
  if (p.rank == 0 || p.lora_w_stride_q != 1)
    return;
  const int64_t row_bytes = p.rank * dtype_size(p.lora_w_dtype);
  const char* base = static_cast<const char*>(p.lora_w);
  for (int64_t t = 0; t < ow; ++t) {
    const char* row = base + (o0 + t) * p.lora_w_stride_o * dtype_size(p.lora_w_dtype);
    for (int64_t b = 0; b < row_bytes; b += 64)
      _mm_prefetch(row + b, _MM_HINT_T0);
  }
#else
  (void)o0;
  (void)ow;
#endif
}

// Finishes row m (global) of the panel: c[t] holds the fp32 base product for columns o0 + t (with
// lw == nullptr: the LoRA term is in it already, folded into the reduction by the caller).
void Epilogue::finish_row(int64_t m, int64_t o0, int64_t ow, float* c, const float* lw) const {
  if (p.rank > 0 && lw != nullptr) {
    float lr[kPanel];
    lora_panel_term(static_cast<const float*>(p.lora_s) + m * p.lora_s_row_stride, lw, p.rank, lr);
    if (p.dropout.enabled())
      apply_mask(m, o0, ow, lr);
    const float scale = static_cast<float>(p.scale);
    for (int64_t t = 0; t < ow; ++t)
      c[t] += scale * lr[t];
  }
  if (p.bias != nullptr)
    for (int64_t t = 0; t < ow; ++t)
      c[t] += load_elem<float>(p.bias, p.bias_dtype, o0 + t);
  store_row(m, o0, ow, c);
}

void Epilogue::apply_mask(int64_t m, int64_t o0, int64_t ow, float* v) const {
  const DropoutParams& d = p.dropout;
  const uint64_t ctr0 =
      d.offset + static_cast<uint64_t>(m) * static_cast<uint64_t>(d.cols) + static_cast<uint64_t>(o0);
  for (int64_t t = 0; t < ow; ++t) {
    const uint64_t ctr = ctr0 + static_cast<uint64_t>(t);
    const uint32_t h =
        dropout_hash(key, dropout_hi_key(key, static_cast<uint32_t>(ctr >> 32)), static_cast<uint32_t>(ctr));
    v[t] = dropout_apply(dropout_keep_hash(h, d.threshold), v[t], d.keep_scale);
  }
}

void Epilogue::store_row(int64_t m, int64_t o0, int64_t ow, const float* c) const {
  const int64_t base = m * p.out_row_stride + o0;
#ifdef LORA_OPS_X86
  if (cpu_isa() >= CpuIsa::kAvx2 && p.a_dtype != DType::kFloat32) {
    store_row_16bit_avx2(static_cast<uint16_t*>(p.out) + base, c, ow, p.a_dtype);
    return;
  }
#endif
  switch (p.a_dtype) {
  case DType::kFloat32:
    std::memcpy(static_cast<float*>(p.out) + base, c, static_cast<size_t>(ow) * sizeof(float));
    break;
  case DType::kBFloat16: {
    uint16_t* o = static_cast<uint16_t*>(p.out) + base;
    for (int64_t t = 0; t < ow; ++t)
      o[t] = float_to_bf16(c[t]);
    break;
  }
  default: {
    uint16_t* o = static_cast<uint16_t*>(p.out) + base;
    for (int64_t t = 0; t < ow; ++t)
      o[t] = float_to_fp16(c[t]);
  }
  }
}

void qlora_finish_tile(const QloraMatmulParams& p, int64_t m0, int64_t mb, int64_t o0, int64_t ow, float* acc,
                       int64_t ld) {
  const Epilogue ep(p);
  const int64_t n_panels = (ow + kPanel - 1) / kPanel;
#pragma omp parallel
  {
    std::vector<float> lw(static_cast<size_t>(std::max<int64_t>(p.rank, 1) * kPanel));
#pragma omp for schedule(static)
    for (int64_t panel = 0; panel < n_panels; ++panel) {
      const int64_t c0 = o0 + panel * kPanel;
      const int64_t cw = std::min<int64_t>(kPanel, o0 + ow - c0);
      if (p.rank > 0)
        ep.load_lora_panel(c0, cw, lw.data());
      for (int64_t m = 0; m < mb; ++m)
        ep.finish_row(m0 + m, c0, cw, acc + m * ld + (c0 - o0), lw.data());
    }
  }
}

} // namespace lora_ops::cpu
