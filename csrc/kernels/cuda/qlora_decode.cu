// Decode-size fused QLoRA forward (M <= 16): y = x·Wᵀ + scale·s·Bᵀ + bias, streaming the packed
// weight once. At these sizes the product is bound by the weight bytes, so every packed byte is read
// exactly once, with 16-byte loads, and everything else (x, tables) comes from shared memory.
//
//   CTA = 8 warps = 32 rows of W; blockIdx.y = K split (split-K keeps every SM busy at small N).
//
//            K split [cb, ce) in 32-element chunks (16 packed bytes each)
//            <-------------- piece of PC chunks, staged in smem ------------>
//   warp 0   rows n0+0..3   lane l: chunk l of the piece, 4 rows -> 4 x LDG.128
//   warp 1   rows n0+4..7   ...
//   ...
//   warp 7   rows n0+28..31
//
//   x piece (rows m < min(M, MT)) in shared memory, "group-major": the 8-element group g of chunk c
//   of row m lives at ((m·4 + g)·PC + c)·8, so for fixed (m, g) the 32 lanes (32 chunks) read 32
//   consecutive 16-byte slots: conflict-free LDS.128 (bf16/fp16; fp32 groups are 32 bytes, 2-way).
//
//   Per lane and piece: load 4 x 16 B of codes (next piece's loads are issued before the staging
//   barrier), decode one absmax per (row, chunk) (nested decode fused), then per group of 8 codes
//   decode W = T(c[code]·absmax) (codebook in shared memory, rounded once to the compute dtype) and
//   FMA against the MT rows of x into fp32 accumulators acc[MT][4].
//   End: butterfly-shuffle sum over the 32 lanes; splits == 1 -> epilogue (LoRA s·Bᵀ, bias) and store;
//   else fp32 partials to the workspace and qlora_splitk_finish (qlora_ffma.cu) sums them in order.
#include "cuda/dtype_switch.cuh"
#include "cuda/qlora_cuda.h"
#include "cuda/qlora_device.cuh"

namespace lora_ops::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerCta = kWarps * kRowsPerWarp;
constexpr int kChunk = 32;  // elements per 16-byte load of codes
constexpr int kStageBytes = 32 * 1024;

template <typename T, int MT>
struct DecodeShape {
  // Chunks per staged piece: 32 (one per lane) unless the x piece would exceed kStageBytes.
  static constexpr int kPieceChunks =
      (kStageBytes / (MT * kChunk * static_cast<int>(sizeof(T)))) < 32 ? (kStageBytes / (MT * kChunk * static_cast<int>(sizeof(T)))) : 32;
  static constexpr int kXsElems = MT * 4 * kPieceChunks * 8;
};

// 8 consecutive x values of one group, widened to fp32 (one LDS.128, two for fp32).
__device__ __forceinline__ void load8(const float* s, float (&v)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(s);
  const float4 b = *reinterpret_cast<const float4*>(s + 4);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const __half* s, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(s);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // from the bits, no type punning through pointers
    v[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xFFFFu)));
    v[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* s, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(s);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    // bf16 -> fp32 is a 16-bit shift: exact.
    v[2 * i] = __uint_as_float(w[i] << 16);
    v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}

