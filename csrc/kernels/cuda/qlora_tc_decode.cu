// Tensor-core weight-streaming QLoRA matmul for decode and small batch (M <= 64, fp16 / bf16, sm80+), the
// forward y = x·Wᵀ + scale·s·Bᵀ + bias and (second half of the file) the transposed dx = dy·W + LoRA term.
// Every packed byte of W is read once, straight from the bitsandbytes byte layout (no derived copy of the
// weight exists: the permutations below apply to the reduction order and the output order, not to the
// stored bytes).
//
// W is the 16-row A operand of mma.sync m16n8k16 and x the 8-column B operand, so the tensor cores work
// at M = 1 (M is padded to 8·NT columns of the mma, never to 16 rows).
//
//   CTA = 8 warps on the same 16 W rows [n0, n0 + 16). The reduction runs in SUPER STEPS of 256 columns,
//   warp w taking super steps w, w + 8, ... of its K split (blockIdx.y; one split unless N is too small to
//   fill the SMs): a ROUND is one super step of each of the 8 warps. At the end the 8 warps' fp32 tiles
//   are summed in warp order through shared memory (deterministic), then the epilogue (LoRA term, bias,
//   one rounding) or, with K splits, fp32 partials for qlora_splitk_finish.
//
//   Reduction order: within a super step the mma's k index need not be W's column order, because x's B
//   fragment follows the same permutation. Lane (g, t) = (lane / 4, lane % 4) owns columns [64t, 64t+64)
//   of W rows g and g + 8 (32 contiguous packed bytes each: two cp.async of 16 B per row) and of x rows
//   8j + g (128 contiguous bytes: 8 LDG.128 per n8 tile j). mma step s = 0..15 takes, of each W row's
//   16-byte chunk s >> 3, byte 2(s&1) (-> A registers a0 / a1) and byte 2(s&1) + 1 (-> a2 / a3) of word
//   (s & 7) >> 1, and x words 2s, 2s + 1 as b0 / b1: one packed byte = two codes = one 16-bit pair register
//   (bitsandbytes keeps the even column in the high nibble, which becomes the low half), in both operands
//   the same 4 columns.
//
//   Codes stream through a per-warp cp.async ring of kStages rounds (each lane reads back only the bytes it
//   copied itself, so no barrier is needed around the ring). A byte decodes through a 256-entry shared
//   table of code PAIRS (c[v >> 4], c[v & 15]) as float: two FMULs by the block absmax and one paired
//   conversion give the A register, i.e. exactly T(c[code]·absmax) per element (the contract of
//   common/qlora_params.h). A lane's 64 columns lie in one quantization block (K % 64 == 0, blocksize
//   >= 64), so a super step needs two absmax values per lane: before the main loop (while the ring's first
//   copies are in flight) the CTA decodes the absmax of every block its 16 rows touch in the split (nested
//   included) into shared memory, and the main loop reads one float per row per round.
//
//   Steady state: the rounds in which every lane of every warp is inside the split run an unmasked copy of
//   the body (unrolled by two); the last kStages rounds (refills past the end) and a partial last super
//   step (K % 256 != 0) run a masked copy.
//
// Needs: K % 64 == 0, blocksize 64 .. 2048, packed codes 16-byte aligned, x with unit column stride and
// 16-byte aligned rows (qlora_tc_decode_supported).
//
// SASS cost (scripts/sass_report.py, baseline in scripts/sass_baseline.json): per packed byte one shift and
// one mask (table offset), one LDS.64, two FMUL and one F2FP, i.e. 3 instructions per weight before the
// ring, x loads, absmax fetches and loop control are added.

#include "cuda/mma_ptx.cuh"
#include "cuda/qlora_cuda.h"
#include "cuda/qlora_device.cuh"

namespace lora_ops::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;              // W rows per CTA: one mma A tile, shared by the 8 warps
constexpr int kLaneCols = 64;          // W columns per lane per super step (2 x 16 packed bytes per row)
constexpr int kStepCols = 4 * kLaneCols;  // W columns per super step: 4 lanes (t) x 64
constexpr int kStages = 4;             // cp.async ring depth, in super steps
constexpr int kRowBytes = kLaneCols / 2;  // packed bytes per lane per row per super step
constexpr int kStageBytes = 32 * 2 * kRowBytes;  // rows g and g + 8 of the 32 lanes
constexpr int kRingBytes = kWarps * kStages * kStageBytes;
constexpr int64_t kRoundCols = static_cast<int64_t>(kWarps) * kStepCols;  // columns per round of the 8 warps
static_assert(kThreads == 256, "one thread per entry of the 256-entry pair table");

