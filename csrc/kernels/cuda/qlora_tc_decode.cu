// Tensor-core weight-streaming QLoRA forward for decode and small batch (M <= 64, fp16 / bf16, sm80+):
// y = x·Wᵀ + scale·s·Bᵀ + bias, every packed byte of W read once, straight from the bitsandbytes byte
// layout (no derived copy of the weight exists: the permutation below is applied to the reduction order,
// not to the stored bytes).
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
//   >= 64), so a super step needs two absmax values per lane, fetched one round ahead (nested: the 8-bit
//   code and absmax2, decoded when they have landed).
//
//   Steady state: the rounds in which every lane of every warp is inside the split run an unmasked copy of
//   the body; the last kStages rounds (refills past the end) and a partial last super step (K % 256 != 0)
//   run a masked copy.
//
// Needs: K % 64 == 0, blocksize 64 .. 2048, packed codes 16-byte aligned, x with unit column stride and
// 16-byte aligned rows (qlora_tc_decode_supported).
//
// SASS cost (scripts/sass_report.py, baseline in scripts/sass_baseline.json): per packed byte one shift and
// one mask (table offset), one LDS.64, two FMUL and one F2FP, i.e. 3 instructions per weight before the
// ring, x loads, absmax fetches and loop control are added.
//
// lora_ops: allow-spill "qlora_tc_decode_kernel<__half, 2, false>" sm_80 only: 8 bytes stored before the main loop and reloaded after it (two loop bounds), none inside
// lora_ops: allow-spill "qlora_tc_decode_kernel<__nv_bfloat16, 2, false>" as above
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
static_assert(kThreads == 256, "one thread per entry of the 256-entry pair table and dynamic map");

template <int NT>
constexpr int smem_bytes() {  // the ring, reused by the cross-warp reduction after the main loop
  const int red = kWarps * kRows * 8 * NT * 4;
  return red > kRingBytes ? red : kRingBytes;
}

// Word i (0..3) of a 16-byte vector; i is a compile-time constant after unrolling.
__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__shared__ __align__(16) float2 tc_pairs[256];  // entry v = (c[v >> 4], c[v & 15]): the codes of packed byte v

// Byte (bit offset `shift` = 0, 8, 16, 24) of a code word -> the 16-bit pair register of its two codes,
// each T(c·absmax). The table entry is addressed by the byte times 8 (sizeof(float2)) directly: one shift
// and one mask per byte, the table base folded into the shared load.
template <typename T>
__device__ __forceinline__ uint32_t decode_pair(uint32_t word, int shift, float amax) {
  const uint32_t off = (shift >= 3 ? word >> (shift - 3) : word << (3 - shift)) & 0x7F8u;
  const float2 c = *reinterpret_cast<const float2*>(reinterpret_cast<const unsigned char*>(tc_pairs) + off);
  return pack2(nf4_decode(c.x, amax), nf4_decode(c.y, amax), T{});
}

// One W row of a lane: its packed bytes and its quantization block at the lane's current super step.
// Both advance by a fixed amount per round (kRoundCols is a multiple of every supported blocksize).
struct LaneRow {
  const uint8_t* codes;  // 32 packed bytes of this super step
  uint32_t block;        // quantization block of those 64 columns (blocks < 2^32: numel < 2^38)
};

// What a super step needs to know its absmax: plain -> the value; nested -> the 8-bit code and absmax2
// (decoded one step later, when the loads have landed).
struct AmaxSource {
  uint32_t code = 0;
  float value = 0.0f;
};

template <bool kNested>
__device__ __forceinline__ AmaxSource fetch_amax(const Nf4Weight& w, uint32_t b) {
  AmaxSource s;
  if constexpr (kNested) {
    s.code = __ldg(w.qabsmax + b);
    s.value = __ldg(w.absmax2 + (b >> 8));  // kNestedBlocksize = 256 blocks per absmax2
  } else {
    s.value = __ldg(w.absmax + b);
  }
  return s;
}
static_assert(kNestedBlocksize == 256, "fetch_amax divides by 256 with a shift");

template <bool kNested>
__device__ __forceinline__ float finish_amax(const AmaxSource& s, const float* dyn_map, float offset) {
  if constexpr (kNested) return nf4_nested_absmax(dyn_map[s.code], s.value, offset);
  return s.value;
}

