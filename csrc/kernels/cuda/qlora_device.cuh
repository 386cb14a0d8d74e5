// Device-side pieces shared by the fused QLoRA linear kernels (qlora_*.cu, lora_small.cu): element
// loads in any kernel dtype, the single rounding of a decoded weight to the compute dtype, the NF4
// block-absmax decode (plain or nested) and the LoRA + bias epilogue of one output element.
// Numerics follow common/qlora_params.h: W[n, k] = T(nf4_decode(code, absmax)), fp32 accumulation,
// LoRA term and bias added to the fp32 accumulator, one rounding at the store.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/dropout_rng.h"
#include "common/nf4_format.h"
#include "common/qlora_params.h"
#include "cuda/nf4_device.cuh"

namespace lora_ops::cuda {

// One element of a tensor whose dtype is only known at run time (uniform branch), widened to fp32.
// fp64 never reaches the CUDA kernels (the binding rejects it), so it reads as 0 here.
__device__ __forceinline__ float load_as_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat32: return __ldg(static_cast<const float*>(p) + i);
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return 0.0f;
  }
}

// The rounding of a decoded weight to the compute dtype, back in fp32 (exact: every fp16 / bf16 value
// is a float). fp32 compute keeps the fp32 product.
template <typename T>
__device__ __forceinline__ float round_to(float v);
template <>
__device__ __forceinline__ float round_to<float>(float v) { return v; }
template <>
__device__ __forceinline__ float round_to<__half>(float v) { return __half2float(__float2half_rn(v)); }
template <>
__device__ __forceinline__ float round_to<__nv_bfloat16>(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

__device__ __forceinline__ float round_to_dtype(float v, DType t) {
  switch (t) {
    case DType::kFloat16: return round_to<__half>(v);
    case DType::kBFloat16: return round_to<__nv_bfloat16>(v);
    default: return v;
  }
}

// Store of one final value in any dtype (rounded once).
__device__ __forceinline__ void store_as(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kFloat32: static_cast<float*>(p)[i] = v; break;
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: break;
  }
}

// log2 of a power-of-two blocksize (host side; blocksizes are validated by the binding).
inline int log2_blocksize(int32_t blocksize) {
  int l = 0;
  while ((1 << l) < blocksize) ++l;
  return l;
}

// absmax of quantization block b. Nested: dyn[q] * absmax2 + offset, both roundings of
// nf4_nested_absmax (never one FMA). `offset` is the nested offset already read from device memory.
__device__ __forceinline__ float weight_block_absmax(const Nf4Weight& w, float offset, int64_t b) {
  if (w.qabsmax != nullptr) {
    return nf4_nested_absmax(__ldg(w.nested_code + __ldg(w.qabsmax + b)), __ldg(w.absmax2 + b / kNestedBlocksize),
                             offset);
  }
  return __ldg(w.absmax + b);
}

__device__ __forceinline__ float weight_offset(const Nf4Weight& w) {
  return w.qabsmax != nullptr ? __ldg(w.offset) : 0.0f;
}

// W[row-major flat index e] as fp32 (not yet rounded to the compute dtype): the scalar path used by
// tails, unaligned operands and the FFMA kernel. `codebook` is the 16-entry table in shared memory.
__device__ __forceinline__ float weight_at(const Nf4Weight& w, int log2_bs, float offset, const float* codebook,
                                           int64_t e) {
  const uint8_t byte = __ldg(w.packed + (e >> 1));
  const uint8_t code = (e & 1) ? nf4_low(byte) : nf4_high(byte);
  return nf4_decode(codebook[code], weight_block_absmax(w, offset, e >> log2_bs));
}

// The epilogue of QloraMatmulParams for output (m, o) given the LoRA sum l = Σ_q s[m,q]·lora_w[o,q]
// (fp32): acc + scale · l (masked by the dropout of x at (m, o) in the transposed form) + bias, in fp32;
// the caller rounds once when storing. `key` = dropout_key(p.dropout.seed), hoisted by the caller.
__device__ __forceinline__ float qlora_epilogue_lora(const QloraMatmulParams& p, uint32_t key, int64_t m, int64_t o,
                                                     float acc, float l) {
  if (p.rank > 0) {
    if (p.dropout.enabled()) {
      const DropoutParams& d = p.dropout;
      const uint64_t ctr = d.offset + static_cast<uint64_t>(m) * static_cast<uint64_t>(d.cols) + static_cast<uint64_t>(o);
      const uint32_t h = dropout_hash(key, dropout_hi_key(key, static_cast<uint32_t>(ctr >> 32)), static_cast<uint32_t>(ctr));
      l = dropout_apply(dropout_keep_hash(h, d.threshold), l, d.keep_scale);
    }
    acc += static_cast<float>(p.scale) * l;
  }
  if (p.bias != nullptr) acc += load_as_float(p.bias, p.bias_dtype, o);
  return acc;
}

// The same with l computed here: r scalar loads per output (the kernels that have no tensor-core LoRA
// pass: decode, FFMA).
__device__ __forceinline__ float qlora_epilogue(const QloraMatmulParams& p, uint32_t key, int64_t m, int64_t o,
                                                float acc) {
  float l = 0.0f;
  if (p.rank > 0) {
    const float* s = static_cast<const float*>(p.lora_s) + m * p.lora_s_row_stride;
    const int64_t wo = o * p.lora_w_stride_o;
    switch (p.lora_w_dtype) {
      case DType::kFloat32: {
        const float* w = static_cast<const float*>(p.lora_w) + wo;
        for (int q = 0; q < p.rank; ++q) l = fmaf(__ldg(s + q), __ldg(w + q * p.lora_w_stride_q), l);
        break;
      }
      case DType::kFloat16: {
        const __half* w = static_cast<const __half*>(p.lora_w) + wo;
        for (int q = 0; q < p.rank; ++q) l = fmaf(__ldg(s + q), __half2float(w[q * p.lora_w_stride_q]), l);
        break;
      }
      case DType::kBFloat16: {
        const __nv_bfloat16* w = static_cast<const __nv_bfloat16*>(p.lora_w) + wo;
        for (int q = 0; q < p.rank; ++q) l = fmaf(__ldg(s + q), __bfloat162float(w[q * p.lora_w_stride_q]), l);
        break;
      }
      default: break;
    }
  }
  return qlora_epilogue_lora(p, key, m, o, acc, l);
}

// Fills a 16-entry shared-memory codebook (call before a __syncthreads).
__device__ __forceinline__ void load_codebook(float* codebook) {
  if (threadIdx.x < 16) codebook[threadIdx.x] = kNf4CodebookDevice[threadIdx.x];
}

}  // namespace lora_ops::cuda