// Word i (0..3) of a 16-byte vector; i is a compile-time constant after unrolling.
__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__shared__ __align__(16) float2 tc_pairs[256];
constexpr int64_t kStaticSmemBytes = 256 * sizeof(float2);  // tc_pairs: the dynamic part must fit beside it  // entry v = (c[v >> 4], c[v & 15]): the codes of packed byte v

// Byte (bit offset `shift` = 0, 8, 16, 24) of a code word -> the 16-bit pair register of its two codes,
// each T(c·absmax). The table entry is addressed by the byte times 8 (sizeof(float2)) directly: one shift
// and one mask per byte, the table base folded into the shared load.
template <typename T>
__device__ __forceinline__ uint32_t decode_pair(uint32_t word, int shift, float amax) {
  const uint32_t off = (shift >= 3 ? word >> (shift - 3) : word << (3 - shift)) & 0x7F8u;
  const float2 c = *reinterpret_cast<const float2*>(reinterpret_cast<const unsigned char*>(tc_pairs) + off);
  return pack2(nf4_decode(c.x, amax), nf4_decode(c.y, amax), T{});
}

// Output (m, o) of a CTA: the kWarps partial sums red[w·warp_stride] added in warp order (deterministic),
// then fp32 split partials to ws [splits, M, n_out] or the epilogue and one rounding.
__device__ __forceinline__ void finish_output(const QloraMatmulParams& p, uint32_t key, const float* red,
                                              int warp_stride, int64_t m, int64_t o, int64_t n_out, float* ws) {
  float v = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) v += red[w * warp_stride];
  if (ws != nullptr)
    ws[(static_cast<int64_t>(blockIdx.y) * p.m + m) * n_out + o] = v;
  else
    store_as(p.out, p.a_dtype, m * p.out_row_stride + o, qlora_epilogue(p, key, m, o, v));
}

// Shared-memory slots per W row for the absmax of the blocks a split touches: the split's columns plus one
// block of misalignment (K % blocksize need not be 0, so a row may start inside a block).
__host__ __device__ inline int64_t amax_slots(int64_t steps_per_split, int log2_bs) {
  return ((steps_per_split * kStepCols + (int64_t{1} << log2_bs) - 1) >> log2_bs) + 1;
}
constexpr int64_t kMaxAmaxBytes = 64 * 1024;  // beyond this the host splits K further

// Four column-count instances NT (n8 mma tiles over M); columns past M repeat row M - 1, never stored.
int column_tiles(int64_t m) { return m <= 8 ? 1 : m <= 16 ? 2 : m <= 32 ? 4 : 8; }

int64_t smem_bytes(int nt, int64_t steps_per_split, int log2_bs) {
  // the ring and the staged absmax; after the main loop the cross-warp reduction reuses the space
  const int64_t main = kRingBytes + kRows * amax_slots(steps_per_split, log2_bs) * 4;
  const int64_t red = static_cast<int64_t>(kWarps) * kRows * 8 * nt * 4;
  return main > red ? main : red;
}