template <typename T, int NT, bool kNested>
__global__ void __launch_bounds__(kThreads)
    qlora_tc_decode_kernel(const QloraMatmulParams p, int64_t steps_per_split, float* ws, int log2_bs) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float dyn_map[256];
  tc_pairs[threadIdx.x] = make_float2(kNf4CodebookDevice[threadIdx.x >> 4], kNf4CodebookDevice[threadIdx.x & 15]);
  if (kNested) dyn_map[threadIdx.x] = __ldg(p.weight.nested_code + threadIdx.x);
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t N = p.n, K = p.k;
  const int M = static_cast<int>(p.m);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t total = (K + kStepCols - 1) / kStepCols;
  const int64_t sb = static_cast<int64_t>(blockIdx.y) * steps_per_split;
  const int64_t se = sb + steps_per_split < total ? sb + steps_per_split : total;
  const int64_t col_end = se * kStepCols < K ? se * kStepCols : K;  // this split's columns end here
  // Rounds of the 8 warps: in the first `full` ones every warp has 256 valid columns.
  const int64_t full_steps = se * kStepCols <= K ? se - sb : se - sb - 1;
  const int full = full_steps > 0 ? static_cast<int>(full_steps / kWarps) : 0;
  const int rounds = se > sb ? static_cast<int>((se - sb + kWarps - 1) / kWarps) : 0;
  const float offset = weight_offset(p.weight);
  const int64_t col0 = (sb + warp) * kStepCols + kLaneCols * t;  // this lane's first column
  // Rounds in which this lane's 64 columns are inside the split (K % 64 == 0: a chunk is all in or out).
  const int64_t in_rounds = col0 < col_end ? (col_end - col0 + kRoundCols - 1) / kRoundCols : 0;
  const int lane_rounds = static_cast<int>(in_rounds < rounds ? in_rounds : rounds);

  // Rows g and g + 8 (rows past N read row N - 1: their outputs are never stored).
  LaneRow rows[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t n = n0 + g + 8 * h < N ? n0 + g + 8 * h : N - 1;
    const int64_t flat = n * K + col0;
    rows[h].codes = p.weight.packed + flat / 2;
    rows[h].block = static_cast<uint32_t>(flat >> log2_bs);
  }
  const uint32_t block_step = static_cast<uint32_t>(kRoundCols >> log2_bs);
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

  // Codes of round i into stage i % kStages; `masked` checks the round against the split (an empty group
  // past the end keeps the group count uniform).
  const auto issue = [&](int i, uint32_t stage_off, bool masked) {
    if (!masked || i < rounds) {
      const int64_t d = static_cast<int64_t>(i) * kRoundCols;
      const bool in = !masked || i < lane_rounds;
      const SmemAddr dst = ring + stage_off;
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int q = 0; q < 2; ++q)
          cp_async16(dst + (2 * h + q) * kChunkStride, rows[h].codes + (in ? d / 2 : 0) + 16 * q, in);
    }
    cp_async_commit();
  };

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;

  // One round: absmax (fetched a round ago), x, the codes from the ring, 16 mma steps per n8 tile.
  AmaxSource src[2];
  const auto round = [&](int i, bool masked) {
    const int64_t d = static_cast<int64_t>(i) * kRoundCols;
    const bool in = !masked || i < lane_rounds;
    float amax[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) amax[h] = in ? finish_amax<kNested>(src[h], dyn_map, offset) : 0.0f;
    if (!masked || i + 1 < lane_rounds) {
#pragma unroll
      for (int h = 0; h < 2; ++h) src[h] = fetch_amax<kNested>(p.weight, rows[h].block + (i + 1) * block_step);
    }
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
          xv[j] = in ? __ldg(reinterpret_cast<const uint4*>(xrow[j] + d) + 4 * q + wi) : make_uint4(0, 0, 0, 0);
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
    issue(i + kStages, stage_off, masked);  // the stage just read: its registers are consumed
  };

#pragma unroll
  for (int i = 0; i < kStages; ++i) issue(i, static_cast<uint32_t>(i) * kStageBytes, true);
  if (lane_rounds > 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) src[h] = fetch_amax<kNested>(p.weight, rows[h].block);
  }
  // Steady state: every lane's round, its next absmax and the round it refills are all inside the split.
  const int steady = full > kStages ? full - kStages : 0;
  for (int i = 0; i < steady; ++i) round(i, false);
  for (int i = steady; i < rounds; ++i) round(i, true);
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the ring: reuse it for the reduction

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
    const int64_t n = n0 + row;
    if (n >= N) continue;
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += red[(w * kRows + row) * kCols + m];
    if (ws != nullptr)
      ws[(static_cast<int64_t>(blockIdx.y) * M + m) * N + n] = v;
    else
      store_as(p.out, p.a_dtype, m * p.out_row_stride + n, qlora_epilogue(p, key, m, n, v));
  }
}

