// CPU LoRA factor ops (lora_factors_cpu.h). Every output element is computed by one thread, in a fixed
// summation tree (chunks of 8 terms, blocks of 256, then the blocks: in order over the reduction in
// lora_down, pairwise in lora_outer, whose reductions over M can be long; either op with few outputs
// sums in fp64 instead), so results do not depend on the thread count. AVX2 kernels where cpu_isa() allows
// them (also on AVX-512 machines: these ops are small next to the GEMMs and AVX2 reaches the same FMA
// throughput on Zen 4).
#include "cpu/lora_factors_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/row_convert.h"

namespace lora_ops::cpu {
namespace {

bool use_avx2() { return cpu_isa() >= CpuIsa::kAvx2; }

#ifdef LORA_OPS_X86
// s[q] = Σ_i row[i] · f[q, i] for fp32 f with contiguous rows (the forward's A): the few-rows case, where
// transposing f would cost more than the products. Per q: 8 lanes each sum their share of a 256-term
// block, the lanes are added pairwise and the blocks in order, so the error grows like 32 + 3 + L / 256
// terms (the transposing path's tree: 8 + 32 + L / 256).
LORA_AVX2 void lora_down_rows_avx2(const float* row, const float* f, int64_t stride_q, int64_t r, int64_t L,
                                   float* out) {
  constexpr int64_t kBlock = 256;
  constexpr int64_t kPrefetchBytes = 2048; // f comes from DRAM at decode sizes: more lines in flight
  for (int64_t q = 0; q < r; ++q) {
    const float* fq = f + q * stride_q;
    float acc = 0.0f;
    for (int64_t b0 = 0; b0 < L; b0 += kBlock) {
      const int64_t b1 = std::min(L, b0 + kBlock);
      __m256 v = _mm256_setzero_ps();
      int64_t i = b0;
      for (; i + 8 <= b1; i += 8) {
        _mm_prefetch(reinterpret_cast<const char*>(fq + i) + kPrefetchBytes, _MM_HINT_T0);
        v = _mm256_fmadd_ps(_mm256_loadu_ps(row + i), _mm256_loadu_ps(fq + i), v);
      }
      alignas(32) float l[8];
      _mm256_store_ps(l, v);
      float blk = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
      for (; i < b1; ++i)
        blk += row[i] * fq[i];
      acc += blk;
    }
    out[q] = acc;
  }
}
#endif

#ifdef LORA_OPS_X86
// out[j · ldo + q] = Σ_i rows[j · ld + i] · ft[i · r + q] for R rows and the NV · 8 ranks from q0 (ft: the
// factor transposed, [L, r]), summed in the generic path's tree (kChunk terms, then kChunk-term chunks of
// a kBlock block, then the blocks), the partial sums in registers. R rows at once: one row has only NV
// fused multiply-add chains, each waiting on the FMA latency (2048 rows x 4096 at r 16 took ~4.5 ms on
// 2 Zen 4 cores that way); R rows give R · NV independent chains on the same factor loads.
template <int NV, int R>
LORA_AVX2 void lora_down_ft_rows_avx2(const float* rows, int64_t ld, const float* ft, int64_t r, int64_t L, int64_t q0,
                                      float* out, int64_t ldo) {
  constexpr int64_t kChunk = 8, kBlock = 256;
  __m256 acc[R][NV], blk[R][NV], part[R][NV];
  for (int j = 0; j < R; ++j)
    for (int v = 0; v < NV; ++v)
      acc[j][v] = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < L; b0 += kBlock) {
    for (int j = 0; j < R; ++j)
      for (int v = 0; v < NV; ++v)
        blk[j][v] = _mm256_setzero_ps();
    const int64_t b1 = std::min(L, b0 + kBlock);
    for (int64_t c0 = b0; c0 < b1; c0 += kChunk) {
      for (int j = 0; j < R; ++j)
        for (int v = 0; v < NV; ++v)
          part[j][v] = _mm256_setzero_ps();
      for (int64_t i = c0; i < std::min(b1, c0 + kChunk); ++i) {
        const float* fi = ft + i * r + q0;
        __m256 f[NV];
        for (int v = 0; v < NV; ++v)
          f[v] = _mm256_loadu_ps(fi + 8 * v);
        for (int j = 0; j < R; ++j) {
          const __m256 x = _mm256_set1_ps(rows[j * ld + i]);
          for (int v = 0; v < NV; ++v)
            part[j][v] = _mm256_fmadd_ps(x, f[v], part[j][v]);
        }
      }
      for (int j = 0; j < R; ++j)
        for (int v = 0; v < NV; ++v)
          blk[j][v] = _mm256_add_ps(blk[j][v], part[j][v]);
    }
    for (int j = 0; j < R; ++j)
      for (int v = 0; v < NV; ++v)
        acc[j][v] = _mm256_add_ps(acc[j][v], blk[j][v]);
  }
  for (int j = 0; j < R; ++j)
    for (int v = 0; v < NV; ++v)
      _mm256_storeu_ps(out + j * ldo + q0 + 8 * v, acc[j][v]);
}

// All ranks (r % 8 == 0) of R rows.
template <int R>
void lora_down_rows_group_avx2(const float* rows, int64_t ld, const float* ft, int64_t r, int64_t L, float* out,
                               int64_t ldo) {
  int64_t q0 = 0;
  for (; q0 + 16 <= r; q0 += 16)
    lora_down_ft_rows_avx2<2, R>(rows, ld, ft, r, L, q0, out, ldo);
  if (q0 < r)
    lora_down_ft_rows_avx2<1, R>(rows, ld, ft, r, L, q0, out, ldo);
}
#endif

// True when lora_down_rows_avx2 takes the call: few rows, fp32 factor rows contiguous along l.
bool lora_down_by_rows(const LoraDownParams& p) {
  constexpr int64_t kMaxRows = 16; // beyond, one transposition of f is cheaper than re-reading it per row
  return use_avx2() && p.a_dtype != DType::kFloat64 && p.f_dtype == DType::kFloat32 && p.f_stride_l == 1 &&
         p.m <= kMaxRows;
}

template <typename Acc> void lora_down_typed(const LoraDownParams& p) {
  const int64_t r = p.rank, L = p.l;
#ifdef LORA_OPS_X86
  if constexpr (std::is_same_v<Acc, float>) {
    if (lora_down_by_rows(p)) {
      // Rows converted (and masked) up front, then the (row, rank) dots split over threads: at decode
      // sizes f (r x L fp32, 256 KiB at r 16, L 4096) comes from DRAM, and one thread streaming it took
      // ~55 us of an M = 1 forward. Each dot is computed by one thread: results do not depend on it.
      const uint32_t key = dropout_key(p.dropout.seed);
      std::vector<float> rows(static_cast<size_t>(p.m * L));
      for (int64_t m = 0; m < p.m; ++m) {
        load_row(p.a, p.a_dtype, m * p.a_row_stride, p.a_col_stride, L, rows.data() + m * L);
        if (p.dropout.enabled())
          mask_row(p.dropout, key, m, L, rows.data() + m * L);
      }
      const float* f = static_cast<const float*>(p.f);
#pragma omp parallel for schedule(static) if (p.m * r * L >= (int64_t{1} << 16))
      for (int64_t mq = 0; mq < p.m * r; ++mq) {
        const int64_t m = mq / r, q = mq % r;
        lora_down_rows_avx2(rows.data() + m * L, f + q * p.f_stride_q, p.f_stride_q, 1, L,
                            static_cast<float*>(p.out) + m * p.out_row_stride + q);
      }
      return;
    }
  }
#endif
  // fT[i][q] = f[q, i]: the reduction becomes an axpy over the rank (vectorizes for any r).
  std::vector<Acc> ft(static_cast<size_t>(L * r));
  for (int64_t q = 0; q < r; ++q)
    for (int64_t i = 0; i < L; ++i)
      ft[i * r + q] = load_elem<Acc>(p.f, p.f_dtype, q * p.f_stride_q + i * p.f_stride_l);
  const uint32_t key = dropout_key(p.dropout.seed);
  const bool parallel = p.m * L * r > (1 << 16);
#ifdef LORA_OPS_X86
  if constexpr (std::is_same_v<Acc, float>) {
    if (use_avx2() && r % 8 == 0) { // kRowGroup rows at a time through the multi-row kernel
      constexpr int64_t kRowGroup = 4;
      const int64_t groups = (p.m + kRowGroup - 1) / kRowGroup;
#pragma omp parallel if (parallel)
      {
        std::vector<float> rows(static_cast<size_t>(kRowGroup * L));
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t m0 = g * kRowGroup, rows_here = std::min(kRowGroup, p.m - m0);
          for (int64_t j = 0; j < rows_here; ++j) {
            load_row(p.a, p.a_dtype, (m0 + j) * p.a_row_stride, p.a_col_stride, L, rows.data() + j * L);
            if (p.dropout.enabled())
              mask_row(p.dropout, key, m0 + j, L, rows.data() + j * L);
          }
          float* out = static_cast<float*>(p.out) + m0 * p.out_row_stride;
          switch (rows_here) {
          case 4: lora_down_rows_group_avx2<4>(rows.data(), L, ft.data(), r, L, out, p.out_row_stride); break;
          case 3: lora_down_rows_group_avx2<3>(rows.data(), L, ft.data(), r, L, out, p.out_row_stride); break;
          case 2: lora_down_rows_group_avx2<2>(rows.data(), L, ft.data(), r, L, out, p.out_row_stride); break;
          default: lora_down_rows_group_avx2<1>(rows.data(), L, ft.data(), r, L, out, p.out_row_stride); break;
          }
        }
      }
      return;
    }
  }
#endif
#pragma omp parallel if (parallel)
  {
    std::vector<Acc> row(static_cast<size_t>(L));
    std::vector<Acc> acc(static_cast<size_t>(r)), blk(static_cast<size_t>(r)), part(static_cast<size_t>(r));
    constexpr int64_t kChunk = 8, kBlock = 256;
#pragma omp for schedule(static)
    for (int64_t m = 0; m < p.m; ++m) {
      load_row(p.a, p.a_dtype, m * p.a_row_stride, p.a_col_stride, L, row.data());
      if (p.dropout.enabled())
        mask_row(p.dropout, key, m, L, row.data());
      // A tree over L, like lora_outer's over M: kChunk terms, the chunks of a kBlock-term block,
      // then the blocks, so the error grows like kChunk + kBlock / kChunk + L / kBlock terms.
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int64_t b0 = 0; b0 < L; b0 += kBlock) {
        std::fill(blk.begin(), blk.end(), Acc(0));
        for (int64_t c0 = b0; c0 < std::min(L, b0 + kBlock); c0 += kChunk) {
          std::fill(part.begin(), part.end(), Acc(0));
          for (int64_t i = c0; i < std::min(L, c0 + kChunk); ++i) {
            const Acc v = row[i];
            const Acc* fi = ft.data() + i * r;
            for (int64_t q = 0; q < r; ++q)
              part[q] += v * fi[q];
          }
          for (int64_t q = 0; q < r; ++q)
            blk[q] += part[q];
        }
        for (int64_t q = 0; q < r; ++q)
          acc[q] += blk[q];
      }
      Acc* out = static_cast<Acc*>(p.out) + m * p.out_row_stride;
      for (int64_t q = 0; q < r; ++q)
        out[q] = acc[q];
    }
  }
}

