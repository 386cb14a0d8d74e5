// Per-row multi-adapter LoRA term on the CPU (multi_lora_cpu.h, common/multi_lora_params.h).
//
// Three steps, none of them a loop over the pool's empty slots:
//   1. rows grouped by adapter (counting sort over the slots; base-only rows and rank-0 slots dropped);
//   2. s[row, q] = scale[c] · x[row]·A[c][q] in fp32, one task per (adapter, rank row): the A row is read
//      once for all rows of its adapter (up to 4 rows per pass share each A load);
//   3. out[row, cols] = round(out[row, cols] + Σ_q s[row, q]·Bt[c][q, cols]), one task per 256-column
//      chunk of the output: the chunk's 16 AVX-512 fp32 accumulators stay in registers over the rank loop,
//      and an adapter's Bt chunk (r · 256 values) stays in L1 while its rows go by.
// Each row's arithmetic (its accumulators, their order) is the same whichever rows share its call, so a row's
// result does not depend on the other rows' adapters.
#include "cpu/multi_lora_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/cpu_isa.h"
#include "cpu/float_convert.h"
#include "cpu/x86_target.h"

namespace lora_ops::cpu {
namespace {

constexpr int64_t kChunk = 256; // output columns per up-projection task (16 x 16 fp32 lanes)
constexpr int kRowsPerPass = 4; // rows sharing each A load in the down-projection

const char* elem_ptr(const void* base, DType t, int64_t i) {
  return static_cast<const char*>(base) + i * dtype_size(t);
}

// ---- portable inner loops (plain C++, dtypes as template arguments so the loops vectorize; compiled once
// for the baseline ISA and once for AVX2 + FMA + F16C) ---------------------------------------------------------
template <DType AT>
__attribute__((always_inline)) inline void dot_rows_body(const float* const* xs, int rows, const void* a, int64_t k,
                                                        float* out) {
  using S = Storage<AT>;
  const auto* av = static_cast<const typename S::type*>(a);
  for (int j = 0; j < rows; ++j) {
    constexpr int L = 16; // 16 partial sums per row: a vectorizable reduction with a fixed order
    float acc[L] = {};
    int64_t i = 0;
    for (; i + L <= k; i += L)
      for (int l = 0; l < L; ++l)
        acc[l] += xs[j][i + l] * S::load(av[i + l]);
    for (int l = 0; i + l < k; ++l)
      acc[l] += xs[j][i + l] * S::load(av[i + l]);
    float sum = 0.0f;
    for (int l = 0; l < L; ++l)
      sum += acc[l];
    out[j] = sum;
  }
}

template <DType XT, DType BT>
__attribute__((always_inline)) inline void up_row_body(const MultiLoraParams& p, int64_t row, const float* s,
                                                      int32_t rank, const void* bt, int64_t o0, int64_t cw) {
  using SX = Storage<XT>;
  using SB = Storage<BT>;
  auto* out = static_cast<typename SX::type*>(p.out) + row * p.out_row_stride + o0;
  const auto* b = static_cast<const typename SB::type*>(bt) + o0;
  float acc[kChunk];
  for (int64_t j = 0; j < cw; ++j)
    acc[j] = SX::load(out[j]);
  for (int32_t q = 0; q < rank; ++q) {
    const float sq = s[q];
    const auto* bq = b + q * p.n;
    for (int64_t j = 0; j < cw; ++j)
      acc[j] += sq * SB::load(bq[j]);
  }
  for (int64_t j = 0; j < cw; ++j)
    out[j] = SX::store(acc[j]);
}

template <DType AT> void dot_rows_plain(const float* const* xs, int rows, const void* a, int64_t k, float* out) {
  dot_rows_body<AT>(xs, rows, a, k, out);
}
template <DType XT, DType BT>
void up_row_plain(const MultiLoraParams& p, int64_t row, const float* s, int32_t rank, const void* bt, int64_t o0,
                  int64_t cw) {
  up_row_body<XT, BT>(p, row, s, rank, bt, o0, cw);
}
#ifdef LORA_OPS_X86
template <DType AT>
LORA_AVX2 void dot_rows_avx2(const float* const* xs, int rows, const void* a, int64_t k, float* out) {
  dot_rows_body<AT>(xs, rows, a, k, out);
}
template <DType XT, DType BT>
LORA_AVX2 void up_row_avx2(const MultiLoraParams& p, int64_t row, const float* s, int32_t rank, const void* bt,
                           int64_t o0, int64_t cw) {
  up_row_body<XT, BT>(p, row, s, rank, bt, o0, cw);
}
#endif

template <DType AT> void dot_rows_generic(bool avx2, const float* const* xs, int rows, const void* a, int64_t k,
                                          float* out) {
#ifdef LORA_OPS_X86
  if (avx2)
    return dot_rows_avx2<AT>(xs, rows, a, k, out);
#endif
  dot_rows_plain<AT>(xs, rows, a, k, out);
}

void dot_rows_portable(bool avx2, const float* const* xs, int rows, const void* a, DType at, int64_t k, float* out) {
  switch (at) {
  case DType::kFloat32: return dot_rows_generic<DType::kFloat32>(avx2, xs, rows, a, k, out);
  case DType::kFloat16: return dot_rows_generic<DType::kFloat16>(avx2, xs, rows, a, k, out);
  default: return dot_rows_generic<DType::kBFloat16>(avx2, xs, rows, a, k, out);
  }
}

template <DType XT, DType BT>
void up_row_generic(bool avx2, const MultiLoraParams& p, int64_t row, const float* s, int32_t rank, const void* bt,
                    int64_t o0, int64_t cw) {
#ifdef LORA_OPS_X86
  if (avx2)
    return up_row_avx2<XT, BT>(p, row, s, rank, bt, o0, cw);
#endif
  up_row_plain<XT, BT>(p, row, s, rank, bt, o0, cw);
}

template <DType XT>
void up_row_portable_x(bool avx2, const MultiLoraParams& p, int64_t row, const float* s, int32_t rank, const void* bt,
                       int64_t o0, int64_t cw) {
  switch (p.b_dtype) {
  case DType::kFloat32: return up_row_generic<XT, DType::kFloat32>(avx2, p, row, s, rank, bt, o0, cw);
  case DType::kFloat16: return up_row_generic<XT, DType::kFloat16>(avx2, p, row, s, rank, bt, o0, cw);
  default: return up_row_generic<XT, DType::kBFloat16>(avx2, p, row, s, rank, bt, o0, cw);
  }
}

void up_row_portable(bool avx2, const MultiLoraParams& p, int64_t row, const float* s, int32_t rank, const void* bt,
                     int64_t o0, int64_t cw) {
  switch (p.x_dtype) {
  case DType::kFloat32: return up_row_portable_x<DType::kFloat32>(avx2, p, row, s, rank, bt, o0, cw);
  case DType::kFloat16: return up_row_portable_x<DType::kFloat16>(avx2, p, row, s, rank, bt, o0, cw);
  default: return up_row_portable_x<DType::kBFloat16>(avx2, p, row, s, rank, bt, o0, cw);
  }
}

#ifdef LORA_OPS_X86
// ---- AVX-512 inner loops (dtypes are template arguments: no branch inside a loop) ---------------------------
template <DType T> LORA_AVX512 inline __m512 load16(const void* base, int64_t i, __mmask16 mask) {
  if constexpr (T == DType::kFloat32) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(base) + i);
  } else if constexpr (T == DType::kFloat16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + i));
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// Round to nearest even, quiet NaN: float_to_bf16's rule, 16 lanes.
LORA_AVX512 inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet));
}

