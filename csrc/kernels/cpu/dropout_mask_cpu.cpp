// The CPU dropout keep-mask (qlora_cpu.h: dropout_mask), the counter-based draws of common/dropout_rng.h.
#include "common/dropout_rng.h"
#include "cpu/qlora_cpu.h"

namespace lora_ops::cpu {

void dropout_mask(const DropoutMaskParams& p) {
  const DropoutParams& d = p.dropout;
  const uint32_t key = dropout_key(d.seed);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < p.rows; ++i) {
    const uint64_t ctr0 = d.offset + static_cast<uint64_t>(i) * static_cast<uint64_t>(d.cols);
    for (int64_t j = 0; j < d.cols; ++j) {
      const uint64_t ctr = ctr0 + static_cast<uint64_t>(j);
      const uint32_t h =
          dropout_hash(key, dropout_hi_key(key, static_cast<uint32_t>(ctr >> 32)), static_cast<uint32_t>(ctr));
      p.out[i * d.cols + j] = (!d.enabled() || dropout_keep_hash(h, d.threshold)) ? 1 : 0;
    }
  }
}

} // namespace lora_ops::cpu