// Pairwise (cascade) sum of equal-size partial sums: add(v) folds v in like a binary counter, so a
// partial made of 2^l blocks only ever meets another of 2^l blocks. The rounding error of the total
// then grows with log2(#blocks) instead of #blocks (torch's reductions do the same).
template <typename Acc> class PairwiseSum {
public:
  explicit PairwiseSum(size_t n) : n_(n) {}
  // Folds in `v` (length n); `v` is used as scratch.
  void add(std::vector<Acc>& v) {
    size_t l = 0;
    for (; l < full_.size() && full_[l]; ++l) {
      const Acc* o = levels_[l].data();
      for (size_t i = 0; i < n_; ++i)
        v[i] += o[i];
      full_[l] = false;
    }
    if (l == full_.size()) {
      levels_.emplace_back(n_);
      full_.push_back(false);
    }
    levels_[l].swap(v);
    v.resize(n_);
    full_[l] = true;
  }
  // The total, into out (length n).
  void total(Acc* out) const {
    std::fill(out, out + n_, Acc(0));
    for (size_t l = 0; l < full_.size(); ++l)
      if (full_[l])
        for (size_t i = 0; i < n_; ++i)
          out[i] += levels_[l][i];
  }

private:
  size_t n_;
  std::vector<std::vector<Acc>> levels_;
  std::vector<bool> full_;
};

