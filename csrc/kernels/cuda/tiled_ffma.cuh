// A plain shared-memory tiled FFMA GEMM, C[i, j] = Σ_t A(i, t) · B(t, j), with operand loaders and an
// output sink supplied as functors. It serves the small / memory-bound products of the LoRA side path
// (lora_down, lora_outer) and the always-correct fallback of the fused QLoRA matmul (fp32 activations,
// or layouts the vector paths cannot take). Every access is bounds-checked and scalar, so any shape,
// stride and alignment works; fp32 accumulation.
//
//   CTA tile 64 (i) x 64 (j), reduction step 16, 256 threads, 4 x 4 outputs per thread:
//
//        j0 ........ j0+63                thread (tx = tid % 16, ty = tid / 16) owns
//   i0  +--------------------+            rows    i0 + ty + 16·a  (a = 0..3)
//   ..  |  16 x 16 threads,  |            columns j0 + tx + 16·b  (b = 0..3)
//   ..  |  each 4 x 4,       |            (strided, so a warp's shared-memory reads hit 16 consecutive
//  i0+63|  strided by 16     |             words of Bs and 2 broadcast words of As: conflict-free)
//       +--------------------+
//
// Split-K: blockIdx.z picks the reduction range [z·t_per_split, (z+1)·t_per_split); the sink gets z.
#pragma once
#include <cstdint>

namespace lora_ops::cuda {

constexpr int kFfmaTile = 64;
constexpr int kFfmaStep = 16;
constexpr int kFfmaThreads = 256;

// AOp: float load(i, t) const, bool kTFastest (true when consecutive t are adjacent in memory).
// BOp: float load(t, j) const, bool kTFastest.  Sink: void store(i, j, z, float acc) const.
// Loaders are only called in range (0 <= i < I, 0 <= j < J, t in the split's range).
template <class AOp, class BOp, class Sink>
__global__ void __launch_bounds__(kFfmaThreads)
    tiled_ffma_kernel(const AOp a, const BOp b, const Sink sink, int64_t I, int64_t J, int64_t T, int64_t t_per_split) {
  __shared__ float As[kFfmaStep][kFfmaTile + 1];
  __shared__ float Bs[kFfmaStep][kFfmaTile + 1];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kFfmaTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kFfmaTile;
  const int z = blockIdx.z;
  const int64_t tb = static_cast<int64_t>(z) * t_per_split;
  const int64_t te = tb + t_per_split < T ? tb + t_per_split : T;

  float acc[4][4];
#pragma unroll
  for (int x = 0; x < 4; ++x)
#pragma unroll
    for (int y = 0; y < 4; ++y) acc[x][y] = 0.0f;

  for (int64_t t0 = tb; t0 < te; t0 += kFfmaStep) {
    // 64 x 16 elements per operand, 4 per thread. Element e -> (outer, t) with t fastest when the
    // operand is contiguous along t (coalesced global reads), else outer fastest.
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int e = tid + u * kFfmaThreads;
      const int ta = AOp::kTFastest ? e % kFfmaStep : e / kFfmaTile;
      const int ia = AOp::kTFastest ? e / kFfmaStep : e % kFfmaTile;
      const int64_t gi = i0 + ia, gt = t0 + ta;
      As[ta][ia] = (gi < I && gt < te) ? a.load(gi, gt) : 0.0f;
      const int tb_ = BOp::kTFastest ? e % kFfmaStep : e / kFfmaTile;
      const int jb = BOp::kTFastest ? e / kFfmaStep : e % kFfmaTile;
      const int64_t gj = j0 + jb, gt2 = t0 + tb_;
      Bs[tb_][jb] = (gj < J && gt2 < te) ? b.load(gt2, gj) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kFfmaStep; ++t) {
      float av[4], bv[4];
#pragma unroll
      for (int x = 0; x < 4; ++x) av[x] = As[t][ty + 16 * x];
#pragma unroll
      for (int y = 0; y < 4; ++y) bv[y] = Bs[t][tx + 16 * y];
#pragma unroll
      for (int x = 0; x < 4; ++x)
#pragma unroll
        for (int y = 0; y < 4; ++y) acc[x][y] = fmaf(av[x], bv[y], acc[x][y]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int x = 0; x < 4; ++x) {
    const int64_t gi = i0 + ty + 16 * x;
    if (gi >= I) continue;
#pragma unroll
    for (int y = 0; y < 4; ++y) {
      const int64_t gj = j0 + tx + 16 * y;
      if (gj < J) sink.store(gi, gj, z, acc[x][y]);
    }
  }
}

// Grid of tiled_ffma_kernel for an I x J output with `splits` reduction splits. CUDA limits grid.y and
// grid.z to 65535: I <= 65535 * 64 rows (M up to 4 million) and splits <= 65535.
inline dim3 tiled_ffma_grid(int64_t I, int64_t J, int splits) {
  return dim3(static_cast<unsigned>((J + kFfmaTile - 1) / kFfmaTile), static_cast<unsigned>((I + kFfmaTile - 1) / kFfmaTile),
              static_cast<unsigned>(splits));
}

// Reduction length per split: a multiple of the step, so splits never share a step.
inline int64_t tiled_ffma_t_per_split(int64_t T, int splits) {
  const int64_t per = (T + splits - 1) / splits;
  const int64_t rounded = (per + kFfmaStep - 1) / kFfmaStep * kFfmaStep;
  return rounded > 0 ? rounded : kFfmaStep;
}

// Splits actually launched (>= 1; may be fewer than asked once the length is rounded to steps).
inline int64_t tiled_ffma_effective_splits(int64_t T, int splits) {
  const int64_t per = tiled_ffma_t_per_split(T, splits);
  const int64_t eff = (T + per - 1) / per;
  return eff > 0 ? eff : 1;
}

}  // namespace lora_ops::cuda
