// The LoRA side path on the GPU: s = drop(a)·fᵀ (lora_down), g = scale·leftᵀ·drop(right) (lora_outer)
// and the dropout keep-mask. These are skinny products (one dimension is the rank r <= 256), memory-
// bound at training sizes, so they use the plain tiled FFMA kernel of tiled_ffma.cuh with fp32
// accumulation. When the output has too few tiles to fill the GPU, the reduction is split across
// CTAs; fp32 partials go to a workspace and a second launch sums them in split order, so results are
// deterministic (no atomics). Outputs of at most kFp64Outputs elements (s or u of one or two rows, dA of
// a K = 1 layer: each element scales a whole gradient row, or is its own relative error) are summed in
// fp64 instead, one CTA each, as the CPU ops do (lora_factors_cpu.cpp). The dropout mask is recomputed
// per element from the counter-based hash.
#include "common/dropout_rng.h"
#include "cuda/qlora_cuda.h"
#include "cuda/qlora_device.cuh"
#include "cuda/tiled_ffma.cuh"

namespace lora_ops::cuda {
namespace {

// A strided operand read as element (outer, t): ptr[outer * s_outer + t * s_red], with the dropout
// mask of x applied when enabled. The mask coordinates are (row, col) = (outer, t) when
// kDropRowIsOuter, else (t, outer).
template <bool kTFastestArg, bool kDropRowIsOuter>
struct StridedOperand {
  static constexpr bool kTFastest = kTFastestArg;
  const void* ptr;
  DType dtype;
  int64_t s_outer;
  int64_t s_red;
  DropoutParams drop;
  uint32_t key;

  __device__ __forceinline__ float value(int64_t outer, int64_t t) const {
    float v = load_as_float(ptr, dtype, outer * s_outer + t * s_red);
    if (drop.enabled()) {
      const int64_t row = kDropRowIsOuter ? outer : t, col = kDropRowIsOuter ? t : outer;
      const uint64_t ctr = drop.offset + static_cast<uint64_t>(row) * static_cast<uint64_t>(drop.cols) + static_cast<uint64_t>(col);
      const uint32_t h = dropout_hash(key, dropout_hi_key(key, static_cast<uint32_t>(ctr >> 32)), static_cast<uint32_t>(ctr));
      v = dropout_apply(dropout_keep_hash(h, drop.threshold), v, drop.keep_scale);
    }
    return v;
  }
};

// As the A operand (i, t) and as the B operand (t, j) of tiled_ffma_kernel.
template <bool kTF, bool kDR>
struct AOperand : StridedOperand<kTF, kDR> {
  __device__ __forceinline__ float load(int64_t i, int64_t t) const { return this->value(i, t); }
};
template <bool kTF, bool kDR>
struct BOperand : StridedOperand<kTF, kDR> {
  __device__ __forceinline__ float load(int64_t t, int64_t j) const { return this->value(j, t); }
};

// Final store: out[i * row_stride + j] = round(scale * acc), or an fp32 partial at ws[z][i][j].
struct ScaledSink {
  void* out;
  DType dtype;
  int64_t row_stride;
  float scale;
  float* ws;      // non-null: write partials
  int64_t I, J;
  __device__ __forceinline__ void store(int64_t i, int64_t j, int z, float acc) const {
    if (ws != nullptr) {
      ws[(static_cast<int64_t>(z) * I + i) * J + j] = acc;
    } else {
      store_as(out, dtype, i * row_stride + j, scale * acc);
    }
  }
};

// out[i, j] = round(scale * Σ_z ws[z][i][j]), z in order.
__global__ void __launch_bounds__(256) splitk_sum_kernel(const ScaledSink sink, int splits) {
  const int64_t total = sink.I * sink.J;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.0f;
    for (int z = 0; z < splits; ++z) acc += sink.ws[static_cast<int64_t>(z) * total + e];
    store_as(sink.out, sink.dtype, (e / sink.J) * sink.row_stride + e % sink.J, sink.scale * acc);
  }
}

constexpr int64_t kFp64Outputs = 16;

// One CTA per output element (i, j) = blockIdx.x: fp64 partial sums over the reduction (products of fp32
// values are exact in fp64), a fixed tree across the CTA, one rounding to fp32 at the store.
template <class A, class B>
__global__ void __launch_bounds__(256) few_outputs_fp64_kernel(const A a, const B b, const ScaledSink sink, int64_t J,
                                                               int64_t T) {
  const int64_t i = blockIdx.x / J, j = blockIdx.x % J;
  double acc = 0.0;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x)
    acc += static_cast<double>(a.load(i, t)) * static_cast<double>(b.load(t, j));
  __shared__ double part[256];
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int half = 128; half > 0; half >>= 1) {
    if (static_cast<int>(threadIdx.x) < half) part[threadIdx.x] += part[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const float v = static_cast<float>(static_cast<double>(sink.scale) * part[0]);
    store_as(sink.out, sink.dtype, i * sink.row_stride + j, v);
  }
}

