// NF4 dequantize on the GPU, bit-identical to cpu::nf4_dequantize: w = T(c[code] * absmax), one
// float32 product rounded once. Plain or double-quantized absmax; the nested decode
// absmax = dyn[q] * absmax2 + offset is fused here (one launch for the whole weight).
//
// Memory-bound: per element it reads 0.5 byte and writes 2 (bf16/fp16) or 4 (fp32) bytes. Layout of
// one warp "segment" = 1024 elements = 512 packed bytes:
//
//   load:   lane l reads packed bytes [16l, 16l+16) with ONE 16-byte load (a "chunk": 32 codes,
//           always inside one quantization block since blocksize >= 32), decodes that chunk's absmax
//           once, and parks both in shared memory (per-warp staging, no CTA barrier).
//   store:  round j, lane l decodes the kBytesPerLane bytes at [j*32*B + l*B, +B) and writes them with
//           ONE 16-byte store, so every store instruction of the warp covers 512 contiguous bytes.
//
//   B = kBytesPerLane = 4 for 16-bit outputs (8 outputs = 16 bytes), 2 for fp32 (4 outputs).
//
// Each warp keeps kUnroll segments in flight (2 x 16 bytes of loads per lane, issued back to back)
// and the grid is persistent, striding over segments with 64-bit indices. The NF4 codebook lives in
// shared memory (a conflict-free broadcast lookup), the 256-entry nested map too. Elements past the
// last full segment, and every element when a pointer is not 16-byte aligned, go through a
// one-element-per-thread path.
#include "common/nf4_format.h"
#include "cuda/dtype_switch.cuh"
#include "cuda/nf4_cuda.h"
#include "cuda/nf4_device.cuh"

namespace lora_ops::cuda {
namespace {

constexpr int kChunkBytes = 16;                    // one lane's 16-byte load
constexpr int kSegmentBytes = 32 * kChunkBytes;    // one warp's packed bytes per segment
constexpr int kSegmentElems = 2 * kSegmentBytes;   // 1024 elements
constexpr int kUnroll = 2;                         // segments in flight per warp
constexpr int kWarps = kNf4Threads / 32;

// Compile-time store geometry of one output type: packed bytes behind one 16-byte store, and how many
// store rounds empty a warp segment.
template <typename OutT>
struct DequantShape {
  static constexpr int kBytesPerLane = 8 / static_cast<int>(sizeof(OutT));  // packed bytes per 16-byte store
  static constexpr int kElemsPerLane = 2 * kBytesPerLane;
  static constexpr int kRounds = kSegmentBytes / (32 * kBytesPerLane);      // stores per lane per segment
  static_assert(kElemsPerLane * sizeof(OutT) == 16, "one round = one 16-byte store per lane");
};

// Everything the kernel reads, by value (one kernel argument): the weight as the caller gave it, plus
// what the launcher derives from it once.
struct DequantArgs {
  Nf4Weight w;
  int log2_blocksize;       // blocksize is a power of two: block = element >> log2_blocksize
  void* out;
  bool vector_ok;           // packed and out 16-byte aligned
};

// absmax of quantization block b. Nested: dyn[q] * absmax2 + offset with both roundings of
// nf4_nested_absmax (never one FMA), the map read from shared memory.
template <bool kNested>
__device__ __forceinline__ float block_absmax(const DequantArgs& a, const float* nested_map, float offset, int64_t b) {
  if constexpr (kNested) {
    return nf4_nested_absmax(nested_map[__ldg(a.w.qabsmax + b)], __ldg(a.w.absmax2 + b / kNestedBlocksize), offset);
  } else {
    return __ldg(a.w.absmax + b);
  }
}

// Decodes kBytesPerLane packed bytes (little-endian in `bytes`, first byte lowest) with one absmax
// and writes the 2*kBytesPerLane outputs with one 16-byte store. High nibble = earlier element.
__device__ __forceinline__ void decode_store(uint32_t bytes, float amax, const float* codebook, float* out) {
  float4 v;
  v.x = nf4_decode(codebook[(bytes >> 4) & 15], amax);
  v.y = nf4_decode(codebook[bytes & 15], amax);
  v.z = nf4_decode(codebook[(bytes >> 12) & 15], amax);
  v.w = nf4_decode(codebook[(bytes >> 8) & 15], amax);
  *reinterpret_cast<float4*>(out) = v;
}
template <typename Half16>
__device__ __forceinline__ void decode_store(uint32_t bytes, float amax, const float* codebook, Half16* out) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t byte = bytes >> (8 * i);
    w[i] = pack2(nf4_decode(codebook[(byte >> 4) & 15], amax), nf4_decode(codebook[byte & 15], amax), Half16{});
  }
  *reinterpret_cast<uint4*>(out) = make_uint4(w[0], w[1], w[2], w[3]);
}