template <typename T, int NT>
__global__ void __launch_bounds__(kThreads)
    qlora_tc_decode_kernel(const QloraMatmulParams p, int64_t steps_per_split, float* ws, int log2_bs) {
  extern __shared__ __align__(16) unsigned char smem[];
  tc_pairs[threadIdx.x] = make_float2(kNf4CodebookDevice[threadIdx.x >> 4], kNf4CodebookDevice[threadIdx.x & 15]);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t N = p.n, K = p.k;
  const int M = static_cast<int>(p.m);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t total = (K + kStepCols - 1) / kStepCols;
  const int64_t sb = static_cast<int64_t>(blockIdx.y) * steps_per_split;
  const int64_t se = sb + steps_per_split < total ? sb + steps_per_split : total;
  const int64_t col_begin = sb * kStepCols;                          // this split's columns begin here
  const int64_t col_end = se * kStepCols < K ? se * kStepCols : K;  // and end here
  // Rounds of the 8 warps: in the first `full` ones every warp has 256 valid columns.
  const int64_t full_steps = se * kStepCols <= K ? se - sb : se - sb - 1;
  const int full = full_steps > 0 ? static_cast<int>(full_steps / kWarps) : 0;
  const int rounds = se > sb ? static_cast<int>((se - sb + kWarps - 1) / kWarps) : 0;
  const int64_t col0 = (sb + warp) * kStepCols + kLaneCols * t;  // this lane's first column
  // Rounds in which this lane's 64 columns are inside the split (K % 64 == 0: a chunk is all in or out).
  const int64_t in_rounds = col0 < col_end ? (col_end - col0 + kRoundCols - 1) / kRoundCols : 0;
  const int lane_rounds = static_cast<int>(in_rounds < rounds ? in_rounds : rounds);

  // Rows g and g + 8 (rows past N read row N - 1: their outputs are never stored).
  const uint8_t* codes[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t n = n0 + g + 8 * h < N ? n0 + g + 8 * h : N - 1;
    codes[h] = p.weight.packed + (n * K + col0) / 2;
  }
  // x rows 8j + g (rows past M repeat row M - 1: their columns of the product are never stored).
  const T* xrow[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int m = 8 * j + g < M ? 8 * j + g : M - 1;
    xrow[j] = static_cast<const T*>(p.a) + m * p.a_row_stride + col0;
  }
  const SmemAddr ring = smem_u32(smem) + warp * (kStages * kStageBytes) + lane * 16;
  const unsigned char* ring_ptr = smem + warp * (kStages * kStageBytes) + lane * 16;
  // stage layout: [row half h][chunk q][lane] 16 B  (conflict-free: 32 lanes x 16 B per (h, q))
  constexpr int kChunkStride = 32 * 16;

  // Codes of round `i` into the stage at `stage_off`, from `at[h]` (this lane's bytes of row half h in that
  // round); `masked` checks the round against the split (an empty group past the end keeps the group
  // count uniform; a lane outside the split copies zeros from its first, valid, address).
  const auto issue = [&](int i, const uint8_t* const (&at)[2], uint32_t stage_off, bool masked) {
    if (!masked || i < rounds) {
      const bool in = !masked || i < lane_rounds;
      const SmemAddr dst = ring + stage_off;
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int q = 0; q < 2; ++q)
          cp_async16(dst + (2 * h + q) * kChunkStride, (in ? at[h] : codes[h]) + 16 * q, in);
    }
    cp_async_commit();
  };
  // The code stream starts before anything else waits on memory.
  const uint8_t* fill[2] = {codes[0], codes[1]};  // the round the next issue refills