template <DType T> LORA_AVX512 inline void store16(void* base, int64_t i, __m512 v, __mmask16 mask) {
  if constexpr (T == DType::kFloat32)
    _mm512_mask_storeu_ps(static_cast<float*>(base) + i, mask, v);
  else if constexpr (T == DType::kFloat16)
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(base) + i, mask,
                             _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  else
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(base) + i, mask, to_bf16(v));
}

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
}

// Per row: two 16-lane accumulators over k, summed at the end (the same sequence for every rows count).
template <int R, DType AT>
LORA_AVX512 void dot_rows_avx512_n(const float* const* xs, const void* a, int64_t k, float* out) {
  __m512 acc0[R], acc1[R];
  for (int j = 0; j < R; ++j)
    acc0[j] = acc1[j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    const __m512 a0 = load16<AT>(a, i, 0xffff), a1 = load16<AT>(a, i + 16, 0xffff);
    for (int j = 0; j < R; ++j) {
      acc0[j] = _mm512_fmadd_ps(_mm512_loadu_ps(xs[j] + i), a0, acc0[j]);
      acc1[j] = _mm512_fmadd_ps(_mm512_loadu_ps(xs[j] + i + 16), a1, acc1[j]);
    }
  }
  for (; i < k; i += 16) {
    const __mmask16 mk = tail_mask(k - i);
    const __m512 a0 = load16<AT>(a, i, mk);
    for (int j = 0; j < R; ++j)
      acc0[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, xs[j] + i), a0, acc0[j]);
  }
  for (int j = 0; j < R; ++j)
    out[j] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[j], acc1[j]));
}

