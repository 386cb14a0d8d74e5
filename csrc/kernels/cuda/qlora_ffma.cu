// The always-correct FFMA path of the fused QLoRA matmul: fp32 activations (no tensor-core type), and
// any layout the vector paths cannot take (odd K, unaligned views, any strides). It is the tiled FFMA
// kernel of tiled_ffma.cuh with the NF4 weight decoded per element (scalar, bounds-checked, 64-bit
// flat indices) and rounded once to the compute dtype, then the LoRA + bias epilogue on the fp32
// accumulator. Also home of the split-K finishing kernel shared with the decode path.
#include "cuda/qlora_cuda.h"
#include "cuda/qlora_device.cuh"
#include "cuda/tiled_ffma.cuh"

namespace lora_ops::cuda {
namespace {

// The codebook for per-element gathers in global memory (L1-resident after the first touch; this path
// cannot give the generic tile kernel a shared-memory table).
__device__ const float kNf4CodebookGlobal[16] = {LORA_OPS_NF4_VALUES};

// a[m, i]: A operand (i = m, t = reduction index).
struct ActOperand {
  static constexpr bool kTFastest = true;
  const void* ptr;
  DType dtype;
  int64_t row_stride, col_stride;
  __device__ __forceinline__ float load(int64_t m, int64_t t) const {
    return load_as_float(ptr, dtype, m * row_stride + t * col_stride);
  }
};

// Wop[t, o] = T(W[o, t]) (forward) or T(W[t, o]) (transposed), W [N, K] row-major flattened.
template <bool kTranspose>
struct WeightOperand {
  static constexpr bool kTFastest = !kTranspose;  // forward: t runs along K, the packed direction
  Nf4Weight w;
  int64_t k;
  int log2_bs;
  DType dtype;
  __device__ __forceinline__ float load(int64_t t, int64_t o) const {
    const int64_t e = kTranspose ? t * k + o : o * k + t;
    const uint8_t byte = __ldg(w.packed + (e >> 1));
    const uint8_t code = (e & 1) ? nf4_low(byte) : nf4_high(byte);
    return round_to_dtype(nf4_decode(__ldg(kNf4CodebookGlobal + code), weight_block_absmax(w, weight_offset(w), e >> log2_bs)),
                          dtype);
  }
};

struct QloraSink {
  QloraMatmulParams p;
  uint32_t key;
  float* ws;  // non-null: fp32 partials [splits, M, n_out]
  int64_t n_out;
  __device__ __forceinline__ void store(int64_t m, int64_t o, int z, float acc) const {
    if (ws != nullptr) {
      ws[(static_cast<int64_t>(z) * p.m + m) * n_out + o] = acc;
    } else {
      store_as(p.out, p.a_dtype, m * p.out_row_stride + o, qlora_epilogue(p, key, m, o, acc));
    }
  }
};

__global__ void __launch_bounds__(256) qlora_splitk_finish_kernel(const QloraMatmulParams p, int splits, const float* ws) {
  const int64_t n_out = p.transpose_w ? p.k : p.n;
  const int64_t total = p.m * n_out;
  const uint32_t key = dropout_key(p.dropout.seed);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.0f;
    for (int z = 0; z < splits; ++z) acc += __ldg(ws + static_cast<int64_t>(z) * total + e);
    const int64_t m = e / n_out, o = e % n_out;
    store_as(p.out, p.a_dtype, m * p.out_row_stride + o, qlora_epilogue(p, key, m, o, acc));
  }
}

template <bool kTranspose>
cudaError_t launch_ffma(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream) {
  const int64_t n_in = kTranspose ? p.n : p.k, n_out = kTranspose ? p.k : p.n;
  const int64_t per = tiled_ffma_t_per_split(n_in, splits);
  const int64_t eff = tiled_ffma_effective_splits(n_in, splits);
  if ((p.m + kFfmaTile - 1) / kFfmaTile > 65535 || eff > 65535) return cudaErrorInvalidValue;
  if (eff > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  ActOperand a{p.a, p.a_dtype, p.a_row_stride, p.a_col_stride};
  // The nested offset lives in device memory: the operand reads it in-kernel (no host sync).
  WeightOperand<kTranspose> b{p.weight, p.k, log2_blocksize(p.weight.blocksize), p.a_dtype};
  QloraSink sink{p, dropout_key(p.dropout.seed), eff > 1 ? workspace : nullptr, n_out};
  auto kernel = tiled_ffma_kernel<ActOperand, WeightOperand<kTranspose>, QloraSink>;
  kernel<<<tiled_ffma_grid(p.m, n_out, static_cast<int>(eff)), kFfmaThreads, 0, stream>>>(a, b, sink, p.m, n_out, n_in, per);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || eff == 1) return err;
  return qlora_splitk_finish(p, static_cast<int>(eff), workspace, stream);
}

}  // namespace

int qlora_ffma_splits(const QloraMatmulParams& p, int sms) {
  const int64_t n_in = p.transpose_w ? p.n : p.k, n_out = p.transpose_w ? p.k : p.n;
  const int64_t tiles = ((p.m + kFfmaTile - 1) / kFfmaTile) * ((n_out + kFfmaTile - 1) / kFfmaTile);
  const int64_t target = 2 * static_cast<int64_t>(sms > 0 ? sms : 1);
  if (tiles >= target) return 1;
  int64_t s = (target + tiles - 1) / tiles;
  const int64_t max_by_len = n_in / 256 > 1 ? n_in / 256 : 1;
  if (s > max_by_len) s = max_by_len;
  if (s > 32) s = 32;
  return static_cast<int>(tiled_ffma_effective_splits(n_in, static_cast<int>(s)));
}

cudaError_t qlora_ffma(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream) {
  if (p.m < 0 || p.n <= 0 || p.k <= 0 || splits < 1 || p.a_dtype == DType::kFloat64 || p.rank < 0 ||
      p.rank > kMaxLoraRank)
    return cudaErrorInvalidValue;
  if (p.m == 0) return cudaSuccess;
  return p.transpose_w ? launch_ffma<true>(p, splits, workspace, stream) : launch_ffma<false>(p, splits, workspace, stream);
}

size_t qlora_splitk_workspace_bytes(const QloraMatmulParams& p, int splits) {
  const int64_t n_out = p.transpose_w ? p.k : p.n;
  return splits > 1 ? static_cast<size_t>(splits) * p.m * n_out * sizeof(float) : 0;
}

cudaError_t qlora_splitk_finish(const QloraMatmulParams& p, int splits, const float* workspace, cudaStream_t stream) {
  if (splits < 1 || workspace == nullptr) return cudaErrorInvalidValue;
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  const int64_t n_out = p.transpose_w ? p.k : p.n;
  const int64_t blocks = (p.m * n_out + 255) / 256;
  const int64_t cap = 8 * static_cast<int64_t>(sms);
  const int grid = static_cast<int>(blocks < cap ? blocks : cap);
  qlora_splitk_finish_kernel<<<grid > 0 ? grid : 1, 256, 0, stream>>>(p, splits, workspace);
  return cudaGetLastError();
}

}  // namespace lora_ops::cuda