#pragma unroll
  for (int i = 0; i < kStages; ++i) {
    issue(i, fill, static_cast<uint32_t>(i) * kStageBytes, true);
#pragma unroll
    for (int h = 0; h < 2; ++h) fill[h] += kRoundCols / 2;
  }

  // The absmax of every block the CTA's 16 rows touch in this split, decoded once (nested included):
  // row r's blocks from first(r) = (n·K + col_begin) >> log2_bs on, at amax_s[r·slots + j]. One shared
  // load per row per round in the main loop instead of a global (nested: three-load) decode.
  const int slots = static_cast<int>(amax_slots(steps_per_split, log2_bs));
  float* amax_s = reinterpret_cast<float*>(smem + kRingBytes);
  {
    const float offset = weight_offset(p.weight);
    for (int e = threadIdx.x; e < kRows * slots; e += kThreads) {
      const int r = e / slots, j = e % slots;
      const int64_t n = n0 + r < N ? n0 + r : N - 1;
      const int64_t b = ((n * K + col_begin) >> log2_bs) + j;
      amax_s[e] = col_end > col_begin && b <= ((n * K + col_end - 1) >> log2_bs)
                      ? weight_block_absmax(p.weight, offset, b)
                      : 0.0f;
    }
  }
  // This lane's slot of rows g, g + 8 at round 0; + i·(kRoundCols >> log2_bs) at round i.
  int amax_at[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t n = n0 + g + 8 * h < N ? n0 + g + 8 * h : N - 1;
    amax_at[h] = (g + 8 * h) * slots + static_cast<int>(((n * K + col0) >> log2_bs) - ((n * K + col_begin) >> log2_bs));
  }
  const int amax_step = static_cast<int>(kRoundCols >> log2_bs);
  __syncthreads();  // pair table and absmax staged

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;

  // One round: absmax, x, the codes from the ring, 16 mma steps per n8 tile, then the refill. The x
  // pointers, the refill pointers and the absmax slot advance by one round each time.
  const T* xat[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) xat[j] = xrow[j];
  const float* amax_p[2] = {amax_s + amax_at[0], amax_s + amax_at[1]};
  const auto round = [&](int i, bool masked) {
    const bool in = !masked || i < lane_rounds;
    float amax[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) amax[h] = in ? *amax_p[h] : 0.0f;
    cp_async_wait<kStages - 1>();  // round i's group is complete (this lane's own copies)
    const uint32_t stage_off = static_cast<uint32_t>(i % kStages) * kStageBytes;
    const unsigned char* slot = ring_ptr + stage_off;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const uint4 cg = *reinterpret_cast<const uint4*>(slot + q * kChunkStride);
      const uint4 ch = *reinterpret_cast<const uint4*>(slot + (2 + q) * kChunkStride);
#pragma unroll
      for (int wi = 0; wi < 4; ++wi) {
        uint4 xv[NT];  // x words 8q + 2wi .. +3 of each tile: the B registers of steps 2wi, 2wi + 1
#pragma unroll
        for (int j = 0; j < NT; ++j)
          xv[j] = in ? __ldg(reinterpret_cast<const uint4*>(xat[j]) + 4 * q + wi) : make_uint4(0, 0, 0, 0);
        const uint32_t wg = word_of(cg, wi), wh = word_of(ch, wi);
#pragma unroll
        for (int e = 0; e < 2; ++e) {  // step s = 8q + 2wi + e uses bytes 2e, 2e + 1 of the words
          uint32_t a[4];
          a[0] = decode_pair<T>(wg, 16 * e, amax[0]);
          a[1] = decode_pair<T>(wh, 16 * e, amax[1]);
          a[2] = decode_pair<T>(wg, 16 * e + 8, amax[0]);
          a[3] = decode_pair<T>(wh, 16 * e + 8, amax[1]);
#pragma unroll
          for (int j = 0; j < NT; ++j)
            mma16816(acc[j], a, word_of(xv[j], 2 * e), word_of(xv[j], 2 * e + 1), T{});
        }
      }
    }
    issue(i + kStages, fill, stage_off, masked);  // the stage just read: its registers are consumed
#pragma unroll
    for (int j = 0; j < NT; ++j) xat[j] += kRoundCols;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      fill[h] += kRoundCols / 2;
      amax_p[h] += amax_step;
    }
  };

  // Steady state: every lane's round and the round it refills are inside the split.
  const int steady = full > kStages ? full - kStages : 0;
#pragma unroll 2
  for (int i = 0; i < steady; ++i) round(i, false);
  for (int i = steady; i < rounds; ++i) round(i, true);
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the ring and the absmax: reuse them for the reduction

  // acc[j] = D[16 rows][8 columns] of n8 tile j: d0 (g, 2t), d1 (g, 2t + 1), d2 (g + 8, 2t), d3 (g + 8, 2t + 1).
  constexpr int kCols = 8 * NT;
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    float* r = red + (warp * kRows + g) * kCols + 8 * j + 2 * t;
    r[0] = acc[j][0];
    r[1] = acc[j][1];
    r[8 * kCols] = acc[j][2];
    r[8 * kCols + 1] = acc[j][3];
  }
  __syncthreads();

  const uint32_t key = dropout_key(p.dropout.seed);
  for (int idx = threadIdx.x; idx < kRows * M; idx += kThreads) {
    const int row = idx % kRows, m = idx / kRows;
    if (n0 + row < N) finish_output(p, key, red + row * kCols + m, kRows * kCols, m, n0 + row, N, ws);
  }
}

int64_t super_steps(const QloraMatmulParams& p) { return (p.k + kStepCols - 1) / kStepCols; }

