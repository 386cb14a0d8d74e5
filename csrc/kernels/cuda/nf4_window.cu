// A window W[r0:r1, c0:c1] of the NF4 weight decoded to fp32 values of the compute dtype (T(c·absmax), or
// the fp32 product for fp32 compute), row pitch ld: the GEMM operand of the slab path
// (csrc/bindings/qlora_slab.cpp), bit-identical to cpu::nf4_decode_window. Rows over blockIdx.y, columns
// over the threads (coalesced stores), each element decoded from its own flat index (any K, any window).
// Not tuned: one code byte and one absmax read per element (L1-cached); the slab's GEMM dominates at the
// M this path serves.
#include "cuda/qlora_cuda.h"
#include "cuda/qlora_device.cuh"

namespace lora_ops::cuda {
namespace {

__global__ void __launch_bounds__(kNf4Threads)
    nf4_window_kernel(const Nf4Weight w, DType value_dtype, int64_t row_len, int64_t r0, int64_t rows, int64_t c0,
                      int64_t cols, float* dst, int64_t ld, int log2_bs) {
  __shared__ float codebook[16];
  load_codebook(codebook);
  __syncthreads();
  const float offset = weight_offset(w);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t row_flat = (r0 + r) * row_len + c0;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x)
      dst[r * ld + c] = round_to_dtype(weight_at(w, log2_bs, offset, codebook, row_flat + c), value_dtype);
  }
}

}  // namespace

cudaError_t nf4_decode_window(const Nf4Weight& w, DType value_dtype, int64_t row_len, int64_t r0, int64_t r1,
                              int64_t c0, int64_t c1, float* dst, int64_t ld, cudaStream_t stream) {
  if (r1 < r0 || c1 < c0 || ld < c1 - c0 || !nf4_valid_blocksize(w.blocksize)) return cudaErrorInvalidValue;
  const int64_t rows = r1 - r0, cols = c1 - c0;
  if (rows == 0 || cols == 0) return cudaSuccess;
  const int64_t gx = (cols + kNf4Threads - 1) / kNf4Threads;
  const dim3 grid(static_cast<unsigned>(gx < 64 ? gx : 64), static_cast<unsigned>(rows < 65535 ? rows : 65535));
  nf4_window_kernel<<<grid, kNf4Threads, 0, stream>>>(w, value_dtype, row_len, r0, rows, c0, cols, dst, ld,
                                                      log2_blocksize(w.blocksize));
  return cudaGetLastError();
}

}  // namespace lora_ops::cuda