template <DType AT>
LORA_AVX512 void dot_rows_avx512_t(const float* const* xs, int rows, const void* a, int64_t k, float* out) {
  switch (rows) {
  case 4: return dot_rows_avx512_n<4, AT>(xs, a, k, out);
  case 3: return dot_rows_avx512_n<3, AT>(xs, a, k, out);
  case 2: return dot_rows_avx512_n<2, AT>(xs, a, k, out);
  default: return dot_rows_avx512_n<1, AT>(xs, a, k, out);
  }
}

LORA_AVX512 void dot_rows_avx512(const float* const* xs, int rows, const void* a, DType at, int64_t k, float* out) {
  switch (at) {
  case DType::kFloat32: return dot_rows_avx512_t<DType::kFloat32>(xs, rows, a, k, out);
  case DType::kFloat16: return dot_rows_avx512_t<DType::kFloat16>(xs, rows, a, k, out);
  default: return dot_rows_avx512_t<DType::kBFloat16>(xs, rows, a, k, out);
  }
}

// One row's output chunk: 16 accumulators in registers over the rank loop. Full chunks load unmasked.
template <DType XT, DType BT, bool kFull>
LORA_AVX512 void up_row_avx512_t(const MultiLoraParams& p, int64_t row, const float* s, int32_t rank, const void* bt,
                                 int64_t o0, int64_t cw) {
  constexpr int V = kChunk / 16;
  __m512 acc[V];
  const int64_t base = row * p.out_row_stride + o0;
  auto mask = [&](int v) -> __mmask16 {
    if constexpr (kFull)
      return static_cast<__mmask16>(0xffff);
    else
      return v * 16 < cw ? tail_mask(cw - v * 16) : static_cast<__mmask16>(0);
  };
  for (int v = 0; v < V; ++v)
    acc[v] = load16<XT>(p.out, base + v * 16, mask(v));
  for (int32_t q = 0; q < rank; ++q) {
    const __m512 sq = _mm512_set1_ps(s[q]);
    const int64_t b0 = q * p.n + o0;
    for (int v = 0; v < V; ++v)
      acc[v] = _mm512_fmadd_ps(sq, load16<BT>(bt, b0 + v * 16, mask(v)), acc[v]);
  }
  for (int v = 0; v < V; ++v)
    store16<XT>(p.out, base + v * 16, acc[v], mask(v));
}

template <DType XT, DType BT>
LORA_AVX512 void up_row_avx512_b(const MultiLoraParams& p, int64_t row, const float* s, int32_t rank, const void* bt,
                                 int64_t o0, int64_t cw) {
  if (cw == kChunk)
    up_row_avx512_t<XT, BT, true>(p, row, s, rank, bt, o0, cw);
  else
    up_row_avx512_t<XT, BT, false>(p, row, s, rank, bt, o0, cw);
}

template <DType XT>
LORA_AVX512 void up_row_avx512_x(const MultiLoraParams& p, int64_t row, const float* s, int32_t rank, const void* bt,
                                 int64_t o0, int64_t cw) {
  switch (p.b_dtype) {
  case DType::kFloat32: return up_row_avx512_b<XT, DType::kFloat32>(p, row, s, rank, bt, o0, cw);
  case DType::kFloat16: return up_row_avx512_b<XT, DType::kFloat16>(p, row, s, rank, bt, o0, cw);
  default: return up_row_avx512_b<XT, DType::kBFloat16>(p, row, s, rank, bt, o0, cw);
  }
}

LORA_AVX512 void up_row_avx512(const MultiLoraParams& p, int64_t row, const float* s, int32_t rank, const void* bt,
                               int64_t o0, int64_t cw) {
  switch (p.x_dtype) {
  case DType::kFloat32: return up_row_avx512_x<DType::kFloat32>(p, row, s, rank, bt, o0, cw);
  case DType::kFloat16: return up_row_avx512_x<DType::kFloat16>(p, row, s, rank, bt, o0, cw);
  default: return up_row_avx512_x<DType::kBFloat16>(p, row, s, rank, bt, o0, cw);
  }
}
#endif

