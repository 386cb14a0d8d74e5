// The double-quantization inputs both emulation checks build the way the binding does: the signed
// dynamic map (nf4_format.h) and offset = mean(absmax); and the kernel params that compress an absmax
// array with them. The checks run the CUDA and the CPU kernel on the same params.
#pragma once
#include <cstdint>
#include <vector>

#include "common/nf4_format.h"
#include "common/nf4_params.h"

namespace lora_emu {

struct NestedState {
  std::vector<float> code = std::vector<float>(lora_ops::kDynamicMapSize);
  float offset = 0.0f;

  explicit NestedState(const std::vector<float>& absmax) {
    lora_ops::nf4_fill_dynamic_map(code.data());
    double sum = 0;
    for (float a : absmax) sum += a;
    offset = static_cast<float>(sum / static_cast<double>(absmax.size()));
  }

  // Compresses `absmax` into qabsmax [nb] and absmax2 [ceil(nb / 256)]; points into *this and absmax.
  lora_ops::Nf4DoubleQuantParams params(const std::vector<float>& absmax, uint8_t* qabsmax, float* absmax2) const {
    lora_ops::Nf4DoubleQuantParams d;
    d.absmax = absmax.data();
    d.n_blocks = static_cast<int64_t>(absmax.size());
    d.offset = &offset;
    d.nested_code = code.data();
    d.qabsmax = qabsmax;
    d.absmax2 = absmax2;
    return d;
  }
};

}  // namespace lora_emu