#ifdef LORA_OPS_X86
// a[q0 + j] += Σ_mm left[mm · np + pp] · right[mm · Q + q0 + j] for j < 8 · NV: one output row's columns
// over a chunk of mc rows, the chunk summed first (the lowest level of lora_outer_typed's tree).
template <int NV>
LORA_AVX2 void outer_chunk_cols_avx2(const float* left, int64_t np, int64_t pp, const float* right, int64_t Q,
                                     int64_t q0, int64_t mc, float* a) {
  __m256 part[NV];
  for (int v = 0; v < NV; ++v)
    part[v] = _mm256_setzero_ps();
  for (int64_t mm = 0; mm < mc; ++mm) {
    const __m256 lv = _mm256_set1_ps(left[mm * np + pp]);
    const float* rr = right + mm * Q + q0;
    for (int v = 0; v < NV; ++v)
      part[v] = _mm256_fmadd_ps(lv, _mm256_loadu_ps(rr + 8 * v), part[v]);
  }
  for (int v = 0; v < NV; ++v)
    _mm256_storeu_ps(a + q0 + 8 * v, _mm256_add_ps(_mm256_loadu_ps(a + q0 + 8 * v), part[v]));
}

// The whole row pp of the chunk (Q % 8 == 0), 64 columns at a time.
void outer_chunk_row_avx2(const float* left, int64_t np, int64_t pp, const float* right, int64_t Q, int64_t mc,
                          float* a) {
  int64_t q0 = 0;
  for (; q0 + 64 <= Q; q0 += 64)
    outer_chunk_cols_avx2<8>(left, np, pp, right, Q, q0, mc, a);
  switch ((Q - q0) / 8) {
  case 7: return outer_chunk_cols_avx2<7>(left, np, pp, right, Q, q0, mc, a);
  case 6: return outer_chunk_cols_avx2<6>(left, np, pp, right, Q, q0, mc, a);
  case 5: return outer_chunk_cols_avx2<5>(left, np, pp, right, Q, q0, mc, a);
  case 4: return outer_chunk_cols_avx2<4>(left, np, pp, right, Q, q0, mc, a);
  case 3: return outer_chunk_cols_avx2<3>(left, np, pp, right, Q, q0, mc, a);
  case 2: return outer_chunk_cols_avx2<2>(left, np, pp, right, Q, q0, mc, a);
  case 1: return outer_chunk_cols_avx2<1>(left, np, pp, right, Q, q0, mc, a);
  default: return;
  }
}
#endif

