// The CPU large-M qlora_matmul on ATen's GEMM (cpu::CpuMatmulPath::kSlabGemm). Lives in the binding
// layer because it calls ATen; the NF4 decode and the dropout epilogue it uses are the torch-free kernels.
#pragma once
#include <cstdint>

#include "common/qlora_params.h"

namespace lora_ops {

// out = a · op(W) + scale · LoRA term + bias (QloraMatmulParams), W dequantized in slabs of at most
// slab_bytes (fp32) into one reused scratch, activations widened to fp32 in chunks of at most
// rows_bytes. a_dtype fp16 / bf16 / fp32.
void qlora_matmul_slab_cpu(const QloraMatmulParams& p, int64_t slab_bytes, int64_t rows_bytes);

} // namespace lora_ops