// Copies one 8-element group global -> shared (16-byte aligned on both sides, checked by the host).
template <typename T>
__device__ __forceinline__ void copy8(T* dst, const T* src) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "fp16/bf16/fp32");
  const uint4* s = reinterpret_cast<const uint4*>(src);
  uint4* d = reinterpret_cast<uint4*>(dst);
  d[0] = __ldg(s);
  if constexpr (sizeof(T) == 4) d[1] = __ldg(s + 1);
}

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads)
    qlora_decode_kernel(const QloraMatmulParams p, int64_t chunks_per_split, float* ws, int log2_bs) {
  using S = DecodeShape<T, MT>;
  constexpr int PC = S::kPieceChunks;
  __shared__ float codebook[16];
  __shared__ __align__(16) T xs[S::kXsElems];
  load_codebook(codebook);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t N = p.n, K = p.k, M = p.m;
  const int64_t n_base = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + warp * kRowsPerWarp;
  const int64_t nc = K / kChunk;
  const int64_t cb = static_cast<int64_t>(blockIdx.y) * chunks_per_split;
  const int64_t ce = cb + chunks_per_split < nc ? cb + chunks_per_split : nc;
  const float offset = weight_offset(p.weight);
  const int mrows = M < MT ? static_cast<int>(M) : MT;
  const T* a = static_cast<const T*>(p.a);

  float acc[MT][kRowsPerWarp];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) acc[m][r] = 0.0f;

  for (int64_t pc0 = cb; pc0 < ce; pc0 += PC) {
    const int pcn = ce - pc0 < PC ? static_cast<int>(ce - pc0) : PC;
    const bool active = lane < pcn;  // PC <= 32: at most one chunk per lane per piece
    // 1. This lane's codes for its 4 rows: issued before the staging barrier so they are in flight
    //    while x is staged. Rows past N load nothing and are never stored.
    uint4 wq[kRowsPerWarp];
    float amax[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t n = n_base + r;
      const int64_t flat = n * K + (pc0 + lane) * kChunk;  // 32-aligned: one block, 16-byte aligned bytes
      wq[r] = (active && n < N) ? __ldg(reinterpret_cast<const uint4*>(p.weight.packed + flat / 2)) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t n = n_base + r;
      const int64_t flat = n * K + (pc0 + lane) * kChunk;
      amax[r] = (active && n < N) ? weight_block_absmax(p.weight, offset, flat >> log2_bs) : 0.0f;
    }

    // 2. Stage x[m, piece] for the valid rows (the previous piece's readers are done after the barrier).
    __syncthreads();
    const int units_per_row = pcn * 4;
    for (int u = threadIdx.x; u < mrows * units_per_row; u += kThreads) {
      const int m = u / units_per_row, rem = u % units_per_row;
      const int c = rem >> 2, g = rem & 3;
      copy8(xs + ((m * 4 + g) * PC + c) * 8, a + m * p.a_row_stride + (pc0 + c) * kChunk + g * 8);
    }
    __syncthreads();

    // 3. Decode and accumulate.
    if (active) {
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        float wv[kRowsPerWarp][8];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const uint32_t word = g == 0 ? wq[r].x : g == 1 ? wq[r].y : g == 2 ? wq[r].z : wq[r].w;
#pragma unroll
          for (int j = 0; j < 4; ++j) {  // byte j holds elements 2j (high nibble) and 2j+1 (low)
            const uint32_t byte = (word >> (8 * j)) & 0xFFu;
            wv[r][2 * j] = round_to<T>(nf4_decode(codebook[byte >> 4], amax[r]));
            wv[r][2 * j + 1] = round_to<T>(nf4_decode(codebook[byte & 15u], amax[r]));
          }
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m >= mrows) break;
          float xv[8];
          load8(xs + ((m * 4 + g) * PC + lane) * 8, xv);
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[m][r] = fmaf(xv[e], wv[r][e], acc[m][r]);
        }
      }
    }
  }

  // 4. Sum over the warp's lanes (every lane ends with every sum), then lane v % 32 stores value v.
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], off);

  // Lane l finishes values v = l + 32h (v = m·4 + r); selects are unrolled, the epilogue is not.
  constexpr int kValues = MT * kRowsPerWarp;
  constexpr int kPerLane = (kValues + 31) / 32;
  float mine[kPerLane];
#pragma unroll
  for (int h = 0; h < kPerLane; ++h) mine[h] = 0.0f;
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
      for (int h = 0; h < kPerLane; ++h)
        if (m * kRowsPerWarp + r == lane + 32 * h) mine[h] = acc[m][r];
  const uint32_t key = dropout_key(p.dropout.seed);
#pragma unroll
  for (int h = 0; h < kPerLane; ++h) {
    const int v = lane + 32 * h;
    const int m = v / kRowsPerWarp;
    const int64_t n = n_base + v % kRowsPerWarp;
    if (v >= kValues || m >= mrows || n >= N) continue;
    if (ws != nullptr) {
      ws[(static_cast<int64_t>(blockIdx.y) * M + m) * N + n] = mine[h];
    } else {
      store_as(p.out, p.a_dtype, m * p.out_row_stride + n, qlora_epilogue(p, key, m, n, mine[h]));
    }
  }
}

