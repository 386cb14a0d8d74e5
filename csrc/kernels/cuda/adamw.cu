// CUDA multi-tensor AdamW step: one launch updates up to kMaxTensors tensors of one parameter dtype,
// every block taking one kChunkElems-element chunk of one tensor.
//
//   grid:  [ t0 chunk 0 | t0 chunk 1 | ... | t1 chunk 0 | ... ]   first_block[i] = prefix sum of chunks
//   block: kThreads threads; iteration it, thread tid handles kVec consecutive elements at
//          chunk_begin + (it * kThreads + tid) * kVec, so each warp access is contiguous.
//
// Memory-bound: per element it reads param, grad, exp_avg, exp_avg_sq and writes three of them, all
// with 16-byte accesses (kVec = 16 / sizeof(param): 4 fp32 or 8 fp16/bf16 elements; the fp32 state
// then takes one or two float4 per array). Streaming cache hints (ld/st .cs): every byte is touched
// once per step, so it should not evict other data from L2. Math in fp32 with the single-rounding
// helpers of adamw_params.h (no FMA contraction): the same bits as the CPU kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <vector>

#include "cuda/adamw.h"

namespace lora_ops::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkElems = 8192; // per block: 8 (fp32) or 4 (16-bit) iterations of kThreads * kVec
constexpr int kMaxTensors = 36;       // keeps AdamwLaunchArgs under the portable 4 KiB kernel-argument limit

struct AdamwLaunchTensor {
  void* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  int64_t numel;
  int64_t first_block; // index of this tensor's first block in the grid
  AdamwHyper hyper;
  int32_t vec_ok; // every pointer 16-byte aligned: use the vector path
};

struct AdamwLaunchArgs {
  int32_t n_tensors;
  AdamwLaunchTensor t[kMaxTensors];
};
static_assert(sizeof(AdamwLaunchArgs) <= 4096, "kernel arguments must stay within 4 KiB");

// Storage <-> float conversions, round-to-nearest-even like the CPU kernel (cpu/float_convert.h).
template <typename T> struct Conv;
template <> struct Conv<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <> struct Conv<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <> struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// kVec elements of T as one 16-byte register block.
template <typename T> union Pack16 {
  static constexpr int kVec = 16 / sizeof(T);
  uint4 raw;
  T v[kVec];
};

template <bool kMaximize, bool kSmallW1, typename T>
__device__ __forceinline__ void update_vector(const AdamwLaunchTensor& t, int64_t i) {
  constexpr int kVec = Pack16<T>::kVec;
  constexpr int kF4 = kVec / 4; // float4 per state array
  Pack16<T> p, g;
  p.raw = __ldcs(reinterpret_cast<const uint4*>(static_cast<T*>(t.param) + i));
  g.raw = __ldcs(reinterpret_cast<const uint4*>(static_cast<const T*>(t.grad) + i));
  float4 m[kF4], v[kF4];
  float4* m_ptr = reinterpret_cast<float4*>(t.exp_avg + i);
  float4* v_ptr = reinterpret_cast<float4*>(t.exp_avg_sq + i);
#pragma unroll
  for (int j = 0; j < kF4; ++j) {
    m[j] = __ldcs(m_ptr + j);
    v[j] = __ldcs(v_ptr + j);
  }
  float* mf = reinterpret_cast<float*>(m);
  float* vf = reinterpret_cast<float*>(v);
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    float pe = Conv<T>::load(p.v[e]);
    adamw_update_element<kMaximize, kSmallW1>(pe, Conv<T>::load(g.v[e]), mf[e], vf[e], t.hyper);
    p.v[e] = Conv<T>::store(pe);
  }
  __stcs(reinterpret_cast<uint4*>(static_cast<T*>(t.param) + i), p.raw);
#pragma unroll
  for (int j = 0; j < kF4; ++j) {
    __stcs(m_ptr + j, m[j]);
    __stcs(v_ptr + j, v[j]);
  }
}