template <typename T, int NT>
cudaError_t launch(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream) {
  const int64_t total = super_steps(p);
  const int64_t sps = (total + splits - 1) / splits;
  const int64_t eff = (total + sps - 1) / sps;
  const int log2_bs = log2_blocksize(p.weight.blocksize);
  if (eff > 65535 || (eff > 1 && workspace == nullptr) || kRows * amax_slots(sps, log2_bs) * 4 > kMaxAmaxBytes)
    return cudaErrorInvalidValue;
  auto kernel = qlora_tc_decode_kernel<T, NT>;
  const int smem = static_cast<int>(smem_bytes(NT, sps, log2_bs));
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.n + kRows - 1) / kRows), static_cast<unsigned>(eff));
  kernel<<<grid, kThreads, smem, stream>>>(p, sps, eff > 1 ? workspace : nullptr, log2_bs);
  err = cudaGetLastError();
  if (err != cudaSuccess || eff == 1) return err;
  return qlora_splitk_finish(p, static_cast<int>(eff), workspace, stream);
}

template <typename T>
cudaError_t dispatch(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream) {
  switch (column_tiles(p.m)) {
  case 1: return launch<T, 1>(p, splits, workspace, stream);
  case 2: return launch<T, 2>(p, splits, workspace, stream);
  case 4: return launch<T, 4>(p, splits, workspace, stream);
  default: return launch<T, 8>(p, splits, workspace, stream);
  }
}

// ---- transposed form, dx = dy·W (M <= 64) -------------------------------------------------------------
//   out[m, k] = Σ_n dy[m, n] · W[n, k]. W is again the A operand, now with ROWS = output columns k and
//   COLUMNS = the reduction over W's rows n. A packed byte holds two output columns (k, k + 1) of one row
//   n, so a lane decodes two bytes of rows n(2t) and n(2t + 1) (the B fragment's reduction pair, dy's
//   columns n, n + 1 contiguous) and packs their EVEN elements into mma row g (output k) and their ODD
//   elements into row g + 8 (output k + 1): the same 2 FMUL + 1 paired conversion per byte as forward.
//
//   CTA = 8 warps on the same 16·U output columns (U = 16 / NT pairs per lane, so every lane holds
//   U·NT·4 = 64 accumulators at every M: no register cliff); warp w takes the 16-row groups w, w + 8, ...
//   of the CTA's N split (blockIdx.y). Lane (g, t) loads U contiguous packed bytes (output pairs U·g ..
//   U·g + U - 1) of rows n0 + {2t, 2t + 1, 2t + 8, 2t + 9}; pair U·g + u feeds output tile u, whose
//   mma rows g / g + 8 are columns k0 + 2(U·g + u) and + 1. Codes are register double-buffered (one
//   row group ahead); the absmax is decoded per row and lane chunk (2U columns, inside one block).
//   At the end the 8 warps' tiles are summed in warp order through shared memory, then the epilogue
//   (LoRA term ∘ dropout mask) or fp32 partials for qlora_splitk_finish.
constexpr int kTRowStep = 16;  // W rows per mma step (the reduction of one mma)

template <int U>
struct CodeChunk;  // U packed bytes of one row, as loaded
template <>
struct CodeChunk<16> {
  uint4 v;
  __device__ __forceinline__ void load(const uint8_t* p) { v = __ldg(reinterpret_cast<const uint4*>(p)); }
  __device__ __forceinline__ uint32_t word(int i) const { return word_of(v, i); }
};
template <>
struct CodeChunk<8> {
  uint2 v;
  __device__ __forceinline__ void load(const uint8_t* p) { v = __ldg(reinterpret_cast<const uint2*>(p)); }
  __device__ __forceinline__ uint32_t word(int i) const { return i == 0 ? v.x : v.y; }
};
template <>
struct CodeChunk<4> {
  uint32_t v;
  __device__ __forceinline__ void load(const uint8_t* p) { v = __ldg(reinterpret_cast<const uint32_t*>(p)); }
  __device__ __forceinline__ uint32_t word(int) const { return v; }
};
template <>
struct CodeChunk<2> {
  uint32_t v;
  __device__ __forceinline__ void load(const uint8_t* p) { v = __ldg(reinterpret_cast<const uint16_t*>(p)); }
  __device__ __forceinline__ uint32_t word(int) const { return v; }
};

