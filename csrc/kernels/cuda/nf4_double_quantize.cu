// Double quantization of absmax on the GPU, bit-identical to cpu::nf4_double_quantize:
// one CTA (256 threads) per nested block of 256 absmax values, grid-stride over nested blocks.
//
//   a[i]       = absmax[i] - offset                       (float32, offset read from device memory)
//   absmax2[g] = max |a| over the nested block             (NaN ignored, like std::max in the CPU loop)
//   q[i]       = #{ midpoints m_k of the dynamic map : m_k < a[i] * (1/absmax2[g]) }
//              = the nearest map entry, ties to the lower index (code 127 when absmax2 == 0)
//
// The 255 midpoints of adjacent float32 map values are exact in float64, so comparing the float32
// product against them in float64 is an exact nearest search (spec section 5).
#include <cmath>

#include "common/nf4_format.h"
#include "cuda/nf4_cuda.h"
#include "cuda/nf4_device.cuh"

namespace lora_ops::cuda {
namespace {

static_assert(kNestedBlocksize == kNf4Threads, "one thread per absmax value of a nested block");

// std::lower_bound over the 255 midpoints, step for step (same halving, same comparisons), so the
// GPU returns the CPU's index even for a map that is not sorted. A NaN compares false: index 0.
__device__ __forceinline__ uint8_t count_midpoints_below(const double* mid, double v) {
  int first = 0, len = 255;
  while (len > 0) {
    const int half = len >> 1;
    if (mid[first + half] < v) {
      first += half + 1;
      len -= half + 1;
    } else {
      len = half;
    }
  }
  return static_cast<uint8_t>(first);
}

// Max over the 256 threads of the CTA of non-negative floats (warp shuffles, then the 8 warp
// maxima through shared memory, double-buffered by block parity: one __syncthreads per block).
__device__ __forceinline__ float cta_max(float v, float (*warp_max)[kNf4Threads / 32], int parity) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if (threadIdx.x % 32 == 0) warp_max[parity][threadIdx.x / 32] = v;
  __syncthreads();
  float m = warp_max[parity][0];
#pragma unroll
  for (int w = 1; w < kNf4Threads / 32; ++w) m = fmaxf(m, warp_max[parity][w]);
  return m;
}

__global__ void __launch_bounds__(kNf4Threads)
    nf4_double_quantize_kernel(const float* __restrict__ absmax, int64_t n_blocks, const float* __restrict__ offset_ptr,
                               const float* __restrict__ nested_code, uint8_t* __restrict__ qabsmax,
                               float* __restrict__ absmax2) {
  __shared__ double mid[255];
  __shared__ float warp_max[2][kNf4Threads / 32];
  // (c[k] + c[k+1]) / 2 in float64, as the CPU kernel computes it: the sum of two floats is exact
  // here and halving is exact, so the explicit _rn forms only keep the compiler from fusing.
  if (threadIdx.x < 255)
    mid[threadIdx.x] =
        __dmul_rn(__dadd_rn(static_cast<double>(nested_code[threadIdx.x]), static_cast<double>(nested_code[threadIdx.x + 1])), 0.5);
  const float offset = *offset_ptr;
  __syncthreads();
  const int64_t n_groups = (n_blocks + kNestedBlocksize - 1) / kNestedBlocksize;
  int parity = 0;
  for (int64_t g = blockIdx.x; g < n_groups; g += gridDim.x, parity ^= 1) {
    const int64_t i = g * kNestedBlocksize + threadIdx.x;
    const bool valid = i < n_blocks;
    const float a = valid ? LORA_FSUB_RN(absmax[i], offset) : 0.0f;
    // The CPU loop's std::max(amax2, |a|) never lets a NaN in; dropping NaN here keeps that.
    const float amax2 = cta_max(valid && !isnan(a) ? fabsf(a) : 0.0f, warp_max, parity);
    if (threadIdx.x == 0) absmax2[g] = amax2;
    if (!valid) continue;
    if (amax2 == 0.0f) {
      qabsmax[i] = kDynamicMapZeroCode;
    } else {
      const Nf4Normalizer r = nf4_normalizer(amax2);  // correctly rounded, as on the CPU
      qabsmax[i] = count_midpoints_below(mid, static_cast<double>(nf4_normalize(a, r)));
    }
  }
}

}  // namespace

cudaError_t nf4_double_quantize(const Nf4DoubleQuantParams& p, cudaStream_t stream) {
  if (p.n_blocks < 0) return cudaErrorInvalidValue;
  if (p.n_blocks == 0) return cudaSuccess;
  if (!p.absmax || !p.offset || !p.nested_code || !p.qabsmax || !p.absmax2) return cudaErrorInvalidValue;
  const int64_t n_groups = (p.n_blocks + kNestedBlocksize - 1) / kNestedBlocksize;
  int grid = 0;
  cudaError_t err = persistent_grid(nf4_double_quantize_kernel, n_groups, 0, &grid);
  if (err != cudaSuccess) return err;
  nf4_double_quantize_kernel<<<grid, kNf4Threads, 0, stream>>>(p.absmax, p.n_blocks, p.offset, p.nested_code,
                                                               p.qabsmax, p.absmax2);
  return cudaGetLastError();
}

}  // namespace lora_ops::cuda
