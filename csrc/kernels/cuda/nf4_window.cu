// A window W[r0:r1, c0:c1] of the NF4 weight decoded to the values of the compute dtype (T(c·absmax), or
// the fp32 product for fp32 compute), row pitch ld: the GEMM operand of the slab path
// (csrc/bindings/qlora_slab.cpp), bit-identical to cpu::nf4_decode_window. As fp32 values (the fp32 GEMM)
// or as the 16-bit values themselves (bf16 / fp16 bits, the bf16 GEMM; the value is exact in its dtype,
// so the narrowing is exact). Rows over blockIdx.y, columns over the threads (coalesced stores), each
// element decoded from its own flat index (any K, any window).
// Not tuned: one code byte and one absmax read per element (L1-cached); the slab's GEMM dominates at the
// M this path serves.
#include "cuda/qlora_cuda.h"
#include "cuda/qlora_device.cuh"

namespace lora_ops::cuda {
namespace {

// The value (already exact in value_dtype) as an element of Out: fp32 as is, 16 bits as the dtype's bits.
__device__ __forceinline__ void put(float* dst, float v, DType) { *dst = v; }
__device__ __forceinline__ void put(uint16_t* dst, float v, DType t) {
  *dst = t == DType::kFloat16 ? __half_as_ushort(__float2half_rn(v)) : static_cast<uint16_t>(__float_as_uint(v) >> 16);
}

template <typename Out>
__global__ void __launch_bounds__(kNf4Threads)
    nf4_window_kernel(const Nf4Weight w, DType value_dtype, int64_t row_len, int64_t r0, int64_t rows, int64_t c0,
                      int64_t cols, Out* dst, int64_t ld, int log2_bs) {
  __shared__ float codebook[16];
  load_codebook(codebook);
  __syncthreads();
  const float offset = weight_offset(w);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t row_flat = (r0 + r) * row_len + c0;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x)
      put(dst + r * ld + c, round_to_dtype(weight_at(w, log2_bs, offset, codebook, row_flat + c), value_dtype),
          value_dtype);
  }
}

template <typename Out>
cudaError_t launch_window(const Nf4Weight& w, DType value_dtype, int64_t row_len, int64_t r0, int64_t r1, int64_t c0,
                          int64_t c1, Out* dst, int64_t ld, cudaStream_t stream) {
  if (r1 < r0 || c1 < c0 || ld < c1 - c0 || !nf4_valid_blocksize(w.blocksize)) return cudaErrorInvalidValue;
  const int64_t rows = r1 - r0, cols = c1 - c0;
  if (rows == 0 || cols == 0) return cudaSuccess;
  const int64_t gx = (cols + kNf4Threads - 1) / kNf4Threads;
  const dim3 grid(static_cast<unsigned>(gx < 64 ? gx : 64), static_cast<unsigned>(rows < 65535 ? rows : 65535));
  nf4_window_kernel<Out><<<grid, kNf4Threads, 0, stream>>>(w, value_dtype, row_len, r0, rows, c0, cols, dst, ld,
                                                           log2_blocksize(w.blocksize));
  return cudaGetLastError();
}

}  // namespace

cudaError_t nf4_decode_window(const Nf4Weight& w, DType value_dtype, int64_t row_len, int64_t r0, int64_t r1,
                              int64_t c0, int64_t c1, float* dst, int64_t ld, cudaStream_t stream) {
  return launch_window(w, value_dtype, row_len, r0, r1, c0, c1, dst, ld, stream);
}

cudaError_t nf4_decode_window_16bit(const Nf4Weight& w, DType value_dtype, int64_t row_len, int64_t r0, int64_t r1,
                                    int64_t c0, int64_t c1, uint16_t* dst, int64_t ld, cudaStream_t stream) {
  if (value_dtype != DType::kBFloat16 && value_dtype != DType::kFloat16) return cudaErrorInvalidValue;
  return launch_window(w, value_dtype, row_len, r0, r1, c0, c1, dst, ld, stream);
}

}  // namespace lora_ops::cuda