#ifdef LORA_OPS_X86
// The same chunk for all output rows at once, with the accumulators transposed (acc_t[q · np + pp]) and
// vectors along pp: for few columns (dB = dyᵀ·s has Q = r), where outer_chunk_cols_avx2 would be called
// once per output row for one or two vectors. Per element the same operations in the same order as
// there (the chunk's rows fused-multiply-added from 0, then added to the accumulator): the same bits;
// Q % 8 != 0 had taken the generic loop (products and sums rounded separately) before.
LORA_AVX2 void outer_chunk_transposed_avx2(const float* left, int64_t np, const float* right, int64_t Q, int64_t mc,
                                           float* acc_t) {
  constexpr int kMaxChunk = 8;
  for (int64_t q = 0; q < Q; ++q) {
    __m256 rv[kMaxChunk];
    for (int64_t mm = 0; mm < mc; ++mm)
      rv[mm] = _mm256_set1_ps(right[mm * Q + q]);
    float* a = acc_t + q * np;
    int64_t pp = 0;
    for (; pp + 8 <= np; pp += 8) {
      __m256 part = _mm256_setzero_ps();
      for (int64_t mm = 0; mm < mc; ++mm)
        part = _mm256_fmadd_ps(rv[mm], _mm256_loadu_ps(left + mm * np + pp), part);
      _mm256_storeu_ps(a + pp, _mm256_add_ps(_mm256_loadu_ps(a + pp), part));
    }
    for (; pp < np; ++pp) {
      float part = 0.0f;
      for (int64_t mm = 0; mm < mc; ++mm)
        part = __builtin_fmaf(right[mm * Q + q], left[mm * np + pp], part);
      a[pp] += part;
    }
  }
}
#endif

#ifdef LORA_OPS_X86
// acc[j · lda + 8 v ..] += Σ_mm big[mm · ldb + j] · small[mm · lds + 8 v ..] over a chunk of mc rows, for
// NG big-side columns x NV · 8 ranks: the chunk summed from zero by fused multiply-adds in row order,
// then added -- per element the operations of outer_chunk_cols_avx2 / outer_chunk_transposed_avx2.
template <int NG, int NV>
LORA_AVX2 inline __attribute__((always_inline)) void outer_tile_avx2(const float* big, int64_t ldb, const float* small, int64_t lds, int64_t mc, float* acc,
                               int64_t lda) {
  __m256 part[NG][NV];
  for (int j = 0; j < NG; ++j)
    for (int v = 0; v < NV; ++v)
      part[j][v] = _mm256_setzero_ps();
  for (int64_t mm = 0; mm < mc; ++mm) {
    __m256 sv[NV];
    for (int v = 0; v < NV; ++v)
      sv[v] = _mm256_loadu_ps(small + mm * lds + 8 * v);
    for (int j = 0; j < NG; ++j) {
      const __m256 g = _mm256_set1_ps(big[mm * ldb + j]);
      for (int v = 0; v < NV; ++v)
        part[j][v] = _mm256_fmadd_ps(g, sv[v], part[j][v]);
    }
  }
  for (int j = 0; j < NG; ++j)
    for (int v = 0; v < NV; ++v)
      _mm256_storeu_ps(acc + j * lda + 8 * v, _mm256_add_ps(_mm256_loadu_ps(acc + j * lda + 8 * v), part[j][v]));
}