cudaError_t device_sms(int* sms) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, dev);
  return err;
}

// Splits of a reduction of length T so that tiles x splits >= ~2 waves, each split >= 256 long.
int choose_splits(int64_t tiles, int64_t T, int sms) {
  const int64_t target = 2 * static_cast<int64_t>(sms > 0 ? sms : 1);
  if (tiles >= target) return 1;
  int64_t s = (target + tiles - 1) / tiles;
  const int64_t max_by_len = T / 256 > 1 ? T / 256 : 1;
  if (s > max_by_len) s = max_by_len;
  if (s > 64) s = 64;
  return static_cast<int>(s < 1 ? 1 : s);
}

int64_t effective_splits(int64_t T, int splits) { return tiled_ffma_effective_splits(T, splits); }

template <class A, class B>
cudaError_t run_tiled(const A& a, const B& b, ScaledSink sink, int64_t I, int64_t J, int64_t T, int splits,
                      float* workspace, cudaStream_t stream) {
  if (splits < 1) return cudaErrorInvalidValue;
  if (I * J <= kFp64Outputs) {
    sink.ws = nullptr;
    few_outputs_fp64_kernel<A, B><<<static_cast<unsigned>(I * J), 256, 0, stream>>>(a, b, sink, J, T);
    return cudaGetLastError();
  }
  const int64_t per = tiled_ffma_t_per_split(T, splits);
  const int64_t eff = effective_splits(T, splits);
  if ((I + kFfmaTile - 1) / kFfmaTile > 65535 || eff > 65535) return cudaErrorInvalidValue;
  sink.I = I;
  sink.J = J;
  sink.ws = eff > 1 ? workspace : nullptr;
  if (eff > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  tiled_ffma_kernel<A, B, ScaledSink><<<tiled_ffma_grid(I, J, static_cast<int>(eff)), kFfmaThreads, 0, stream>>>(
      a, b, sink, I, J, T, per);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || eff == 1) return err;
  int sms = 0;
  err = device_sms(&sms);
  if (err != cudaSuccess) return err;
  const int64_t blocks = (I * J + 255) / 256;
  const int grid = static_cast<int>(blocks < 8 * static_cast<int64_t>(sms) ? blocks : 8 * static_cast<int64_t>(sms));
  splitk_sum_kernel<<<grid > 0 ? grid : 1, 256, 0, stream>>>(sink, static_cast<int>(eff));
  return cudaGetLastError();
}

__global__ void __launch_bounds__(256) dropout_mask_kernel(const DropoutMaskParams p) {
  const DropoutParams& d = p.dropout;
  const uint32_t key = dropout_key(d.seed);
  const int64_t total = p.rows * d.cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // Row-major: element e of the [rows, cols] view has counter offset + e.
    const uint64_t ctr = d.offset + static_cast<uint64_t>(e);
    const uint32_t h = dropout_hash(key, dropout_hi_key(key, static_cast<uint32_t>(ctr >> 32)), static_cast<uint32_t>(ctr));
    p.out[e] = (!d.enabled() || dropout_keep_hash(h, d.threshold)) ? 1 : 0;
  }
}

}  // namespace

// ---- lora_down: I = M, J = r, T = l; A(i, t) = drop(a)[m, l], B(t, j) = f[q, l] -----------------------
int lora_down_splits(const LoraDownParams& p, int sms) {
  const int64_t tiles = ((p.m + kFfmaTile - 1) / kFfmaTile) * ((p.rank + kFfmaTile - 1) / kFfmaTile);
  return choose_splits(tiles, p.l, sms);
}

