// Tensor-core fused QLoRA matmul (fp16 / bf16, sm80+): out = a·op(W) + scale·lora_s·lora_wᵀ(∘mask) + bias
// with W dequantized on chip. mma.sync.m16n8k16 (fp32 accumulate) via inline PTX, ldmatrix from
// XOR-swizzled shared memory, cp.async ring for the activation tiles, packed codes prefetched into
// registers one ring slot ahead and decoded (W = T(c[code]·absmax), rounded once) into shared memory.
// transpose_w = true (dx = dy·W) reads the same packed W: the W tile is always stored in W's own
// orientation and the B fragments come from ldmatrix.trans instead of ldmatrix. No copy of W exists.
//
//   CTA tile: BM = 64 rows of a/out  x  BN = 64 outputs  x  BK = 64 reduction, 4 warps (2 x 2),
//   warp tile 32 x 32 = 2 (m16) x 4 (n8) mma tiles, 32 fp32 accumulators per lane.
//
//             reduction i (BK = 64) ->                W tile in smem (64 x 64 T, W orientation):
//        +------------------+                          forward   rows = outputs o (N), cols = i (K)
//   m    |  A tile 64 x 64  |  ring of kStages = 3      transpose rows = i (N),       cols = o (K)
//  (BM)  |  cp.async 16 B   |                          each row = 4 x 16 B of packed codes; thread t
//        +------------------+                          owns (row t/2, 32 columns at 32·(t%2)): one
//                                                      LDG.128 of codes + one absmax per tile.
//   out tile 64 x 64:  warp (wm, wn) = (warp / 2, warp % 2) covers rows 32·wm.., cols 32·wn..
//
//   Shared rows are 64 T = 128 B = 8 chunks of 16 B; chunk c of row r is stored at c ^ (r & 7), so
//   the 8 row addresses of every ldmatrix 8x8 matrix, every cp.async 16 B write of a quarter warp and
//   the decoded 16 B stores hit 8 distinct bank groups (no conflicts, no padding).
//
//   Epilogue: the accumulators go through shared memory (fp32 64 x 68, reusing the rings); the LoRA sum
//   Σ_q s[m,q]·lora_w[o,q] of the tile runs as extra mma k-steps (bf16 hi + lo parts of s and lora_w,
//   3 MMAs per k-step: ~2^-16 relative), staged per 32-wide rank chunk with coalesced loads, into a
//   second fp32 tile; then each thread finishes whole outputs with coalesced stores: base + scale·LoRA
//   (∘ dropout mask in the dx form) + bias, one rounding.
//
// Fast path (kFast): a has unit column stride, 16-byte aligned rows and n_in % 8 == 0, and K % 32 == 0
// with 16-byte aligned packed codes. Otherwise every global access is scalar and bounds-checked
// (odd K, unaligned views, any strides) with the same tiles. Tails in M, n_out and the reduction are
// zero-filled in shared memory and masked at the store.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/mma_ptx.cuh"
#include "cuda/qlora_cuda.h"
#include "cuda/qlora_device.cuh"

