// Activation elements and rows between their dtypes (fp16 / bf16 / fp32 / fp64) and the accumulation
// type of the CPU kernels, and the dropout mask on a converted row: shared by the matmul kernels
// (qlora_cpu.cpp) and the LoRA factor ops (lora_factors_cpu.cpp).
#pragma once
#include <cstdint>
#include <type_traits>

#include "common/dropout_rng.h"
#include "common/dtype.h"
#include "cpu/cpu_isa.h"
#include "cpu/float_convert.h"
#include "cpu/x86_target.h"

namespace lora_ops::cpu {

template <typename Acc> inline Acc load_elem(const void* base, DType t, int64_t i) {
  switch (t) {
  case DType::kFloat16:
    return static_cast<Acc>(fp16_to_float(static_cast<const uint16_t*>(base)[i]));
  case DType::kBFloat16:
    return static_cast<Acc>(bf16_to_float(static_cast<const uint16_t*>(base)[i]));
  case DType::kFloat64:
    return static_cast<Acc>(static_cast<const double*>(base)[i]);
  default:
    return static_cast<Acc>(static_cast<const float*>(base)[i]);
  }
}

template <typename Acc> inline void store_elem(void* base, DType t, int64_t i, Acc v) {
  switch (t) {
  case DType::kFloat16:
    static_cast<uint16_t*>(base)[i] = float_to_fp16(static_cast<float>(v));
    break;
  case DType::kBFloat16:
    static_cast<uint16_t*>(base)[i] = float_to_bf16(static_cast<float>(v));
    break;
  case DType::kFloat64:
    static_cast<double*>(base)[i] = static_cast<double>(v);
    break;
  default:
    static_cast<float*>(base)[i] = static_cast<float>(v);
  }
}

#ifdef LORA_OPS_X86
// n fp16 / bf16 values -> fp32 (exact), 8 at a time (AVX2 + F16C; row_convert.cpp).
void fp16_row_to_float_avx2(const uint16_t* src, int64_t n, float* dst);
void bf16_row_to_float_avx2(const uint16_t* src, int64_t n, float* dst);
#endif

// dst[i] = src[offset + i * stride], i < n, widened to Acc.
template <typename Acc> inline void load_row(const void* src, DType t, int64_t offset, int64_t stride, int64_t n, Acc* dst) {
  if (stride == 1) {
    switch (t) {
    case DType::kFloat32: {
      const float* s = static_cast<const float*>(src) + offset;
      for (int64_t i = 0; i < n; ++i)
        dst[i] = static_cast<Acc>(s[i]);
      return;
    }
    case DType::kBFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
#ifdef LORA_OPS_X86
      if constexpr (std::is_same_v<Acc, float>) {
        if (cpu_isa() >= CpuIsa::kAvx2)
          return bf16_row_to_float_avx2(s, n, dst);
      }
#endif
      for (int64_t i = 0; i < n; ++i)
        dst[i] = static_cast<Acc>(bits_to_float(static_cast<uint32_t>(s[i]) << 16));
      return;
    }
    case DType::kFloat16:
#ifdef LORA_OPS_X86
      if constexpr (std::is_same_v<Acc, float>) {
        if (cpu_isa() >= CpuIsa::kAvx2) {
          fp16_row_to_float_avx2(static_cast<const uint16_t*>(src) + offset, n, dst);
          return;
        }
      }
#endif
      break;
    default:
      break;
    }
  }
  for (int64_t i = 0; i < n; ++i)
    dst[i] = load_elem<Acc>(src, t, offset + i * stride);
}

// Applies the dropout mask of row m (global), columns [c0, c0 + n), to those converted elements:
// v *= keep ? keep_scale : 0.
template <typename Acc>
inline void mask_row(const DropoutParams& d, uint32_t key, int64_t m, int64_t n, Acc* v, int64_t c0 = 0) {
  const uint64_t ctr0 = d.offset + static_cast<uint64_t>(m) * static_cast<uint64_t>(d.cols) + static_cast<uint64_t>(c0);
  uint32_t hi = static_cast<uint32_t>(ctr0 >> 32);
  uint32_t hi_key = dropout_hi_key(key, hi);
  const Acc ks = static_cast<Acc>(d.keep_scale);
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t ctr = ctr0 + static_cast<uint64_t>(j);
    if (static_cast<uint32_t>(ctr >> 32) != hi) {
      hi = static_cast<uint32_t>(ctr >> 32);
      hi_key = dropout_hi_key(key, hi);
    }
    v[j] = dropout_apply(dropout_keep_hash(dropout_hash(key, hi_key, static_cast<uint32_t>(ctr)), d.threshold), v[j], ks);
  }
}

} // namespace lora_ops::cpu