// One chunk: cols big-side columns x all r (% 8 == 0) ranks.
LORA_AVX2 void outer_chunk_tiles_avx2(const float* big, int64_t ldb, int64_t cols, const float* small, int64_t lds, int64_t r,
                            int64_t mc, float* acc) {
  constexpr int kNG = 4;
  int64_t j = 0;
  for (; j + kNG <= cols; j += kNG) {
    int64_t q0 = 0;
    for (; q0 + 16 <= r; q0 += 16)
      outer_tile_avx2<kNG, 2>(big + j, ldb, small + q0, lds, mc, acc + j * r + q0, r);
    if (q0 < r)
      outer_tile_avx2<kNG, 1>(big + j, ldb, small + q0, lds, mc, acc + j * r + q0, r);
  }
  for (; j < cols; ++j) {
    int64_t q0 = 0;
    for (; q0 + 16 <= r; q0 += 16)
      outer_tile_avx2<1, 2>(big + j, ldb, small + q0, lds, mc, acc + j * r + q0, r);
    if (q0 < r)
      outer_tile_avx2<1, 1>(big + j, ldb, small + q0, lds, mc, acc + j * r + q0, r);
  }
}
#endif

// lora_outer when one side is a rank-wide fp32 matrix with contiguous rows (u in dA = uᵀ·drop(x), s in
// dB = dyᵀ·s; r % 8 == 0) and the other is long (x or dy: K or N columns). The generic kernels go over
// output rows and reload the chunk's rows per output row (~8 and ~6 ms for dA and dB of a 2048 x 4096,
// r 16 layer on 2 Zen 4 cores). Here threads take column panels of the big side; per chunk of rows the
// panel's part is converted (and masked) once into a buffer and swept by 4-column x 16-rank register
// tiles, the panel's [cols, r] accumulators staying in cache. (Narrow strips down all M rows instead
// touched a new page per row and spent as long converting as multiplying.) The reduction tree and, per
// element, every operation are lora_outer_typed's: the same bits.
struct OuterSides {
  bool small_left = false; // the small side is left (dA form: out [r, big]); else right (dB: out [big, r])
  int64_t r = 0, n_big = 0;
};

bool outer_by_panels(const LoraOuterParams& p, OuterSides* sides) {
#ifdef LORA_OPS_X86
  auto small_ok = [](int64_t n, DType t, int64_t col_stride) {
    return n % 8 == 0 && n <= kMaxLoraRank && t == DType::kFloat32 && col_stride == 1;
  };
  if (!use_avx2() || p.out_dtype == DType::kFloat64)
    return false;
  if (small_ok(p.p, p.left_dtype, p.left_col_stride) && p.q > p.p) {
    *sides = {true, p.p, p.q};
    return true;
  }
  if (small_ok(p.q, p.right_dtype, p.right_col_stride) && p.p > p.q && !p.dropout.enabled()) {
    *sides = {false, p.q, p.p};
    return true;
  }
#endif
  (void)p;
  (void)sides;
  return false;
}

