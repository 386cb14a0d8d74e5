// The large-M qlora_matmul on ATen's GEMM (CPU: cpu::CpuMatmulPath::kSlabGemm; CUDA: fp32 and bf16
// activations, CudaMatmulPath::kSlabGemm): one device-independent slab loop over ATen tensors, fed by each
// device's NF4 window decode. Lives in the binding layer because it calls ATen.
#pragma once
#include <c10/core/Device.h>

#include <cstdint>

#include "common/qlora_params.h"

namespace lora_ops {

struct SlabKernels {
  c10::Device device;
  // W[r0:r1, c0:c1] (W rows of row_len columns) as fp32 values of the compute dtype (T(c·absmax); the
  // fp32 product for fp32), row pitch ld, into dst on `device` (the current stream on CUDA).
  void (*decode_window)(const Nf4Weight& w, DType value_dtype, int64_t row_len, int64_t r0, int64_t r1, int64_t c0,
                        int64_t c1, float* dst, int64_t ld);
  // The same window as 16-bit values of value_dtype (row_len and c0 even), for the bf16 GEMM; nullptr on
  // a device without it (the fp32 window is then narrowed).
  void (*decode_window_16bit)(const Nf4Weight& w, DType value_dtype, int64_t row_len, int64_t r0, int64_t r1,
                              int64_t c0, int64_t c1, uint16_t* dst, int64_t ld);
  // Adds the LoRA term masked by dropout (dx form), bias, and rounds once into p.out, for rows
  // [m0, m0 + mb) x outputs [o0, o0 + ow) whose fp32 base products are in acc (pitch ld); nullptr on a
  // device whose dispatcher never sends a masked LoRA term here.
  void (*finish_tile)(const QloraMatmulParams& p, int64_t m0, int64_t mb, int64_t o0, int64_t ow, float* acc,
                      int64_t ld);
};

// Double buffering of the W slab where the device runs streams asynchronously (CUDA): slab i + 1 is
// decoded on a side stream into the other buffer while slab i's GEMM runs on the current stream. The loop
// calls, per slab and in this order, begin_decode(slot) (from here the device's kernels and ATen ops run
// on the side stream, after the GEMM that last read `slot`), end_decode(slot) (back on the current
// stream, which waits for the decode) and end_gemm(slot) after the GEMM that reads it; slots alternate
// 0, 1, 0, ... No host synchronization anywhere.
class SlabStreams {
public:
  virtual ~SlabStreams() = default;
  virtual void begin_decode(int slot) = 0;
  virtual void end_decode(int slot) = 0;
  virtual void end_gemm(int slot) = 0;
};

// out = a · op(W) + scale · LoRA term + bias (QloraMatmulParams), W dequantized in slabs of at most
// slab_bytes (in the GEMM's dtype) into one reused scratch, activations copied (widened to fp32, or kept bf16 for the bf16
// GEMM) in chunks of at most rows_bytes. a_dtype fp16 / bf16 / fp32. bf16_gemm: bf16 activations take
// ATen's bf16 GEMM (qlora_slab.cpp says when and how exactly). streams: nullptr, one W buffer and the
// current stream only; else two W buffers of slab_bytes each, decoded as SlabStreams says.
void qlora_matmul_slab(const QloraMatmulParams& p, const SlabKernels& k, int64_t slab_bytes, int64_t rows_bytes,
                       bool bf16_gemm, SlabStreams* streams = nullptr);

} // namespace lora_ops