template <bool kMaximize, bool kSmallW1, typename T>
__device__ __forceinline__ void update_scalar(const AdamwLaunchTensor& t, int64_t i) {
  T* param = static_cast<T*>(t.param);
  float pe = Conv<T>::load(param[i]);
  adamw_update_element<kMaximize, kSmallW1>(pe, Conv<T>::load(static_cast<const T*>(t.grad)[i]), t.exp_avg[i],
                                            t.exp_avg_sq[i], t.hyper);
  param[i] = Conv<T>::store(pe);
}

template <bool kMaximize, bool kSmallW1, typename T>
__device__ __forceinline__ void update_chunk(const AdamwLaunchTensor& t, int64_t begin, int64_t end) {
  constexpr int kVec = Pack16<T>::kVec;
  if (t.vec_ok) {
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec; i < vec_end; i += kThreads * kVec) {
      update_vector<kMaximize, kSmallW1, T>(t, i);
    }
    for (int64_t i = vec_end + threadIdx.x; i < end; i += kThreads)
      update_scalar<kMaximize, kSmallW1, T>(t, i);
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads)
      update_scalar<kMaximize, kSmallW1, T>(t, i);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) adamw_multi_tensor_kernel(const __grid_constant__ AdamwLaunchArgs args) {
  // The block's tensor: a uniform scan over at most kMaxTensors prefix sums held in kernel arguments.
  const int64_t block = blockIdx.x;
  int ti = 0;
  while (ti + 1 < args.n_tensors && block >= args.t[ti + 1].first_block)
    ++ti;
  const AdamwLaunchTensor& t = args.t[ti];
  const int64_t begin = (block - t.first_block) * kChunkElems;
  const int64_t end = begin + kChunkElems < t.numel ? begin + kChunkElems : t.numel;
  // Per-tensor branches become template parameters (uniform over the block).
  const bool small_w1 = adamw_small_w1(t.hyper);
  if (t.hyper.maximize) {
    if (small_w1)
      update_chunk<true, true, T>(t, begin, end);
    else
      update_chunk<true, false, T>(t, begin, end);
  } else {
    if (small_w1)
      update_chunk<false, true, T>(t, begin, end);
    else
      update_chunk<false, false, T>(t, begin, end);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T> cudaError_t launch_dtype(const AdamwStepParams& p, DType dtype, cudaStream_t stream) {
  AdamwLaunchArgs args{};
  int64_t n_blocks = 0;
  auto flush = [&]() -> cudaError_t {
    if (args.n_tensors == 0)
      return cudaSuccess;
    if (n_blocks > INT_MAX)
      return cudaErrorInvalidValue;
    adamw_multi_tensor_kernel<T><<<static_cast<unsigned>(n_blocks), kThreads, 0, stream>>>(args);
    const cudaError_t err = cudaGetLastError();
    args.n_tensors = 0;
    n_blocks = 0;
    return err;
  };
  for (int64_t i = 0; i < p.n_tensors; ++i) {
    const AdamwTensor& src = p.tensors[i];
    if (src.dtype != dtype || src.numel == 0)
      continue;
    if (src.hyper < 0 || src.hyper >= p.n_hypers)
      return cudaErrorInvalidValue;
    AdamwLaunchTensor& t = args.t[args.n_tensors++];
    t.param = src.param;
    t.grad = src.grad;
    t.exp_avg = src.exp_avg;
    t.exp_avg_sq = src.exp_avg_sq;
    t.numel = src.numel;
    t.first_block = n_blocks;
    t.hyper = p.hypers[src.hyper];
    t.vec_ok = aligned16(src.param) && aligned16(src.grad) && aligned16(src.exp_avg) && aligned16(src.exp_avg_sq);
    n_blocks += (src.numel + kChunkElems - 1) / kChunkElems;
    if (args.n_tensors == kMaxTensors) {
      const cudaError_t err = flush();
      if (err != cudaSuccess)
        return err;
    }
  }
  return flush();
}

} // namespace

cudaError_t adamw_step(const AdamwStepParams& p, cudaStream_t stream) {
  cudaError_t err = launch_dtype<float>(p, DType::kFloat32, stream);
  if (err == cudaSuccess)
    err = launch_dtype<__nv_bfloat16>(p, DType::kBFloat16, stream);
  if (err == cudaSuccess)
    err = launch_dtype<__half>(p, DType::kFloat16, stream);
  return err;
}

} // namespace lora_ops::cuda