// Byte (bit offset `shift`) of rows a and b -> the A registers of output columns k (even elements) and
// k + 1 (odd elements), each T(c·absmax of its row).
template <typename T>
__device__ __forceinline__ void decode_vertical(uint32_t wa, uint32_t wb, int shift, float amax_a, float amax_b,
                                                uint32_t& even, uint32_t& odd) {
  const uint32_t oa = (shift >= 3 ? wa >> (shift - 3) : wa << (3 - shift)) & 0x7F8u;
  const uint32_t ob = (shift >= 3 ? wb >> (shift - 3) : wb << (3 - shift)) & 0x7F8u;
  const float2 ca = *reinterpret_cast<const float2*>(reinterpret_cast<const unsigned char*>(tc_pairs) + oa);
  const float2 cb = *reinterpret_cast<const float2*>(reinterpret_cast<const unsigned char*>(tc_pairs) + ob);
  even = pack2(nf4_decode(ca.x, amax_a), nf4_decode(cb.x, amax_b), T{});
  odd = pack2(nf4_decode(ca.y, amax_a), nf4_decode(cb.y, amax_b), T{});
}

// Two consecutive dy elements (columns n, n + 1 of row m) as one 16-bit pair register; zero past N.
template <typename T>
__device__ __forceinline__ uint32_t dy_pair(const T* row, int64_t n, int64_t N) {
  if (n + 1 < N) return __ldg(reinterpret_cast<const uint32_t*>(row + n));
  if (n < N) return static_cast<uint32_t>(__ldg(reinterpret_cast<const uint16_t*>(row + n)));
  return 0u;
}

template <typename T, int NT>
__global__ void __launch_bounds__(kThreads)
    qlora_tc_decode_t_kernel(const QloraMatmulParams p, int64_t groups_per_split, float* ws, int log2_bs) {
  constexpr int U = 16 / NT;        // output pairs per lane = mma output tiles per warp
  constexpr int kOut = 16 * U;      // output columns per CTA
  extern __shared__ __align__(16) unsigned char smem[];
  tc_pairs[threadIdx.x] = make_float2(kNf4CodebookDevice[threadIdx.x >> 4], kNf4CodebookDevice[threadIdx.x & 15]);
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t N = p.n, K = p.k;
  const int M = static_cast<int>(p.m);
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kOut;
  const int64_t col = k0 + 2 * U * g;  // this lane's first output column (2U columns: one block)
  const bool lane_in = col < K;         // K % 32 == 0: a lane's chunk is all in or out
  const int64_t groups = (N + kTRowStep - 1) / kTRowStep;
  const int64_t gb = static_cast<int64_t>(blockIdx.y) * groups_per_split;
  const int64_t ge = gb + groups_per_split < groups ? gb + groups_per_split : groups;
  const float offset = weight_offset(p.weight);
  const int row_of[4] = {2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9};  // reduction pairs (2t, 2t+1), (2t+8, 2t+9)
  const T* dy[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int m = 8 * j + g < M ? 8 * j + g : M - 1;  // rows past M repeat M - 1, never stored
    dy[j] = static_cast<const T*>(p.a) + m * p.a_row_stride;
  }

  float acc[U][NT][4];
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[u][j][e] = 0.0f;

  // Codes and absmax of one row group (rows past N read row N - 1 with absmax 0: W = 0 there, and dy is 0).
  const auto fetch = [&](int64_t grp, CodeChunk<U> (&c)[4], float (&amax)[4]) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t n = grp * kTRowStep + row_of[r];
      const int64_t nc = n < N ? n : N - 1;
      const int64_t flat = nc * K + (lane_in ? col : 0);
      c[r].load(p.weight.packed + flat / 2);
      amax[r] = (n < N && lane_in) ? weight_block_absmax(p.weight, offset, flat >> log2_bs) : 0.0f;
    }
  };

  CodeChunk<U> cur[4], nxt[4];
  float amax[4], amax_n[4];
  int64_t grp = gb + warp;
  if (grp < ge) fetch(grp, cur, amax);
  for (; grp < ge; grp += kWarps) {
    if (grp + kWarps < ge) fetch(grp + kWarps, nxt, amax_n);  // one row group ahead, in registers
    const int64_t nb = grp * kTRowStep;
    uint32_t b[NT][2];  // dy pairs (n(2t), n(2t+1)) and (n(2t+8), n(2t+9)) of rows 8j + g
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      b[j][0] = dy_pair(dy[j], nb + 2 * t, N);
      b[j][1] = dy_pair(dy[j], nb + 2 * t + 8, N);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int shift = 8 * (u & 3);
      uint32_t a[4];
      decode_vertical<T>(cur[0].word(u >> 2), cur[1].word(u >> 2), shift, amax[0], amax[1], a[0], a[1]);
      decode_vertical<T>(cur[2].word(u >> 2), cur[3].word(u >> 2), shift, amax[2], amax[3], a[2], a[3]);
#pragma unroll
      for (int j = 0; j < NT; ++j) mma16816(acc[u][j], a, b[j][0], b[j][1], T{});
    }
    if (grp + kWarps < ge) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        cur[r] = nxt[r];
        amax[r] = amax_n[r];
      }
    }
  }

  // acc[u][j]: mma row g -> column k0 + 2(U·g + u), row g + 8 -> that + 1; mma column 2t (+1) -> m = 8j + 2t (+1).
  constexpr int kCols = 8 * NT;
  float* red = reinterpret_cast<float*>(smem);  // [warp][kOut][kCols]
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      float* r = red + (warp * kOut + 2 * (U * g + u)) * kCols + 8 * j + 2 * t;
      r[0] = acc[u][j][0];
      r[1] = acc[u][j][1];
      r[kCols] = acc[u][j][2];
      r[kCols + 1] = acc[u][j][3];
    }
  __syncthreads();

  const uint32_t key = dropout_key(p.dropout.seed);
  for (int idx = threadIdx.x; idx < kOut * M; idx += kThreads) {
    const int kl = idx % kOut, m = idx / kOut;
    if (k0 + kl < K) finish_output(p, key, red + kl * kCols + m, kOut * kCols, m, k0 + kl, K, ws);
  }
}