template <DType T> void widen_rows(const MultiLoraParams& p, const std::vector<int64_t>& order, float* xs) {
  using S = Storage<T>;
  const auto* x = static_cast<const typename S::type*>(p.x);
  const int64_t n_rows = static_cast<int64_t>(order.size()), K = p.k;
#pragma omp parallel for schedule(static) if (n_rows * K >= (int64_t{1} << 16))
  for (int64_t i = 0; i < n_rows; ++i) {
    const auto* src = x + order[i] * p.x_row_stride;
    float* dst = xs + i * K;
    if (p.x_col_stride == 1)
      for (int64_t j = 0; j < K; ++j)
        dst[j] = S::load(src[j]);
    else
      for (int64_t j = 0; j < K; ++j)
        dst[j] = S::load(src[j * p.x_col_stride]);
  }
}

} // namespace

void multi_lora_add(const MultiLoraParams& p) {
  const int64_t M = p.m, K = p.k, N = p.n, C = p.slots;
  const int32_t r_max = p.r_max;
  // 1. Rows grouped by slot: a counting sort (stable: rows keep their order within an adapter).
  std::vector<int64_t> start(C + 1, 0);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t c = p.ids[m];
    if (c >= 0 && p.ranks[c] > 0)
      ++start[c + 1];
  }
  for (int64_t c = 0; c < C; ++c)
    start[c + 1] += start[c];
  const int64_t active = start[C];
  if (active == 0)
    return;
  std::vector<int64_t> order(active);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t m = 0; m < M; ++m) {
      const int64_t c = p.ids[m];
      if (c >= 0 && p.ranks[c] > 0)
        order[fill[c]++] = m;
    }
  }
  std::vector<int64_t> used; // slots with rows, in slot order
  for (int64_t c = 0; c < C; ++c)
    if (start[c + 1] > start[c])
      used.push_back(c);

  const bool avx512 = cpu_isa() >= CpuIsa::kAvx512, avx2 = !avx512 && cpu_isa() >= CpuIsa::kAvx2;

  // x rows of the active rows, widened to fp32 in grouped order.
  std::vector<float> xs(static_cast<size_t>(active * K));
  switch (p.x_dtype) {
  case DType::kFloat32: widen_rows<DType::kFloat32>(p, order, xs.data()); break;
  case DType::kFloat16: widen_rows<DType::kFloat16>(p, order, xs.data()); break;
  default: widen_rows<DType::kBFloat16>(p, order, xs.data()); break;
  }

  // 2. s [active, r_max] = scale · x·Aᵀ, one task per (used slot, rank row).
  std::vector<float> s(static_cast<size_t>(active * r_max), 0.0f);
  std::vector<std::pair<int64_t, int32_t>> tasks;
  for (int64_t c : used)
    for (int32_t q = 0; q < p.ranks[c]; ++q)
      tasks.emplace_back(c, q);
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
#pragma omp parallel for schedule(dynamic, 4) if (active * K * r_max >= (int64_t{1} << 16))
  for (int64_t t = 0; t < n_tasks; ++t) {
    const int64_t c = tasks[t].first;
    const int32_t q = tasks[t].second;
    const void* a = elem_ptr(p.a_pool, p.a_dtype, (c * r_max + q) * K);
    const float scale = p.scales[c];
    for (int64_t i0 = start[c]; i0 < start[c + 1]; i0 += kRowsPerPass) {
      const int rows = static_cast<int>(std::min<int64_t>(kRowsPerPass, start[c + 1] - i0));
      const float* xr[kRowsPerPass];
      float d[kRowsPerPass];
      for (int j = 0; j < rows; ++j)
        xr[j] = xs.data() + (i0 + j) * K;
#ifdef LORA_OPS_X86
      if (avx512)
        dot_rows_avx512(xr, rows, a, p.a_dtype, K, d);
      else
#endif
        dot_rows_portable(avx2, xr, rows, a, p.a_dtype, K, d);
      for (int j = 0; j < rows; ++j)
        s[(i0 + j) * r_max + q] = scale * d[j];
    }
  }

  // 3. out += s·Bt, one task per output chunk, rows adapter by adapter.
  const int64_t n_chunks = (N + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (active * N * r_max >= (int64_t{1} << 16))
  for (int64_t ch = 0; ch < n_chunks; ++ch) {
    const int64_t o0 = ch * kChunk, cw = std::min(kChunk, N - o0);
    for (int64_t c : used) {
      const void* bt = elem_ptr(p.bt_pool, p.b_dtype, c * r_max * N);
      for (int64_t i = start[c]; i < start[c + 1]; ++i) {
#ifdef LORA_OPS_X86
        if (avx512)
          up_row_avx512(p, order[i], s.data() + i * r_max, p.ranks[c], bt, o0, cw);
        else
#endif
          up_row_portable(avx2, p, order[i], s.data() + i * r_max, p.ranks[c], bt, o0, cw);
      }
    }
  }
}

} // namespace lora_ops::cpu
