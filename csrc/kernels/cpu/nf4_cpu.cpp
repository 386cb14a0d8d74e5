// CPU NF4 quantize / double-quantize / dequantize. Parallel over quantization blocks: every
// allowed blocksize is even, so a block starts on a byte boundary and threads never share a byte.
#include "cpu/nf4_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/nf4_format.h"
#include "cpu/float_convert.h"

namespace lora_ops::cpu {
namespace {

constexpr float kNf4Codebook[16] = {LORA_OPS_NF4_VALUES};

template <DType T>
int64_t quantize_typed(const Nf4QuantizeParams& p) {
  using S = Storage<T>;
  const auto* in = static_cast<const typename S::type*>(p.input);
  const int64_t bs = p.blocksize;
  const int64_t n_blocks = (p.numel + bs - 1) / bs;
  int64_t nonfinite_blocks = 0;
#pragma omp parallel for schedule(static) reduction(+ : nonfinite_blocks)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t begin = b * bs;
    const int64_t end = std::min(begin + bs, p.numel);
    float amax = 0.0f;
    bool finite = true;
    for (int64_t i = begin; i < end; ++i) {
      const float v = S::load(in[i]);
      finite &= std::isfinite(v);
      amax = std::max(amax, std::fabs(v));
    }
    uint8_t* out = p.packed + begin / 2;
    const int64_t n_bytes = (end - begin + 1) / 2;
    if (!finite) {
      ++nonfinite_blocks;
      p.absmax[b] = NAN;
      std::fill(out, out + n_bytes, nf4_pack(kNf4ZeroCode, kNf4ZeroCode));
      continue;
    }
    p.absmax[b] = amax;
    if (amax == 0.0f) {  // zero block: every element is the exact-zero code
      std::fill(out, out + n_bytes, nf4_pack(kNf4ZeroCode, kNf4ZeroCode));
      continue;
    }
    const Nf4Normalizer r = nf4_normalizer(amax);
    for (int64_t j = 0; j < n_bytes; ++j) {
      const int64_t i = begin + 2 * j;
      const uint8_t hi = nf4_encode(nf4_normalize(S::load(in[i]), r));
      // Odd numel: the missing last element is 0, i.e. the zero code.
      const uint8_t lo = i + 1 < end ? nf4_encode(nf4_normalize(S::load(in[i + 1]), r)) : kNf4ZeroCode;
      out[j] = nf4_pack(hi, lo);
    }
  }
  return nonfinite_blocks;
}

template <DType T>
void dequantize_typed(const Nf4DequantizeParams& p) {
  using S = Storage<T>;
  auto* out = static_cast<typename S::type*>(p.out);
  const Nf4Weight& w = p.weight;
  const int64_t bs = w.blocksize;
  const int64_t n_blocks = w.n_blocks();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n_blocks; ++b) {
    // Each of the 16 possible outputs of this block is one product rounded once (spec section 4),
    // so a per-block table of the final values gives identical bits with no per-element math.
    const float amax = nf4_block_absmax(w, b);
    typename S::type table[16];
    for (int c = 0; c < 16; ++c) table[c] = S::store(nf4_decode(kNf4Codebook[c], amax));
    const int64_t begin = b * bs;
    const int64_t end = std::min(begin + bs, w.numel);
    const uint8_t* in = w.packed + begin / 2;
    int64_t i = begin;
    for (; i + 1 < end; i += 2) {
      const uint8_t byte = in[(i - begin) / 2];
      out[i] = table[nf4_high(byte)];
      out[i + 1] = table[nf4_low(byte)];
    }
    if (i < end) out[i] = table[nf4_high(in[(i - begin) / 2])];
  }
}

}  // namespace

float nf4_block_absmax(const Nf4Weight& w, int64_t block) {
  if (!w.nested()) return w.absmax[block];
  return nf4_nested_absmax(w.nested_code[w.qabsmax[block]], w.absmax2[block / kNestedBlocksize], *w.offset);
}

int64_t nf4_quantize(const Nf4QuantizeParams& p) {
  switch (p.input_dtype) {
    case DType::kFloat16:
      return quantize_typed<DType::kFloat16>(p);
    case DType::kBFloat16:
      return quantize_typed<DType::kBFloat16>(p);
    default:
      return quantize_typed<DType::kFloat32>(p);
  }
}

void nf4_dequantize(const Nf4DequantizeParams& p) {
  switch (p.out_dtype) {
    case DType::kFloat16:
      return dequantize_typed<DType::kFloat16>(p);
    case DType::kBFloat16:
      return dequantize_typed<DType::kBFloat16>(p);
    default:
      return dequantize_typed<DType::kFloat32>(p);
  }
}

void nf4_double_quantize(const Nf4DoubleQuantParams& p) {
  // Nearest map entry with ties to the lower index == number of midpoints strictly below v.
  // Midpoints of adjacent float32 map values are exact in double, so this IS exact nearest search.
  double mid[255];
  for (int i = 0; i < 255; ++i) mid[i] = (static_cast<double>(p.nested_code[i]) + p.nested_code[i + 1]) / 2.0;
  const float offset = *p.offset;
  const int64_t n_groups = (p.n_blocks + kNestedBlocksize - 1) / kNestedBlocksize;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t begin = g * kNestedBlocksize;
    const int64_t end = std::min(begin + kNestedBlocksize, p.n_blocks);
    float amax2 = 0.0f;
    for (int64_t i = begin; i < end; ++i) amax2 = std::max(amax2, std::fabs(LORA_FSUB_RN(p.absmax[i], offset)));
    p.absmax2[g] = amax2;
    const Nf4Normalizer r = nf4_normalizer(amax2);
    for (int64_t i = begin; i < end; ++i) {
      if (amax2 == 0.0f) {
        p.qabsmax[i] = kDynamicMapZeroCode;
        continue;
      }
      const double v = nf4_normalize(LORA_FSUB_RN(p.absmax[i], offset), r);
      p.qabsmax[i] = static_cast<uint8_t>(std::lower_bound(mid, mid + 255, v) - mid);
    }
  }
}

}  // namespace lora_ops::cpu
