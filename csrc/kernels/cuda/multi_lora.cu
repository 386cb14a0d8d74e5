// Per-row multi-adapter LoRA term on the GPU (multi_lora_cuda.h). Two launches, no host synchronization:
//   shrink  s[m, q] = scale[c] · x[m]·A[c][q]   one warp per (row, rank index), lanes stride K, fp32 sums
//                                              reduced by shuffles in a fixed order (deterministic)
//   expand  out[m, n] = round(out[m, n] + Σ_q s[m, q]·Bt[c][q, n])   one thread per output, q ascending;
//                                              Bt rows are contiguous in n, so a warp's loads coalesce
// A row with c < 0 or rank 0 is skipped by both (its out row, the base term, is left as it is); rank indices
// at or above the row's own rank are never read, so a small adapter in a pool of r_max costs its own rank.
#include "cuda/multi_lora_cuda.h"
#include "cuda/qlora_device.cuh"

namespace lora_ops::cuda {
namespace {

constexpr int kShrinkWarps = 8;    // rank indices per shrink CTA
constexpr int kExpandThreads = 256; // outputs per expand CTA

// out is read and then written by the same thread: a plain load (not load_as_float's read-only __ldg).
__device__ __forceinline__ float load_out(const void* out, DType t, int64_t i) {
  return t == DType::kFloat32 ? static_cast<const float*>(out)[i] : load_as_float(out, t, i);
}

__global__ void __launch_bounds__(kShrinkWarps * 32) multi_lora_shrink_kernel(const MultiLoraParams p, float* s) {
  const int64_t m = blockIdx.x;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int q = static_cast<int>(blockIdx.y) * kShrinkWarps + warp;
  const int64_t c = p.ids[m];
  if (c < 0 || q >= p.ranks[c])
    return; // whole warps leave together: no shuffle below runs with missing lanes
  const int64_t a0 = (c * p.r_max + q) * p.k;
  float acc = 0.0f;
  for (int64_t i = lane; i < p.k; i += 32)
    acc += load_as_float(p.x, p.x_dtype, m * p.x_row_stride + i * p.x_col_stride) *
           load_as_float(p.a_pool, p.a_dtype, a0 + i);
  for (int off = 16; off > 0; off /= 2)
    acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0)
    s[m * p.r_max + q] = p.scales[c] * acc;
}

__global__ void __launch_bounds__(kExpandThreads) multi_lora_expand_kernel(const MultiLoraParams p, const float* s) {
  const int64_t m = blockIdx.x;
  const int64_t n = static_cast<int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x;
  const int64_t c = p.ids[m];
  if (n >= p.n || c < 0)
    return;
  const int rank = p.ranks[c];
  if (rank == 0)
    return;
  const int64_t o = m * p.out_row_stride + n;
  float acc = load_out(p.out, p.x_dtype, o);
  const int64_t b0 = c * p.r_max * p.n + n;
  for (int q = 0; q < rank; ++q)
    acc += s[m * p.r_max + q] * load_as_float(p.bt_pool, p.b_dtype, b0 + q * p.n);
  store_as(p.out, p.x_dtype, o, acc);
}

} // namespace

size_t multi_lora_workspace_bytes(const MultiLoraParams& p) {
  return static_cast<size_t>(p.m) * static_cast<size_t>(p.r_max) * sizeof(float);
}

cudaError_t multi_lora_add(const MultiLoraParams& p, float* workspace, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0)
    return cudaSuccess;
  if (p.m > 2147483647 || p.r_max < 1 || workspace == nullptr || p.x_dtype == DType::kFloat64)
    return cudaErrorInvalidValue;
  const dim3 shrink_grid(static_cast<unsigned>(p.m),
                         static_cast<unsigned>((p.r_max + kShrinkWarps - 1) / kShrinkWarps));
  multi_lora_shrink_kernel<<<shrink_grid, kShrinkWarps * 32, 0, stream>>>(p, workspace);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return err;
  const dim3 expand_grid(static_cast<unsigned>(p.m),
                         static_cast<unsigned>((p.n + kExpandThreads - 1) / kExpandThreads));
  multi_lora_expand_kernel<<<expand_grid, kExpandThreads, 0, stream>>>(p, workspace);
  return cudaGetLastError();
}

} // namespace lora_ops::cuda