// ---- transposed form, dx = dy·W (M <= kDecodeMaxRowsT) ---------------------------------------------
//   out[m, k] = Σ_n dy[m, n] · W[n, k]: the reduction runs over W's rows, the outputs along the packed
//   direction. CTA = 8 warps on the same 1024 output columns (lane l: chunk c0 + l, 32 columns, one
//   LDG.128 of codes per W row); warp w takes rows n ≡ w (mod 8) of the CTA's N split (blockIdx.y).
//   dy[m, n] is a warp-uniform broadcast load. Per lane acc[MT][32] fp32; at the end the 8 warps'
//   partial sums are added in a fixed order through shared memory (stored j-major so both the writes
//   and the reads are conflict-free), then epilogue (LoRA term ∘ dropout mask) or split-K partials.
constexpr int kTCols = 32 * kChunk;  // output columns per CTA

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads)
    qlora_decode_t_kernel(const QloraMatmulParams p, int64_t rows_per_split, float* ws, int log2_bs) {
  __shared__ float codebook[16];
  __shared__ float red[kWarps][kTCols];
  load_codebook(codebook);
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t N = p.n, K = p.k, M = p.m;
  const int64_t nc = K / kChunk;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  const bool active = chunk < nc;
  const int64_t nb = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t ne = nb + rows_per_split < N ? nb + rows_per_split : N;
  const float offset = weight_offset(p.weight);
  const int mrows = M < MT ? static_cast<int>(M) : MT;
  const T* dy = static_cast<const T*>(p.a);

  float acc[MT][kChunk];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < kChunk; ++j) acc[m][j] = 0.0f;

  for (int64_t n = nb + warp; n < ne; n += kWarps) {  // warp-uniform loop
    float dv[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) dv[m] = m < mrows ? to_float(dy[m * p.a_row_stride + n * p.a_col_stride]) : 0.0f;
    if (!active) continue;
    const int64_t flat = n * K + chunk * kChunk;
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(p.weight.packed + flat / 2));
    const float amax = weight_block_absmax(p.weight, offset, flat >> log2_bs);
    const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int g = 0; g < 4; ++g) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t byte = (words[g] >> (8 * b)) & 0xFFu;
        const float w0 = round_to<T>(nf4_decode(codebook[byte >> 4], amax));
        const float w1 = round_to<T>(nf4_decode(codebook[byte & 15u], amax));
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          acc[m][g * 8 + 2 * b] = fmaf(dv[m], w0, acc[m][g * 8 + 2 * b]);
          acc[m][g * 8 + 2 * b + 1] = fmaf(dv[m], w1, acc[m][g * 8 + 2 * b + 1]);
        }
      }
    }
  }

  const uint32_t key = dropout_key(p.dropout.seed);
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m >= mrows) break;  // CTA-uniform: the barriers below stay matched
#pragma unroll
    for (int j = 0; j < kChunk; ++j) red[warp][j * 32 + lane] = acc[m][j];  // j-major: conflict-free
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTCols; idx += kThreads) {
      float v = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) v += red[w][idx];
      const int64_t k = (static_cast<int64_t>(blockIdx.x) * 32 + idx % 32) * kChunk + idx / 32;
      if (k < K) {
        if (ws != nullptr) {
          ws[(static_cast<int64_t>(blockIdx.y) * M + m) * K + k] = v;
        } else {
          store_as(p.out, p.a_dtype, m * p.out_row_stride + k, qlora_epilogue(p, key, m, k, v));
        }
      }
    }
    __syncthreads();
  }
}

template <typename T, int MT>
cudaError_t launch_t(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream) {
  const int64_t rps = (p.n + splits - 1) / splits;
  const int64_t eff = (p.n + rps - 1) / rps;
  if (eff > 65535 || (eff > 1 && workspace == nullptr)) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((p.k / kChunk + 31) / 32), static_cast<unsigned>(eff));
  qlora_decode_t_kernel<T, MT><<<grid, kThreads, 0, stream>>>(p, rps, eff > 1 ? workspace : nullptr,
                                                              log2_blocksize(p.weight.blocksize));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || eff == 1) return err;
  return qlora_splitk_finish(p, static_cast<int>(eff), workspace, stream);
}

template <typename T>
cudaError_t dispatch_rows_t(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream) {
  if (p.m <= 1) return launch_t<T, 1>(p, splits, workspace, stream);
  return launch_t<T, 4>(p, splits, workspace, stream);
}