int t_lane_pairs(int64_t m) { return m <= 8 ? 16 : m <= 16 ? 8 : m <= 32 ? 4 : 2; }  // U of the instance

template <typename T, int NT>
cudaError_t launch_t(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream) {
  constexpr int U = 16 / NT;
  const int64_t groups = (p.n + kTRowStep - 1) / kTRowStep;
  const int64_t gps = (groups + splits - 1) / splits;
  const int64_t eff = (groups + gps - 1) / gps;
  if (eff > 65535 || (eff > 1 && workspace == nullptr)) return cudaErrorInvalidValue;
  auto kernel = qlora_tc_decode_t_kernel<T, NT>;
  const int smem = kWarps * 16 * U * 8 * NT * 4;  // the cross-warp reduction: 64 KiB at every NT
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.k + 16 * U - 1) / (16 * U)), static_cast<unsigned>(eff));
  kernel<<<grid, kThreads, smem, stream>>>(p, gps, eff > 1 ? workspace : nullptr, log2_blocksize(p.weight.blocksize));
  err = cudaGetLastError();
  if (err != cudaSuccess || eff == 1) return err;
  return qlora_splitk_finish(p, static_cast<int>(eff), workspace, stream);
}

template <typename T>
cudaError_t dispatch_t(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream) {
  if (p.m <= 8) return launch_t<T, 1>(p, splits, workspace, stream);
  if (p.m <= 16) return launch_t<T, 2>(p, splits, workspace, stream);
  if (p.m <= 32) return launch_t<T, 4>(p, splits, workspace, stream);
  return launch_t<T, 8>(p, splits, workspace, stream);
}

}  // namespace

// Transposed form: K % 32 == 0 (a lane's 2U <= 32 columns in one block, U-byte aligned loads), dy with unit
// column stride and 4-byte aligned rows (pair loads).
static bool tc_decode_t_supported(const QloraMatmulParams& p) {
  if (p.m < 1 || p.m > kTcDecodeMaxRows || p.n < 1 || p.k < 32 || p.k % 32 != 0) return false;
  if (p.a_dtype != DType::kFloat16 && p.a_dtype != DType::kBFloat16) return false;
  return nf4_valid_blocksize(p.weight.blocksize) && is_aligned(p.weight.packed, 16) && is_aligned(p.a, 4) &&
         p.a_col_stride == 1 && p.a_row_stride % 2 == 0 && p.rank >= 0 && p.rank <= kMaxLoraRank;
}

