// Large CPU outputs on transparent huge pages. A fresh multi-megabyte tensor from torch's CPU allocator
// is new anonymous memory whose first touch faults 4 KiB at a time: for nf4_dequantize of a 4096 x 4096
// weight to bf16 that first touch cost more than the decode itself (bench/notes_qlora_cpu.md). Memory
// 2 MiB-aligned and advised MADV_HUGEPAGE faults 2 MiB at a time where the kernel allows it (THP
// "madvise" or "always"); elsewhere it is ordinary memory.
#pragma once
#include <ATen/ATen.h>

namespace lora_ops {

// Outputs at least this large take huge pages (smaller ones would waste most of a 2 MiB page).
constexpr int64_t kHugePageOutputBytes = 8 << 20;

// An uninitialized CPU tensor of `shape` and `options` (a CPU device), on huge pages when its size is
// at least kHugePageOutputBytes and the platform has them; otherwise at::empty's.
at::Tensor empty_cpu_output(at::IntArrayRef shape, const at::TensorOptions& options);

} // namespace lora_ops