int64_t super_steps(const QloraMatmulParams& p) { return (p.k + kStepCols - 1) / kStepCols; }

template <typename T, int NT, bool kNested>
cudaError_t launch(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream) {
  const int64_t total = super_steps(p);
  const int64_t sps = (total + splits - 1) / splits;
  const int64_t eff = (total + sps - 1) / sps;
  if (eff > 65535 || (eff > 1 && workspace == nullptr)) return cudaErrorInvalidValue;
  auto kernel = qlora_tc_decode_kernel<T, NT, kNested>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes<NT>());
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.n + kRows - 1) / kRows), static_cast<unsigned>(eff));
  kernel<<<grid, kThreads, smem_bytes<NT>(), stream>>>(
      p, sps, eff > 1 ? workspace : nullptr, log2_blocksize(p.weight.blocksize));
  err = cudaGetLastError();
  if (err != cudaSuccess || eff == 1) return err;
  return qlora_splitk_finish(p, static_cast<int>(eff), workspace, stream);
}

template <typename T, bool kNested>
cudaError_t dispatch_rows(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream) {
  // Four column-count instances (n8 mma tiles over M); columns past M are zero and never stored.
  if (p.m <= 8) return launch<T, 1, kNested>(p, splits, workspace, stream);
  if (p.m <= 16) return launch<T, 2, kNested>(p, splits, workspace, stream);
  if (p.m <= 32) return launch<T, 4, kNested>(p, splits, workspace, stream);
  return launch<T, 8, kNested>(p, splits, workspace, stream);
}

template <typename T>
cudaError_t dispatch(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream) {
  return p.weight.qabsmax != nullptr ? dispatch_rows<T, true>(p, splits, workspace, stream)
                                     : dispatch_rows<T, false>(p, splits, workspace, stream);
}

}  // namespace

bool qlora_tc_decode_supported(const QloraMatmulParams& p) {
  if (p.transpose_w || p.m < 1 || p.m > kTcDecodeMaxRows || p.n < 1 || p.k < kLaneCols || p.k % kLaneCols != 0)
    return false;
  if (p.a_dtype != DType::kFloat16 && p.a_dtype != DType::kBFloat16) return false;
  // a lane's 64 columns lie in one block, and a round (2048 columns) is a whole number of blocks
  const bool bs_ok = nf4_valid_blocksize(p.weight.blocksize) && p.weight.blocksize >= kLaneCols &&
                     p.weight.blocksize <= kRoundCols;
  return bs_ok && is_aligned(p.weight.packed, 16) && is_aligned(p.a, 16) &&
         p.a_col_stride == 1 && p.a_row_stride % 8 == 0 && p.rank >= 0 && p.rank <= kMaxLoraRank;
}

int qlora_tc_decode_splits(const QloraMatmulParams& p, int sms) {
  // One K split while the 16-row CTAs alone cover the SMs (then the layer call is two launches:
  // lora_down and this kernel); otherwise enough splits for two CTAs per SM, each split at least one
  // super step per warp.
  const int64_t ctas = (p.n + kRows - 1) / kRows;
  const int64_t s_min = sms > 0 ? sms : 1;
  if (ctas >= s_min) return 1;
  int64_t s = (2 * s_min + ctas - 1) / ctas;
  const int64_t max_by_len = super_steps(p) / kWarps > 1 ? super_steps(p) / kWarps : 1;
  if (s > max_by_len) s = max_by_len;
  const int64_t sps = (super_steps(p) + s - 1) / s;
  return static_cast<int>((super_steps(p) + sps - 1) / sps);
}

cudaError_t qlora_tc_decode(const QloraMatmulParams& p, int splits, float* workspace, cudaStream_t stream) {
  if (!qlora_tc_decode_supported(p) || splits < 1) return cudaErrorInvalidValue;
  return p.a_dtype == DType::kFloat16 ? dispatch<__half>(p, splits, workspace, stream)
                                      : dispatch<__nv_bfloat16>(p, splits, workspace, stream);
}

}  // namespace lora_ops::cuda