void lora_outer_panels(const LoraOuterParams& p, const OuterSides& sd) {
#ifdef LORA_OPS_X86
  constexpr int64_t kChunk = 8, kBlockRows = 256; // the tree's levels: lora_outer_typed's
  constexpr int64_t kMaxCols = 512, kAlign = 16;  // panel: 512 x r=16 fp32 accumulators = 32 KiB
  const int64_t r = sd.r;
  const void* big = sd.small_left ? p.right : p.left;
  const DType big_dtype = sd.small_left ? p.right_dtype : p.left_dtype;
  const int64_t big_rs = sd.small_left ? p.right_row_stride : p.left_row_stride;
  const int64_t big_cs = sd.small_left ? p.right_col_stride : p.left_col_stride;
  const float* small = static_cast<const float*>(sd.small_left ? p.left : p.right);
  const int64_t small_rs = sd.small_left ? p.left_row_stride : p.right_row_stride;
  const bool masked = sd.small_left && p.dropout.enabled(); // dropout applies to right: here the big side
  const uint32_t key = dropout_key(p.dropout.seed);
  const bool parallel = p.m * sd.n_big * r > (1 << 16);
  // Panel width: at most kMaxCols, and narrow enough that every thread gets one.
  const int64_t nt = parallel ? omp_get_max_threads() : 1;
  const int64_t width =
      std::clamp<int64_t>((sd.n_big + nt - 1) / nt + kAlign - 1, kAlign, kMaxCols) / kAlign * kAlign;
  const int64_t panels = (sd.n_big + width - 1) / width;
  const float scale = static_cast<float>(p.scale);
#pragma omp parallel if (parallel)
  {
    std::vector<float> buf(static_cast<size_t>(kChunk * width));
    std::vector<float> acc(static_cast<size_t>(width * r)), sum(acc.size());
#pragma omp for schedule(static)
    for (int64_t panel = 0; panel < panels; ++panel) {
      const int64_t c0 = panel * width, cols = std::min(width, sd.n_big - c0);
      PairwiseSum<float> total(acc.size());
      for (int64_t b0 = 0; b0 < p.m; b0 += kBlockRows) {
        const int64_t b1 = std::min(p.m, b0 + kBlockRows);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t m0 = b0; m0 < b1; m0 += kChunk) {
          const int64_t mc = std::min(kChunk, b1 - m0);
          for (int64_t mm = 0; mm < mc; ++mm) {
            load_row(big, big_dtype, (m0 + mm) * big_rs + c0 * big_cs, big_cs, cols, buf.data() + mm * width);
            if (masked)
              mask_row(p.dropout, key, m0 + mm, cols, buf.data() + mm * width, c0);
          }
          outer_chunk_tiles_avx2(buf.data(), width, cols, small + m0 * small_rs, small_rs, r, mc, acc.data());
        }
        total.add(acc); // acc comes back as scratch: cleared at the next block
      }
      total.total(sum.data());
      for (int64_t j = 0; j < cols; ++j)
        for (int64_t q = 0; q < r; ++q)
          store_elem<float>(p.out, p.out_dtype, sd.small_left ? q * sd.n_big + c0 + j : (c0 + j) * r + q,
                            scale * sum[j * r + q]);
    }
  }
#else
  (void)p;
  (void)sd;
#endif
}