size_t lora_down_workspace_bytes(const LoraDownParams& p, int splits) {
  return effective_splits(p.l, splits) > 1 ? static_cast<size_t>(effective_splits(p.l, splits)) * p.m * p.rank * 4 : 0;
}

cudaError_t lora_down(const LoraDownParams& p, int splits, float* workspace, cudaStream_t stream) {
  if (p.m < 0 || p.l < 0 || p.rank < 1 || p.rank > kMaxLoraRank || p.a_dtype == DType::kFloat64) return cudaErrorInvalidValue;
  if (p.m == 0) return cudaSuccess;
  AOperand<true, true> a{};
  a.ptr = p.a;
  a.dtype = p.a_dtype;
  a.s_outer = p.a_row_stride;
  a.s_red = p.a_col_stride;
  a.drop = p.dropout;
  a.key = dropout_key(p.dropout.seed);
  BOperand<true, true> f{};
  f.ptr = p.f;
  f.dtype = p.f_dtype;
  f.s_outer = p.f_stride_q;
  f.s_red = p.f_stride_l;
  f.drop = DropoutParams{};
  f.key = 0;
  ScaledSink sink{p.out, DType::kFloat32, p.out_row_stride, 1.0f, nullptr, 0, 0};
  if (p.l == 0) splits = 1;  // an empty reduction: the kernel writes zeros
  return run_tiled(a, f, sink, p.m, p.rank, p.l, splits, workspace, stream);
}

// ---- lora_outer: I = p, J = q, T = m; A(i, t) = left[m, p], B(t, j) = drop(right)[m, q] ----------------
int lora_outer_splits(const LoraOuterParams& p, int sms) {
  const int64_t tiles = ((p.p + kFfmaTile - 1) / kFfmaTile) * ((p.q + kFfmaTile - 1) / kFfmaTile);
  return choose_splits(tiles, p.m, sms);
}

size_t lora_outer_workspace_bytes(const LoraOuterParams& p, int splits) {
  const int64_t eff = effective_splits(p.m, splits);
  return eff > 1 ? static_cast<size_t>(eff) * p.p * p.q * 4 : 0;
}

cudaError_t lora_outer(const LoraOuterParams& p, int splits, float* workspace, cudaStream_t stream) {
  if (p.m < 0 || p.p < 0 || p.q < 0 || p.left_dtype == DType::kFloat64 || p.right_dtype == DType::kFloat64 ||
      p.out_dtype == DType::kFloat64)
    return cudaErrorInvalidValue;
  if (p.p == 0 || p.q == 0) return cudaSuccess;
  // left[m, p]: outer index p, reduction m -> contiguous along the outer index when col stride is 1.
  AOperand<false, false> a{};
  a.ptr = p.left;
  a.dtype = p.left_dtype;
  a.s_outer = p.left_col_stride;
  a.s_red = p.left_row_stride;
  a.drop = DropoutParams{};
  a.key = 0;
  // right[m, q] with the mask of x at (m, q) = (t, outer): kDropRowIsOuter = false.
  BOperand<false, false> b{};
  b.ptr = p.right;
  b.dtype = p.right_dtype;
  b.s_outer = p.right_col_stride;
  b.s_red = p.right_row_stride;
  b.drop = p.dropout;
  b.key = dropout_key(p.dropout.seed);
  ScaledSink sink{p.out, p.out_dtype, p.q, static_cast<float>(p.scale), nullptr, 0, 0};
  if (p.m == 0) splits = 1;
  return run_tiled(a, b, sink, p.p, p.q, p.m, splits, workspace, stream);
}

cudaError_t lora_dropout_mask(const DropoutMaskParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.dropout.cols < 0) return cudaErrorInvalidValue;
  const int64_t total = p.rows * p.dropout.cols;
  if (total == 0) return cudaSuccess;
  if (p.out == nullptr) return cudaErrorInvalidValue;
  int sms = 0;
  cudaError_t err = device_sms(&sms);
  if (err != cudaSuccess) return err;
  const int64_t blocks = (total + 255) / 256;
  const int grid = static_cast<int>(blocks < 8 * static_cast<int64_t>(sms) ? blocks : 8 * static_cast<int64_t>(sms));
  dropout_mask_kernel<<<grid > 0 ? grid : 1, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace lora_ops::cuda
