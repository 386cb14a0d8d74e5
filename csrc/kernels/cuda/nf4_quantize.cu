// NF4 quantize on the GPU: blockwise absmax + 4-bit codes, bit-identical to cpu::nf4_quantize.
//
// Work layout (kBlocksize = B, CTA = 256 threads, one "tile" = 256 / kGroup quantization blocks):
//
//   quant block b:  | t0: kElems elems | t1: kElems | ... | t(kGroup-1) |      kGroup = min(B/8, 256)
//                     one or more 16-byte loads per thread, contiguous across the group
//   absmax(b) = max over the group (warp shuffles; + shared memory when the group spans warps)
//   codes: each thread encodes its kElems values and writes kElems/2 packed bytes in one store.
//
// kElems = 8 (B <= 2048) or 16 (B = 4096). The grid is persistent and strides over tiles with
// 64-bit indices, so numel may exceed 2^31.
#include <cmath>

#include "common/nf4_format.h"
#include "cuda/dtype_switch.cuh"
#include "cuda/nf4_cuda.h"
#include "cuda/nf4_device.cuh"

namespace lora_ops::cuda {
namespace {

// Compile-time work split of one blocksize (see the diagram above): threads per quantization block,
// elements per thread, quantization blocks per CTA tile.
template <int kBlocksize>
struct QuantizeShape {
  static constexpr int kGroup = kBlocksize / 8 < kNf4Threads ? kBlocksize / 8 : kNf4Threads;
  static constexpr int kElems = kBlocksize / kGroup;
  static constexpr int kBlocksPerTile = kNf4Threads / kGroup;
  static_assert(kElems == 8 || kElems == 16, "each thread handles 8 or 16 elements");
  static_assert(kGroup * kElems == kBlocksize, "a group covers one quantization block exactly");
};

// Loads kElems consecutive inputs starting at `begin` as float32 (elements past numel read as 0,
// which cannot raise a block's absmax). `vector_ok`: base pointer 16-byte aligned, so whole groups
// of 8 (16-bit) or 4 (fp32) elements are one 16-byte load each.
template <int kElems, typename T>
__device__ __forceinline__ void load_inputs(const T* __restrict__ in, int64_t begin, int64_t numel, bool vector_ok,
                                            float (&v)[kElems]) {
  constexpr int kPerVec = 16 / sizeof(T);
  if (vector_ok && begin + kElems <= numel) {
#pragma unroll
    for (int k = 0; k < kElems / kPerVec; ++k) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(in + begin) + k);
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int i = 0; i < kPerVec; ++i) v[k * kPerVec + i] = widen_element<T>(words, i);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kElems; ++i) v[i] = begin + i < numel ? to_float(in[begin + i]) : 0.0f;
  }
}

// Max of `bits` over the kGroup threads of one quantization block. Group members are kGroup
// consecutive lanes (kGroup a power of two), so XOR shuffles with offsets < kGroup stay inside the
// group; groups wider than a warp combine per-warp maxima through shared memory (double-buffered
// by tile parity so one __syncthreads per tile suffices). Every thread of the CTA must call it.
template <int kGroup>
__device__ __forceinline__ uint32_t group_max(uint32_t bits, uint32_t (*warp_max)[kNf4Threads / 32], int parity) {
  constexpr int kWidth = kGroup < 32 ? kGroup : 32;
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) bits = max(bits, __shfl_xor_sync(0xffffffffu, bits, offset));
  if constexpr (kGroup > 32) {
    constexpr int kWarps = kGroup / 32;
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) warp_max[parity][warp] = bits;
    __syncthreads();
    const int first = warp / kWarps * kWarps;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) bits = max(bits, warp_max[parity][first + w]);
  }
  return bits;
}