template <typename Acc> void lora_outer_typed(const LoraOuterParams& p) {
  // Threads own disjoint ranges of output rows, so no reduction across threads is needed; rows of
  // M are consumed kChunk at a time so each accumulator row is reused from L1. The reduction over M
  // is a tree: kChunk rows, then the chunks of a block of kBlockRows rows, then pairwise across
  // blocks, so a long M (dA, dB of a big batch) stays about as accurate as torch's matmul instead
  // of drifting like one sequential fp32 sum.
  constexpr int64_t kChunk = 8;
  constexpr int64_t kBlockRows = 256; // a multiple of kChunk
  if constexpr (std::is_same_v<Acc, float>) {
    OuterSides sides;
    if (outer_by_panels(p, &sides))
      return lora_outer_panels(p, sides);
  }
  const int64_t P = p.p, Q = p.q;
  const uint32_t key = dropout_key(p.dropout.seed);
  const bool parallel = p.m * P * Q > (1 << 16);
#pragma omp parallel if (parallel)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t per = (P + nt - 1) / nt;
    const int64_t p0 = std::min(P, tid * per), p1 = std::min(P, p0 + per);
    const int64_t np = p1 - p0;
    if (np > 0) {
      const size_t n_acc = static_cast<size_t>(np * Q);
      std::vector<Acc> acc(n_acc, Acc(0));
      PairwiseSum<Acc> total(n_acc);
      std::vector<Acc> left(static_cast<size_t>(kChunk * np));
      std::vector<Acc> right(static_cast<size_t>(kChunk * Q));
      std::vector<Acc> part(static_cast<size_t>(Q));
      // Few columns: the transposed chunk kernel, accumulators [Q][np].
      bool transposed = false;
#ifdef LORA_OPS_X86
      if constexpr (std::is_same_v<Acc, float>)
        transposed = use_avx2() && Q <= 32;
#endif
      for (int64_t m0 = 0; m0 < p.m; m0 += kChunk) {
        const int64_t mc = std::min(kChunk, p.m - m0);
        for (int64_t mm = 0; mm < mc; ++mm) {
          load_row(p.left, p.left_dtype, (m0 + mm) * p.left_row_stride + p0 * p.left_col_stride, p.left_col_stride, np,
                   left.data() + mm * np);
          load_row(p.right, p.right_dtype, (m0 + mm) * p.right_row_stride, p.right_col_stride, Q,
                   right.data() + mm * Q);
          if (p.dropout.enabled())
            mask_row(p.dropout, key, m0 + mm, Q, right.data() + mm * Q);
        }
        bool chunk_done = false;
#ifdef LORA_OPS_X86
        if constexpr (std::is_same_v<Acc, float>) {
          if (transposed) {
            outer_chunk_transposed_avx2(left.data(), np, right.data(), Q, mc, acc.data());
            chunk_done = true;
          } else if (use_avx2() && Q % 8 == 0) { // the same tree level, in registers
            for (int64_t pp = 0; pp < np; ++pp)
              outer_chunk_row_avx2(left.data(), np, pp, right.data(), Q, mc, acc.data() + pp * Q);
            chunk_done = true;
          }
        }
#endif
        for (int64_t pp = 0; pp < np && !chunk_done; ++pp) {
          // The chunk's kChunk rows are summed on their own first, then added: one more level of
          // the tree, which keeps short reductions (small M, a 1-element output) accurate too.
          std::fill(part.begin(), part.end(), Acc(0));
          for (int64_t mm = 0; mm < mc; ++mm) {
            const Acc lv = left[mm * np + pp];
            const Acc* rr = right.data() + mm * Q;
            for (int64_t qq = 0; qq < Q; ++qq)
              part[qq] += lv * rr[qq];
          }
          Acc* a = acc.data() + pp * Q;
          for (int64_t qq = 0; qq < Q; ++qq)
            a[qq] += part[qq];
        }
        if ((m0 + kChunk) % kBlockRows == 0 || m0 + kChunk >= p.m) {
          total.add(acc); // acc comes back as scratch: clear it for the next block
          std::fill(acc.begin(), acc.end(), Acc(0));
        }
      }
      total.total(acc.data());
      const Acc scale = static_cast<Acc>(p.scale);
      for (int64_t pp = 0; pp < np; ++pp)
        for (int64_t qq = 0; qq < Q; ++qq)
          store_elem<Acc>(p.out, p.out_dtype, (p0 + pp) * Q + qq,
                          scale * acc[transposed ? qq * np + pp : pp * Q + qq]);
    }
  }
}

// Outputs of lora_down up to this many (m · r) take lora_down_fp64. Each element of s (or u) scales a whole
// row of the gradient it feeds (dB[:, q] = scale·dyᵀ·s[:, q] at M = 1; dA[q, :] likewise with u), so with
// few rows its rounding error is not averaged away: an fp32 sum's error under cancellation, compared
// with plain PyTorch's, was more than 2x it in 16 % of random draws at M = 2, N = 257, r = 1.
constexpr int64_t kFp64DownOutputs = 16;

// Σ_i row[i] · f[i] with fp64 accumulation: products of fp32 values are exact in fp64, so the sum is
// within ~L · 2^-53 of exact and the one rounding to fp32 is the result's only error of note.
#ifdef LORA_OPS_X86
LORA_AVX2 double dot_fp64_avx2(const float* row, const float* f, int64_t L) {
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= L; i += 8) {
    const __m256 x = _mm256_loadu_ps(row + i), y = _mm256_loadu_ps(f + i);
    const __m128 x_lo = _mm256_castps256_ps128(x), y_lo = _mm256_castps256_ps128(y);
    const __m128 x_hi = _mm256_extractf128_ps(x, 1), y_hi = _mm256_extractf128_ps(y, 1);
    a0 = _mm256_fmadd_pd(_mm256_cvtps_pd(x_lo), _mm256_cvtps_pd(y_lo), a0);
    a1 = _mm256_fmadd_pd(_mm256_cvtps_pd(x_hi), _mm256_cvtps_pd(y_hi), a1);
  }
  alignas(32) double l[4];
  _mm256_store_pd(l, _mm256_add_pd(a0, a1));
  double acc = (l[0] + l[1]) + (l[2] + l[3]);
  for (; i < L; ++i)
    acc += static_cast<double>(row[i]) * f[i];
  return acc;
}
#endif

