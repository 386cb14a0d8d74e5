// Device-side pieces shared by the NF4 CUDA kernels: element types, exact conversions, the NF4
// codebook as a constant-memory source for shared-memory tables, and launch-size helpers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dtype.h"
#include "common/nf4_format.h"

// Build contract: never compile these files with --use_fast_math or -ftz=true. The format's
// bit-exactness relies on IEEE float32 with denormals (a subnormal absmax or product must round as on
// the CPU), and nvcc offers no macro to detect -ftz here. CMakeLists.txt passes neither flag.
#if defined(__USE_FAST_MATH__)
#error "lora_ops NF4 kernels must not be built with --use_fast_math (bit-exact IEEE float32 required)"
#endif

namespace lora_ops::cuda {

// CTA size of every NF4 kernel: 8 warps, enough for full occupancy at <= 32 registers/thread and
// small enough that the per-CTA shared-memory tables stay cheap to fill.
constexpr int kNf4Threads = 256;

// The codebook in constant memory: kernels copy it ONCE per CTA into shared memory (16 lanes, one
// value each), because per-element lookups with divergent indices would serialize in the constant
// cache but are conflict-free in shared memory (16 words in 16 distinct banks).
static __constant__ float kNf4CodebookDevice[16] = {LORA_OPS_NF4_VALUES};

// Exact widening to float32 (fp16/bf16 -> fp32 is lossless), the first step of quantize.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Element i of a 16-byte vector load (words w[0..3], little-endian) widened to float32. Taking the
// bits out of the words (instead of reinterpret_cast of the vector to T*) keeps the code free of
// type-punning through pointers, which optimizing compilers may assume never happens.
template <typename T>
__device__ __forceinline__ float widen_element(const uint32_t (&w)[4], int i);
template <>
__device__ __forceinline__ float widen_element<float>(const uint32_t (&w)[4], int i) { return __uint_as_float(w[i]); }
template <>
__device__ __forceinline__ float widen_element<__half>(const uint32_t (&w)[4], int i) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w[i / 2] >> (16 * (i % 2)))));
}
template <>
__device__ __forceinline__ float widen_element<__nv_bfloat16>(const uint32_t (&w)[4], int i) {
  return __uint_as_float((w[i / 2] >> (16 * (i % 2))) << 16);  // bf16 is the top half of a float32
}

// Two decoded float32 values rounded ONCE each to a 16-bit type and packed little-endian (first
// element in the low half), so a 16-byte store writes 8 consecutive outputs. The paired
// conversions round to nearest even exactly like __float2half_rn / __float2bfloat16_rn (one
// cvt.rn.{f16,bf16}x2.f32 instead of two), i.e. like the CPU kernel's float_to_fp16/bf16.
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return __half_as_ushort(h.x) | (static_cast<uint32_t>(__half_as_ushort(h.y)) << 16);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return __bfloat16_as_ushort(h.x) | (static_cast<uint32_t>(__bfloat16_as_ushort(h.y)) << 16);
}

// One output element, rounded once to its type (tail and unaligned paths).
__device__ __forceinline__ void store_one(float* out, int64_t i, float v) { out[i] = v; }
__device__ __forceinline__ void store_one(__half* out, int64_t i, float v) { out[i] = __float2half_rn(v); }
__device__ __forceinline__ void store_one(__nv_bfloat16* out, int64_t i, float v) {
  out[i] = __float2bfloat16_rn(v);
}

// True when a pointer allows `bytes`-wide vector accesses (torch allocations are 256-byte aligned,
// but a view with a storage offset need not be).
inline bool is_aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Persistent-grid size: as many CTAs as can be resident at once (occupancy API), capped by the
// work. Grid-stride loops inside the kernels cover the rest, so sizes beyond 2^31 need no special
// launch shape.
template <typename Kernel>
cudaError_t persistent_grid(Kernel kernel, int64_t work_items, int smem_bytes, int* grid) {
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kNf4Threads, smem_bytes);
  if (err != cudaSuccess) return err;
  const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  const int64_t g = work_items < resident ? work_items : resident;
  *grid = static_cast<int>(g > 0 ? g : 1);
  return cudaSuccess;
}

}  // namespace lora_ops::cuda
