// CPU kernel of the per-row multi-adapter LoRA term (serving): common/multi_lora_params.h. Torch-free;
// called by csrc/bindings/ops_multi_lora.cpp after the base term ran through qlora_matmul once for all rows.
#pragma once

#include "common/multi_lora_params.h"

namespace lora_ops::cpu {

// out[m] += scale[c] · (x[m]·A[c]ᵀ)·Bt[c] for every row m with a loaded adapter c = ids[m], rounded once
// more into out. Rows are grouped by adapter (a counting sort, no loop over empty slots) so each adapter's
// factors are read once per call whatever the number of its rows. ids must be valid (< slots), checked by
// the caller. AVX-512 inner loops when selected (cpu_isa.h), portable C++ otherwise.
void multi_lora_add(const MultiLoraParams& p);

} // namespace lora_ops::cpu