namespace lora_ops::cuda {
namespace {

constexpr int BM = 64, BN = 64, BK = 64;
constexpr int kStages = 3;
constexpr int kThreads = 128;
constexpr int kTileElems = 64 * 64;
constexpr int kSmemBytes = kStages * 2 * kTileElems * 2 + 16 * 4;  // A + W rings (16-bit) + codebook

// Byte offset of (row, 8-element chunk) in a swizzled 64 x 64 16-bit tile.
__device__ __forceinline__ int swz(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

__device__ __forceinline__ uint16_t load_bits(const __half* p, int64_t i) { return __half_as_ushort(p[i]); }
__device__ __forceinline__ uint16_t load_bits(const __nv_bfloat16* p, int64_t i) { return __bfloat16_as_ushort(p[i]); }

template <typename T, bool kTranspose, bool kFast>
struct MmaTile {
  const QloraMatmulParams& p;
  int64_t n_in, n_out;
  int64_t m0, o0;
  int log2_bs;
  float offset;
  const float* codebook;
  unsigned char* a_ring;  // kStages x 64 x 64 T, swizzled
  unsigned char* w_ring;

  // A tile (rows m0.., reduction cols i0..) into ring slot `slot`: 512 chunks of 8, 4 per thread.
  __device__ __forceinline__ void load_a(int64_t i0, int slot) const {
    const T* a = static_cast<const T*>(p.a);
    unsigned char* base = a_ring + slot * kTileElems * 2;
    if constexpr (kFast) {
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int id = threadIdx.x + u * kThreads;
        const int row = id >> 3, ch = id & 7;
        const int64_t m = m0 + row, i = i0 + ch * 8;
        const bool valid = m < p.m && i < n_in;  // n_in % 8 == 0: a chunk is all in or all out
        cp_async16(smem_u32(base + swz(row, ch)), valid ? static_cast<const void*>(a + m * p.a_row_stride + i) : p.a, valid);
      }
    } else {
#pragma unroll 1  // scalar: 8 bounds-checked loads per chunk, packed in pairs (unrolled, it spills)
      for (int u = 0; u < 4; ++u) {
        const int id = threadIdx.x + u * kThreads;
        const int row = id >> 3, ch = id & 7;
        const int64_t m = m0 + row, i = i0 + ch * 8;
        uint32_t w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t i_lo = i + 2 * e, i_hi = i + 2 * e + 1;
          const uint32_t lo = (m < p.m && i_lo < n_in) ? load_bits(a, m * p.a_row_stride + i_lo * p.a_col_stride) : 0u;
          const uint32_t hi = (m < p.m && i_hi < n_in) ? load_bits(a, m * p.a_row_stride + i_hi * p.a_col_stride) : 0u;
          w[e] = lo | (hi << 16);
        }
        *reinterpret_cast<uint4*>(base + swz(row, ch)) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  }

  // The W tile of reduction tile i0 in W's orientation: origin (wr0, wc0) in W [N, K].
  __device__ __forceinline__ int64_t w_row0(int64_t i0) const { return kTranspose ? i0 : o0; }
  __device__ __forceinline__ int64_t w_col0(int64_t i0) const { return kTranspose ? o0 : i0; }

  // Fast path, step 1: this thread's 16 bytes of codes and their absmax into registers.
  __device__ __forceinline__ void fetch_w(int64_t i0, uint4& codes, float& amax) const {
    const int row = threadIdx.x >> 1, half = threadIdx.x & 1;
    const int64_t wr = w_row0(i0) + row, wc = w_col0(i0) + half * 32;
    if (wr < p.n && wc < p.k) {  // K % 32 == 0: the 32 columns are all in or all out
      const int64_t flat = wr * p.k + wc;
      codes = __ldg(reinterpret_cast<const uint4*>(p.weight.packed + flat / 2));
      amax = weight_block_absmax(p.weight, offset, flat >> log2_bs);
    } else {
      codes = make_uint4(0x77777777u, 0x77777777u, 0x77777777u, 0x77777777u);  // code 7 = exact zero
      amax = 0.0f;
    }
  }

  // Fast path, step 2: decode the 32 codes, round once to T, four 16-byte swizzled stores.
  __device__ __forceinline__ void store_w(const uint4& codes, float amax, int slot) const {
    const int row = threadIdx.x >> 1, half = threadIdx.x & 1;
    unsigned char* base = w_ring + slot * kTileElems * 2;
    const uint32_t words[4] = {codes.x, codes.y, codes.z, codes.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // word j = 4 bytes = 8 elements = one 16-byte chunk
      uint32_t out[4];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t byte = (words[j] >> (8 * b)) & 0xFFu;
        out[b] = pack2(nf4_decode(codebook[byte >> 4], amax), nf4_decode(codebook[byte & 15u], amax), T{});
      }
      *reinterpret_cast<uint4*>(base + swz(row, half * 4 + j)) = make_uint4(out[0], out[1], out[2], out[3]);
    }
  }

  // Scalar path: each element decoded from its own flat index (odd K, unaligned codes), bounds-checked.
  __device__ __forceinline__ void load_w_scalar(int64_t i0, int slot) const {
    const int row = threadIdx.x >> 1, half = threadIdx.x & 1;
    unsigned char* base = w_ring + slot * kTileElems * 2;
    const int64_t wr = w_row0(i0) + row;
#pragma unroll 1  // one 16-byte chunk at a time: unrolled, 32 independent decode chains cost ~150 registers
    for (int j = 0; j < 4; ++j) {
      uint32_t out[4];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        float v[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t wc = w_col0(i0) + half * 32 + j * 8 + 2 * b + h;
          v[h] = (wr < p.n && wc < p.k) ? weight_at(p.weight, log2_bs, offset, codebook, wr * p.k + wc) : 0.0f;
        }
        out[b] = pack2(v[0], v[1], T{});
      }
      *reinterpret_cast<uint4*>(base + swz(row, half * 4 + j)) = make_uint4(out[0], out[1], out[2], out[3]);
    }
  }
};

template <typename T, bool kTranspose, bool kFast>
__global__ void __launch_bounds__(kThreads) qlora_mma_kernel(const QloraMatmulParams p, int log2_bs) {
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* a_ring = smem;
  unsigned char* w_ring = smem + kStages * kTileElems * 2;
  float* codebook = reinterpret_cast<float*>(smem + 2 * kStages * kTileElems * 2);
  load_codebook(codebook);
  __syncthreads();  // the W decode below reads the codebook

  const int64_t n_in = kTranspose ? p.n : p.k, n_out = kTranspose ? p.k : p.n;
  const MmaTile<T, kTranspose, kFast> tile{p,      n_in,          n_out, static_cast<int64_t>(blockIdx.y) * BM,
                                           static_cast<int64_t>(blockIdx.x) * BN, log2_bs, weight_offset(p.weight),
                                           codebook, a_ring, w_ring};
  const int64_t KT = (n_in + BK - 1) / BK;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp >> 1, wn = warp & 1;

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

  // Prologue: tiles 0 .. kStages-2 (one commit group per tile, empty groups keep the count uniform).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) {
      tile.load_a(s * BK, s);
      if constexpr (kFast) {
        uint4 codes;
        float amax;
        tile.fetch_w(s * BK, codes, amax);
        tile.store_w(codes, amax, s);
      } else {
        tile.load_w_scalar(s * BK, s);
      }
    }
    cp_async_commit();
  }

  for (int64_t kt = 0; kt < KT; ++kt) {
    cp_async_wait<kStages - 2>();  // this thread's copies of tile kt landed
    __syncthreads();               // everyone's A(kt) / W(kt) visible; slot of kt-1 is free
    const int64_t next = kt + kStages - 1;
    const int next_slot = static_cast<int>(next % kStages);
    uint4 codes = make_uint4(0, 0, 0, 0);
    float amax = 0.0f;
    if (next < KT) {
      tile.load_a(next * BK, next_slot);
      if constexpr (kFast) tile.fetch_w(next * BK, codes, amax);  // in flight during the MMAs below
    }
    cp_async_commit();

    const int slot = static_cast<int>(kt % kStages);
    const SmemAddr a_base = smem_u32(a_ring + slot * kTileElems * 2);
    const SmemAddr w_base = smem_u32(w_ring + slot * kTileElems * 2);
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      // A fragments (16 x 16, row-major): lanes 0-15 rows 0-15 at k-chunk 2kk, lanes 16-31 at 2kk+1;
      // registers = (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
      uint32_t af[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const int row = wm * 32 + mi * 16 + (lane & 15);
        ldmatrix_x4(af[mi], a_base + swz(row, kk * 2 + (lane >> 4)));
      }
      // B fragments (16 x 8, "col-major" = k contiguous per n): matrix j = lane / 8 covers
      // n-block (j / 2) and k-half (j % 2) of an n16 x k16 pair -> b0/b1 of n8 tile 2np, 2np+1.
      uint32_t bf[4][2];
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        const int j = lane >> 3, i = lane & 7;
        uint32_t r[4];
        if constexpr (kTranspose) {
          // W tile rows = reduction k, cols = outputs n: transpose on load.
          const int krow = kk * 16 + (j & 1) * 8 + i;
          const int nchunk = (wn * 32 + np * 16 + (j >> 1) * 8) >> 3;
          ldmatrix_x4_trans(r, w_base + swz(krow, nchunk));
        } else {
          // W tile rows = outputs n, cols = reduction k: already "col-major" B.
          const int nrow = wn * 32 + np * 16 + (j >> 1) * 8 + i;
          ldmatrix_x4(r, w_base + swz(nrow, kk * 2 + (j & 1)));
        }
        bf[2 * np][0] = r[0];
        bf[2 * np][1] = r[1];
        bf[2 * np + 1][0] = r[2];
        bf[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma16816(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1], T{});
    }

    // Decode the prefetched codes into the free slot (read again only after a later barrier).
    if (next < KT) {
      if constexpr (kFast) {
        tile.store_w(codes, amax, next_slot);
      } else {
        tile.load_w_scalar(next * BK, next_slot);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the rings: reuse them for the fp32 output tile

  // Epilogue, 1: accumulators -> shared fp32 tile cs[64][68]. C fragment of lane (g = lane / 4,
  // t = lane % 4): c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g + 8, cols 2t, 2t+1).
  constexpr int kCsStride = BN + 4;
  static_assert(BM * kCsStride * 4 <= kStages * 2 * kTileElems * 2, "output tile fits in the rings");
  float* cs = reinterpret_cast<float*>(smem);
  const int g = lane >> 2, t = lane & 3;
  const auto store_acc = [&](float* tile_out) {  // this warp's accumulators into a 64 x 68 fp32 tile
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int c = 0; c < 4; ++c)
          tile_out[(wm * 32 + mi * 16 + g + (c >> 1) * 8) * kCsStride + wn * 32 + ni * 8 + 2 * t + (c & 1)] = acc[mi][ni][c];
  };
  store_acc(cs);
  __syncthreads();

  // 2. The LoRA sum l[m, o] = Σ_q s[m, q]·lora_w[o, q] of the tile as extra tensor-core k-steps, with
  //    s (fp32) and lora_w split into bf16 hi + lo parts (s_hi·w_hi + s_hi·w_lo + s_lo·w_hi: ~2^-16
  //    relative, far below the output rounding) staged per 32-wide rank chunk in shared memory with
  //    coalesced loads, instead of r scalar loads per output with lora_w read at stride r across lanes.
  //    Its own fp32 tile cl (the dx form masks it elementwise by the dropout of x before adding).
  constexpr int kQc = 32;                                  // rank chunk
  constexpr int kStageRow = kQc + 8;                       // bf16 per staged row (+8: bank spread)
  constexpr int kStageBytes = 64 * kStageRow * 2;          // one of s_hi, s_lo, w_hi, w_lo
  constexpr int kClOffset = BM * kCsStride * 4;            // cl after cs; the staging shares its space
  static_assert(kClOffset + (4 * kStageBytes > BM * kCsStride * 4 ? 4 * kStageBytes : BM * kCsStride * 4) <=
                    kStages * 2 * kTileElems * 2,
                "LoRA staging and the cl tile fit in the rings");
  float* cl = reinterpret_cast<float*>(smem + kClOffset);
  if (p.rank > 0) {
    uint16_t* st = reinterpret_cast<uint16_t*>(smem + kClOffset);  // [4][64][kStageRow]: s_hi, s_lo, w_hi, w_lo
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.0f;
    const auto split = [](float v, uint16_t& hi, uint16_t& lo) {
      const __nv_bfloat16 h = __float2bfloat16_rn(v);
      hi = __bfloat16_as_ushort(h);
      lo = __bfloat16_as_ushort(__float2bfloat16_rn(v - __bfloat162float(h)));
    };
    const auto lds32 = [&](int which, int row, int q) {  // two staged bf16 (q, q + 1) of one row
      return *reinterpret_cast<const uint32_t*>(st + (which * 64 + row) * kStageRow + q);
    };
    for (int q0 = 0; q0 < p.rank; q0 += kQc) {
      __syncthreads();  // the previous chunk's fragments are read
      for (int e = threadIdx.x; e < 64 * kQc; e += kThreads) {  // consecutive threads: consecutive q
        const int row = e / kQc, q = e % kQc;
        const int64_t m = tile.m0 + row, o = tile.o0 + row;
        const bool qin = q0 + q < p.rank;
        const float sv = (qin && m < p.m) ? __ldg(static_cast<const float*>(p.lora_s) + m * p.lora_s_row_stride + q0 + q) : 0.0f;
        const float wv = (qin && o < n_out) ? load_as_float(p.lora_w, p.lora_w_dtype, o * p.lora_w_stride_o + (q0 + q) * p.lora_w_stride_q) : 0.0f;
        split(sv, st[(0 * 64 + row) * kStageRow + q], st[(1 * 64 + row) * kStageRow + q]);
        split(wv, st[(2 * 64 + row) * kStageRow + q], st[(3 * 64 + row) * kStageRow + q]);
      }
      __syncthreads();
#pragma unroll
      for (int kq = 0; kq < kQc; kq += 16) {
        // A (s rows m, cols q): a0 (g, 2t), a1 (g + 8, 2t), a2 (g, 2t + 8), a3 (g + 8, 2t + 8), pairs (q, q + 1).
        uint32_t ah[2][4], al[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const int r0 = wm * 32 + mi * 16 + g;
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int row = r0 + (c & 1) * 8, q = kq + 2 * t + (c >> 1) * 8;
            ah[mi][c] = lds32(0, row, q);
            al[mi][c] = lds32(1, row, q);
          }
        }
        // B (q rows, o columns; "col-major" = q contiguous per o): b0 (2t, g), b1 (2t + 8, g).
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const int col = wn * 32 + ni * 8 + g;
          const uint32_t bh0 = lds32(2, col, kq + 2 * t), bh1 = lds32(2, col, kq + 2 * t + 8);
          const uint32_t bl0 = lds32(3, col, kq + 2 * t), bl1 = lds32(3, col, kq + 2 * t + 8);
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            mma16816(acc[mi][ni], ah[mi], bh0, bh1, __nv_bfloat16{});
            mma16816(acc[mi][ni], ah[mi], bl0, bl1, __nv_bfloat16{});
            mma16816(acc[mi][ni], al[mi], bh0, bh1, __nv_bfloat16{});
          }
        }
      }
    }
    __syncthreads();  // staging read: cl takes its place
    store_acc(cl);
    __syncthreads();
  }

  // 3. One output per thread per step, consecutive threads on consecutive columns (coalesced stores):
  //    base + scale · LoRA sum (∘ dropout mask in dx), bias, one rounding.
  const uint32_t key = dropout_key(p.dropout.seed);
  T* out = static_cast<T*>(p.out);