double dot_fp64(const float* row, const float* f, int64_t L) {
#ifdef LORA_OPS_X86
  if (use_avx2())
    return dot_fp64_avx2(row, f, L);
#endif
  double acc[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= L; i += 4)
    for (int j = 0; j < 4; ++j)
      acc[j] += static_cast<double>(row[i + j]) * f[i + j];
  for (; i < L; ++i)
    acc[0] += static_cast<double>(row[i]) * f[i];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// lora_down for few outputs (m · r <= kFp64DownOutputs), fp32 output: rows and factor rows as fp32 (exact
// widenings; fp32 factor rows with unit stride, the forward's A, are read in place), each dot accumulated
// in fp64 and rounded once.
void lora_down_fp64(const LoraDownParams& p) {
  const int64_t r = p.rank, L = p.l;
  const uint32_t key = dropout_key(p.dropout.seed);
  const bool f_in_place = p.f_dtype == DType::kFloat32 && p.f_stride_l == 1;
  std::vector<float> rows(static_cast<size_t>(p.m * L)), fr(f_in_place ? 0 : static_cast<size_t>(r * L));
  const bool parallel = p.m * r * L >= (int64_t{1} << 16);
#pragma omp parallel if (parallel)
  {
#pragma omp for schedule(static) nowait
    for (int64_t m = 0; m < p.m; ++m) {
      load_row(p.a, p.a_dtype, m * p.a_row_stride, p.a_col_stride, L, rows.data() + m * L);
      if (p.dropout.enabled())
        mask_row(p.dropout, key, m, L, rows.data() + m * L);
    }
    if (!f_in_place) {
#pragma omp for schedule(static) nowait
      for (int64_t q = 0; q < r; ++q)
        load_row(p.f, p.f_dtype, q * p.f_stride_q, p.f_stride_l, L, fr.data() + q * L);
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t mq = 0; mq < p.m * r; ++mq) {
      const int64_t m = mq / r, q = mq % r;
      const float* f = f_in_place ? static_cast<const float*>(p.f) + q * p.f_stride_q : fr.data() + q * L;
      static_cast<float*>(p.out)[m * p.out_row_stride + q] = static_cast<float>(dot_fp64(rows.data() + m * L, f, L));
    }
  }
}

// lora_outer with at most this many outputs (p · q) takes lora_outer_fp64: with so few elements (dA of a
// K = 1 layer, dB of an N = 1 layer), each is its own mean-relative error; in fp64 they cost at most
// 16 · M multiply-adds.
constexpr int64_t kFp64OuterOutputs = 16;

// out[pp, qq] = scale · Σ_m left[m, pp] · drop(right)[m, qq], one fp64 sum per element (exact products of
// fp32 values), in order over m on one thread, rounded once to the output dtype (fp32; bf16 / fp16 through
// fp32).
void lora_outer_fp64(const LoraOuterParams& p) {
  const int64_t np = p.p, Q = p.q;
  const uint32_t key = dropout_key(p.dropout.seed);
  std::vector<float> l(static_cast<size_t>(np)), rr(static_cast<size_t>(Q));
  std::vector<double> acc(static_cast<size_t>(np * Q), 0.0);
  for (int64_t m = 0; m < p.m; ++m) {
    load_row(p.left, p.left_dtype, m * p.left_row_stride, p.left_col_stride, np, l.data());
    load_row(p.right, p.right_dtype, m * p.right_row_stride, p.right_col_stride, Q, rr.data());
    if (p.dropout.enabled())
      mask_row(p.dropout, key, m, Q, rr.data());
    for (int64_t pp = 0; pp < np; ++pp)
      for (int64_t qq = 0; qq < Q; ++qq)
        acc[pp * Q + qq] += static_cast<double>(l[pp]) * rr[qq];
  }
  const double scale = static_cast<float>(p.scale); // rounded to float once, as the fp32 paths do
  for (int64_t i = 0; i < np * Q; ++i)
    store_elem<double>(p.out, p.out_dtype, i, scale * acc[i]);
}

} // namespace

void lora_down(const LoraDownParams& p) {
  if (p.m == 0)
    return;
  if (p.a_dtype == DType::kFloat64)
    return lora_down_typed<double>(p);
  if (p.m * p.rank <= kFp64DownOutputs)
    return lora_down_fp64(p);
  lora_down_typed<float>(p);
}

void lora_outer(const LoraOuterParams& p) {
  if (p.out_dtype == DType::kFloat64 || p.left_dtype == DType::kFloat64 || p.right_dtype == DType::kFloat64)
    return lora_outer_typed<double>(p);
  if (p.p * p.q <= kFp64OuterOutputs)
    return lora_outer_fp64(p);
  lora_outer_typed<float>(p);
}

} // namespace lora_ops::cpu