template <typename T, int kBlocksize>
__global__ void __launch_bounds__(kNf4Threads)
    nf4_quantize_kernel(const T* __restrict__ in, int64_t numel, uint8_t* __restrict__ packed,
                        float* __restrict__ absmax, bool vector_ok) {
  using S = QuantizeShape<kBlocksize>;
  __shared__ uint32_t warp_max[2][kNf4Threads / 32];
  const int64_t n_blocks = (numel + kBlocksize - 1) / kBlocksize;
  const int64_t n_tiles = (n_blocks + S::kBlocksPerTile - 1) / S::kBlocksPerTile;
  const int64_t n_bytes = (numel + 1) / 2;
  const int group = threadIdx.x / S::kGroup;
  const int member = threadIdx.x % S::kGroup;
  int parity = 0;
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x, parity ^= 1) {
    const int64_t block = tile * S::kBlocksPerTile + group;
    const int64_t begin = block * kBlocksize + static_cast<int64_t>(member) * S::kElems;
    float v[S::kElems];
    load_inputs<S::kElems>(in, begin, numel, vector_ok, v);
    // |x| as raw bits: for non-negative floats the unsigned order IS the float order, and every
    // NaN (sign cleared) compares above +Inf, so one integer max finds absmax AND flags NaN/Inf.
    uint32_t bits = 0;
#pragma unroll
    for (int i = 0; i < S::kElems; ++i) bits = max(bits, __float_as_uint(fabsf(v[i])));
    bits = group_max<S::kGroup>(bits, warp_max, parity);
    if (block >= n_blocks) continue;  // after the reduction: every thread took part in it

    const bool finite = bits < 0x7f800000u;
    const float amax = __uint_as_float(bits);
    if (member == 0) absmax[block] = finite ? amax : __uint_as_float(0x7fc00000u);  // NaN marks the block
    uint8_t bytes[S::kElems / 2];
    if (!finite || amax == 0.0f) {
      // Non-finite or all-zero block: every element is the exact-zero code (like the CPU kernel).
#pragma unroll
      for (int j = 0; j < S::kElems / 2; ++j) bytes[j] = nf4_pack(kNf4ZeroCode, kNf4ZeroCode);
    } else {
      const Nf4Normalizer r = nf4_normalizer(amax);  // correctly rounded reciprocal (spec section 2)
#pragma unroll
      for (int j = 0; j < S::kElems / 2; ++j) {
        const int64_t i = begin + 2 * j;
        // Elements past numel (the odd last nibble) are the zero code, whatever r is.
        const uint8_t hi = i < numel ? nf4_encode(nf4_normalize(v[2 * j], r)) : kNf4ZeroCode;
        const uint8_t lo = i + 1 < numel ? nf4_encode(nf4_normalize(v[2 * j + 1], r)) : kNf4ZeroCode;
        bytes[j] = nf4_pack(hi, lo);
      }
    }
    const int64_t byte0 = begin / 2;
    if (vector_ok && begin + S::kElems <= numel) {
      if constexpr (S::kElems == 8) {
        *reinterpret_cast<uint32_t*>(packed + byte0) =
            bytes[0] | (bytes[1] << 8) | (bytes[2] << 16) | (static_cast<uint32_t>(bytes[3]) << 24);
      } else {
        uint2 w;
        w.x = bytes[0] | (bytes[1] << 8) | (bytes[2] << 16) | (static_cast<uint32_t>(bytes[3]) << 24);
        w.y = bytes[4] | (bytes[5] << 8) | (bytes[6] << 16) | (static_cast<uint32_t>(bytes[7]) << 24);
        *reinterpret_cast<uint2*>(packed + byte0) = w;
      }
    } else {
#pragma unroll
      for (int j = 0; j < S::kElems / 2; ++j)
        if (byte0 + j < n_bytes) packed[byte0 + j] = bytes[j];
    }
  }
}

template <typename T, int kBlocksize>
cudaError_t launch_quantize(const Nf4QuantizeParams& p, cudaStream_t stream) {
  using S = QuantizeShape<kBlocksize>;
  const int64_t n_blocks = (p.numel + kBlocksize - 1) / kBlocksize;
  const int64_t n_tiles = (n_blocks + S::kBlocksPerTile - 1) / S::kBlocksPerTile;
  // 16-byte input loads need a 16-byte aligned base; the packed store of kElems/2 bytes needs that
  // alignment of the packed base (every thread's first element is a multiple of kElems).
  const bool vector_ok = is_aligned(p.input, 16) && is_aligned(p.packed, S::kElems / 2);
  auto kernel = nf4_quantize_kernel<T, kBlocksize>;
  int grid = 0;
  cudaError_t err = persistent_grid(kernel, n_tiles, 0, &grid);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kNf4Threads, 0, stream>>>(static_cast<const T*>(p.input), p.numel, p.packed, p.absmax, vector_ok);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_blocksize(const Nf4QuantizeParams& p, cudaStream_t stream) {
  switch (p.blocksize) {
    case 32: return launch_quantize<T, 32>(p, stream);
    case 64: return launch_quantize<T, 64>(p, stream);
    case 128: return launch_quantize<T, 128>(p, stream);
    case 256: return launch_quantize<T, 256>(p, stream);
    case 512: return launch_quantize<T, 512>(p, stream);
    case 1024: return launch_quantize<T, 1024>(p, stream);
    case 2048: return launch_quantize<T, 2048>(p, stream);
    case 4096: return launch_quantize<T, 4096>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t nf4_quantize(const Nf4QuantizeParams& p, cudaStream_t stream) {
  if (p.numel < 0 || !nf4_valid_blocksize(p.blocksize)) return cudaErrorInvalidValue;
  if (p.numel == 0) return cudaSuccess;
  if (p.input == nullptr || p.packed == nullptr || p.absmax == nullptr) return cudaErrorInvalidValue;
  return with_cuda_type(p.input_dtype,
                        [&](auto tag) { return dispatch_blocksize<typename decltype(tag)::type>(p, stream); });
}

}  // namespace lora_ops::cuda