bool qlora_tc_decode_supported(const QloraMatmulParams& p) {
  if (p.transpose_w) return tc_decode_t_supported(p);
  if (p.m < 1 || p.m > kTcDecodeMaxRows || p.n < 1 || p.k < kLaneCols || p.k % kLaneCols != 0)
    return false;
  if (p.a_dtype != DType::kFloat16 && p.a_dtype != DType::kBFloat16) return false;
  // a lane's 64 columns lie in one block, and a round (2048 columns) is a whole number of blocks
  const bool bs_ok = nf4_valid_blocksize(p.weight.blocksize) && p.weight.blocksize >= kLaneCols &&
                     p.weight.blocksize <= kRoundCols;
  return bs_ok && is_aligned(p.weight.packed, 16) && is_aligned(p.a, 16) &&
         p.a_col_stride == 1 && p.a_row_stride % 8 == 0 && p.rank >= 0 && p.rank <= kMaxLoraRank;
}

int qlora_tc_decode_splits(const QloraMatmulParams& p, int sms, int max_smem_per_block) {
  if (p.transpose_w) {  // split N until the column CTAs cover two per SM, each split >= 8 row groups
    const int64_t ctas = (p.k + 16 * t_lane_pairs(p.m) - 1) / (16 * t_lane_pairs(p.m));
    const int64_t groups = (p.n + kTRowStep - 1) / kTRowStep;
    const int64_t target = 2 * static_cast<int64_t>(sms > 0 ? sms : 1);
    int64_t s = (target + ctas - 1) / ctas;
    const int64_t max_by_len = groups / kWarps > 1 ? groups / kWarps : 1;
    if (s > max_by_len) s = max_by_len;
    if (s < 1) s = 1;
    const int64_t gps = (groups + s - 1) / s;
    return static_cast<int>((groups + gps - 1) / gps);
  }
  // One K split while the 16-row CTAs alone cover the SMs (then the layer call is two launches:
  // lora_down and this kernel); otherwise enough splits for two CTAs per SM, each split at least one
  // super step per warp.
  const int64_t ctas = (p.n + kRows - 1) / kRows;
  const int64_t s_min = sms > 0 ? sms : 1;
  const int64_t total = super_steps(p);
  int64_t s = 1;
  if (ctas < s_min) {
    s = (2 * s_min + ctas - 1) / ctas;
    const int64_t max_by_len = total / kWarps > 1 ? total / kWarps : 1;
    if (s > max_by_len) s = max_by_len;
  }
  // The staged absmax of a split must fit kMaxAmaxBytes, and the split's dynamic shared memory the device's
  // per-block limit beside the static table: 99 KB on sm_86 / sm_89, where one split of K = 53,248 at
  // blocksize 64 would ask for 116 KB (only very long rows need either).
  const int log2_bs = log2_blocksize(p.weight.blocksize);
  const int nt = column_tiles(p.m);
  const int64_t budget = static_cast<int64_t>(max_smem_per_block) - kStaticSmemBytes;
  const auto fits = [&](int64_t splits) {
    const int64_t sps = (total + splits - 1) / splits;
    return kRows * amax_slots(sps, log2_bs) * 4 <= kMaxAmaxBytes && smem_bytes(nt, sps, log2_bs) <= budget;
  };
  while (s < total && !fits(s)) ++s;
  const int64_t sps = (total + s - 1) / s;
  return static_cast<int>((total + sps - 1) / sps);
}

cudaError_t qlora_tc_decode(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream) {
  if (!qlora_tc_decode_supported(p) || splits < 1) return cudaErrorInvalidValue;
  if (p.transpose_w)
    return p.a_dtype == DType::kFloat16 ? dispatch_t<__half>(p, splits, workspace, stream)
                                        : dispatch_t<__nv_bfloat16>(p, splits, workspace, stream);
  return p.a_dtype == DType::kFloat16 ? dispatch<__half>(p, splits, workspace, stream)
                                      : dispatch<__nv_bfloat16>(p, splits, workspace, stream);
}

}  // namespace lora_ops::cuda