int64_t chunks_per_split(int64_t nc, int splits) {
  const int64_t per = (nc + splits - 1) / splits;
  return (per + 31) / 32 * 32;  // whole pieces
}

template <typename T, int MT>
cudaError_t launch(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream) {
  const int64_t nc = p.k / kChunk;
  const int64_t cps = chunks_per_split(nc, splits);
  const int64_t eff = (nc + cps - 1) / cps;
  if (eff > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((p.n + kRowsPerCta - 1) / kRowsPerCta), static_cast<unsigned>(eff));
  qlora_decode_kernel<T, MT><<<grid, kThreads, 0, stream>>>(p, cps, eff > 1 ? workspace : nullptr,
                                                            log2_blocksize(p.weight.blocksize));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || eff == 1) return err;
  return qlora_splitk_finish(p, static_cast<int>(eff), workspace, stream);
}

template <typename T>
cudaError_t dispatch_rows(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream) {
  // Three row-count instances (compile time); rows past M are skipped at run time, not computed.
  if (p.m <= 1) return launch<T, 1>(p, splits, workspace, stream);
  if (p.m <= 4) return launch<T, 4>(p, splits, workspace, stream);
  return launch<T, 16>(p, splits, workspace, stream);
}

}  // namespace

// Transposed form: W codes 16-byte aligned and K % 32 == 0; dy any strides (scalar broadcast loads).
static bool decode_t_supported(const QloraMatmulParams& p) {
  return p.m >= 1 && p.m <= kDecodeMaxRowsT && p.n >= 1 && p.k >= kChunk && p.k % kChunk == 0 &&
         p.a_dtype != DType::kFloat64 && nf4_valid_blocksize(p.weight.blocksize) && is_aligned(p.weight.packed, 16) &&
         p.rank >= 0 && p.rank <= kMaxLoraRank;
}

bool qlora_decode_supported(const QloraMatmulParams& p) {
  if (p.transpose_w) return decode_t_supported(p);
  if (p.m < 1 || p.m > kDecodeMaxRows || p.n < 1 || p.k < kChunk || p.k % kChunk != 0) return false;
  if (p.a_dtype == DType::kFloat64 || !nf4_valid_blocksize(p.weight.blocksize)) return false;
  const int64_t es = p.a_dtype == DType::kFloat32 ? 4 : 2;
  return is_aligned(p.weight.packed, 16) && is_aligned(p.a, 16) && p.a_col_stride == 1 &&
         (p.a_row_stride * es) % 16 == 0 && p.rank >= 0 && p.rank <= kMaxLoraRank;
}

int qlora_decode_splits(const QloraMatmulParams& p, int sms) {
  if (p.transpose_w) {  // split N so that CTAs >= 2 waves, each split >= 64 rows (8 per warp)
    const int64_t ctas = (p.k / kChunk + 31) / 32;
    const int64_t target = 2 * static_cast<int64_t>(sms > 0 ? sms : 1);
    int64_t s = (target + ctas - 1) / ctas;
    const int64_t max_by_len = p.n / 64 > 1 ? p.n / 64 : 1;
    if (s > max_by_len) s = max_by_len;
    if (s < 1) s = 1;
    const int64_t rps = (p.n + s - 1) / s;
    return static_cast<int>((p.n + rps - 1) / rps);
  }
  const int64_t ctas = (p.n + kRowsPerCta - 1) / kRowsPerCta;
  const int64_t nc = p.k / kChunk;
  const int64_t target = 2 * static_cast<int64_t>(sms > 0 ? sms : 1);  // two resident CTAs per SM
  int64_t s = (target + ctas - 1) / ctas;
  const int64_t max_by_len = (nc + 31) / 32;  // at least one full piece per split
  if (s > max_by_len) s = max_by_len;
  if (s < 1) s = 1;
  const int64_t cps = chunks_per_split(nc, static_cast<int>(s));
  return static_cast<int>((nc + cps - 1) / cps);
}

cudaError_t qlora_decode(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream) {
  if (!qlora_decode_supported(p) || splits < 1) return cudaErrorInvalidValue;
  return with_cuda_type(p.a_dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return p.transpose_w ? dispatch_rows_t<T>(p, splits, workspace, stream)
                         : dispatch_rows<T>(p, splits, workspace, stream);
  });
}

}  // namespace lora_ops::cuda