#pragma unroll 1
  for (int idx = threadIdx.x; idx < BM * BN; idx += kThreads) {
    const int row = idx / BN, col = idx % BN;
    const int64_t m = tile.m0 + row, o = tile.o0 + col;
    if (m < p.m && o < n_out) {
      const float l = p.rank > 0 ? cl[row * kCsStride + col] : 0.0f;
      store_one(out, m * p.out_row_stride + o, qlora_epilogue_lora(p, key, m, o, cs[row * kCsStride + col], l));
    }
  }
}

template <typename T, bool kTranspose, bool kFast>
cudaError_t launch(const QloraMatmulParams& p, cudaStream_t stream) {
  auto kernel = qlora_mma_kernel<T, kTranspose, kFast>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t n_out = kTranspose ? p.k : p.n;
  const int64_t mt = (p.m + BM - 1) / BM;
  if (mt > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((n_out + BN - 1) / BN), static_cast<unsigned>(mt));
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(p, log2_blocksize(p.weight.blocksize));
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(const QloraMatmulParams& p, cudaStream_t stream) {
  const int64_t n_in = p.transpose_w ? p.n : p.k;
  const bool fast = p.a_col_stride == 1 && n_in % 8 == 0 && p.a_row_stride % 8 == 0 && is_aligned(p.a, 16) &&
                    p.k % 32 == 0 && is_aligned(p.weight.packed, 16);
  if (p.transpose_w) return fast ? launch<T, true, true>(p, stream) : launch<T, true, false>(p, stream);
  return fast ? launch<T, false, true>(p, stream) : launch<T, false, false>(p, stream);
}

}  // namespace

bool qlora_mma_supported(const QloraMatmulParams& p) {
  return (p.a_dtype == DType::kFloat16 || p.a_dtype == DType::kBFloat16) && p.m >= 1 && p.n >= 1 && p.k >= 1 &&
         (p.m + BM - 1) / BM <= 65535 && nf4_valid_blocksize(p.weight.blocksize) && p.rank >= 0 &&
         p.rank <= kMaxLoraRank;
}

cudaError_t qlora_mma(const QloraMatmulParams& p, cudaStream_t stream) {
  if (!qlora_mma_supported(p)) return cudaErrorInvalidValue;
  return p.a_dtype == DType::kFloat16 ? dispatch<__half>(p, stream) : dispatch<__nv_bfloat16>(p, stream);
}

}  // namespace lora_ops::cuda