template <typename OutT, bool kNested>
__global__ void __launch_bounds__(kNf4Threads) nf4_dequantize_kernel(const DequantArgs a) {
  using S = DequantShape<OutT>;
  __shared__ float codebook[16];
  __shared__ float nested_map[kNested ? 256 : 1];
  // A warp's packed bytes as 32-bit words: lane l's 16-byte load lands in words [4l, 4l+4).
  __shared__ __align__(16) uint32_t stage_words[kWarps][kUnroll][32 * 4];
  __shared__ float stage_amax[kWarps][kUnroll][32];
  if (threadIdx.x < 16) codebook[threadIdx.x] = kNf4CodebookDevice[threadIdx.x];
  if constexpr (kNested) {
    static_assert(kNf4Threads == 256, "one thread per nested map entry");
    nested_map[threadIdx.x] = a.w.nested_code[threadIdx.x];
  }
  const float offset = kNested ? __ldg(a.w.offset) : 0.0f;
  __syncthreads();

  OutT* out = static_cast<OutT*>(a.out);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t n_segments = a.vector_ok ? a.w.numel / kSegmentElems : 0;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarps * kUnroll;
  const uint4* packed16 = reinterpret_cast<const uint4*>(a.w.packed);

  for (int64_t seg0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kUnroll; seg0 < n_segments;
       seg0 += warp_stride) {  // seg0 is warp-uniform: every branch below is too
    uint4 q[kUnroll];
    float amax[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)  // all loads first: 2 x 16 bytes in flight per lane
      q[u] = seg0 + u < n_segments ? __ldg(packed16 + (seg0 + u) * 32 + lane) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t chunk = (seg0 + u) * 32 + lane;
      amax[u] = seg0 + u < n_segments ? block_absmax<kNested>(a, nested_map, offset, (chunk * 32) >> a.log2_blocksize)
                                      : 0.0f;
    }
    __syncwarp();  // the previous iteration's readers of this warp's staging are done
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      stage_words[warp][u][4 * lane + 0] = q[u].x;  // (one 16-byte shared store once compiled)
      stage_words[warp][u][4 * lane + 1] = q[u].y;
      stage_words[warp][u][4 * lane + 2] = q[u].z;
      stage_words[warp][u][4 * lane + 3] = q[u].w;
      stage_amax[warp][u][lane] = amax[u];
    }
    __syncwarp();
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (seg0 + u >= n_segments) break;
#pragma unroll
      for (int j = 0; j < S::kRounds; ++j) {
        const int pb = (j * 32 + lane) * S::kBytesPerLane;  // warp-local packed byte
        // Packed bytes [pb, pb + B) of the segment, little-endian: the first byte is the lowest.
        const uint32_t word = stage_words[warp][u][pb / 4];
        const uint32_t bytes = S::kBytesPerLane == 4 ? word : (word >> (8 * (pb % 4))) & 0xffffu;
        decode_store(bytes, stage_amax[warp][u][pb / kChunkBytes], codebook,
                     out + (seg0 + u) * kSegmentElems + 2 * pb);
      }
    }
  }

  // Elements no segment covered: the tail (< 1024 elements), or all of them when unaligned.
  const int64_t first = n_segments * kSegmentElems;
  for (int64_t e = first + static_cast<int64_t>(blockIdx.x) * kNf4Threads + threadIdx.x; e < a.w.numel;
       e += static_cast<int64_t>(gridDim.x) * kNf4Threads) {
    const uint8_t byte = __ldg(a.w.packed + e / 2);
    const uint8_t code = (e & 1) ? nf4_low(byte) : nf4_high(byte);
    store_one(out, e, nf4_decode(codebook[code], block_absmax<kNested>(a, nested_map, offset, e >> a.log2_blocksize)));
  }
}

template <typename OutT, bool kNested>
cudaError_t launch_dequantize(const DequantArgs& args, cudaStream_t stream) {
  auto kernel = nf4_dequantize_kernel<OutT, kNested>;
  const int64_t segments = args.vector_ok ? args.w.numel / kSegmentElems : 0;
  const int64_t tail = args.w.numel - segments * kSegmentElems;
  const int64_t ctas_for_segments = (segments + kWarps * kUnroll - 1) / (kWarps * kUnroll);
  const int64_t ctas_for_tail = (tail + kNf4Threads - 1) / kNf4Threads;
  int grid = 0;
  cudaError_t err = persistent_grid(kernel, ctas_for_segments > ctas_for_tail ? ctas_for_segments : ctas_for_tail, 0, &grid);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kNf4Threads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename OutT>
cudaError_t dispatch_nested(const DequantArgs& args, bool nested, cudaStream_t stream) {
  return nested ? launch_dequantize<OutT, true>(args, stream) : launch_dequantize<OutT, false>(args, stream);
}

}  // namespace

cudaError_t nf4_dequantize(const Nf4DequantizeParams& p, cudaStream_t stream) {
  const Nf4Weight& w = p.weight;
  if (w.numel < 0 || !nf4_valid_blocksize(w.blocksize)) return cudaErrorInvalidValue;
  if (w.numel == 0) return cudaSuccess;
  const bool nested = w.nested();
  if (!w.packed || !p.out || (nested ? !(w.absmax2 && w.nested_code && w.offset) : !w.absmax))
    return cudaErrorInvalidValue;
  DequantArgs args{};
  args.w = w;
  args.log2_blocksize = 0;
  while ((1 << args.log2_blocksize) < w.blocksize) ++args.log2_blocksize;
  args.out = p.out;
  args.vector_ok = is_aligned(w.packed, 16) && is_aligned(p.out, 16);
  return with_cuda_type(p.out_dtype,
                        [&](auto tag) { return dispatch_nested<typename decltype(tag)::type>(args, nested, stream); });
}

}  // namespace lora_ops::cuda
