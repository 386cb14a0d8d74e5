// The CPU float64 path (kFloat64, gradcheck): plain loops, fp64 accumulation, W = exact fp32 products.
#include <vector>

#include "common/dropout_rng.h"
#include "cpu/nf4_decode_segment.h"
#include "cpu/qlora_cpu_kernels.h"
#include "cpu/row_convert.h"

namespace lora_ops::cpu {

void matmul_f64(const QloraMatmulParams& p) {
  const int64_t K = p.k, N = p.n, M = p.m;
  const int64_t n_in = p.transpose_w ? N : K;
  const int64_t n_out = p.transpose_w ? K : N;
  std::vector<double> acc(static_cast<size_t>(M * n_out), 0.0);
  std::vector<double> a(static_cast<size_t>(M * n_in));
  for (int64_t m = 0; m < M; ++m)
    load_row(p.a, p.a_dtype, m * p.a_row_stride, p.a_col_stride, n_in, a.data() + m * n_in);
  std::vector<float> wrow(static_cast<size_t>(K));
  for (int64_t n = 0; n < N; ++n) {
    decode_segment_portable(p.weight, DType::kFloat32, n * K, K, wrow.data());
    for (int64_t m = 0; m < M; ++m) {
      if (!p.transpose_w) {
        double s = 0.0;
        for (int64_t k = 0; k < K; ++k)
          s += a[m * n_in + k] * static_cast<double>(wrow[k]);
        acc[m * n_out + n] = s;
      } else {
        const double av = a[m * n_in + n];
        for (int64_t k = 0; k < K; ++k)
          acc[m * n_out + k] += av * static_cast<double>(wrow[k]);
      }
    }
  }
  const uint32_t key = dropout_key(p.dropout.seed);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < n_out; ++o) {
      double v = acc[m * n_out + o];
      if (p.rank > 0) {
        double l = 0.0;
        const double* s = static_cast<const double*>(p.lora_s) + m * p.lora_s_row_stride;
        for (int64_t q = 0; q < p.rank; ++q)
          l += s[q] * load_elem<double>(p.lora_w, p.lora_w_dtype, o * p.lora_w_stride_o + q * p.lora_w_stride_q);
        if (p.dropout.enabled()) {
          const uint64_t ctr = p.dropout.offset + static_cast<uint64_t>(m * p.dropout.cols + o);
          const uint32_t h =
              dropout_hash(key, dropout_hi_key(key, static_cast<uint32_t>(ctr >> 32)), static_cast<uint32_t>(ctr));
          l = dropout_apply(dropout_keep_hash(h, p.dropout.threshold), l, static_cast<double>(p.dropout.keep_scale));
        }
        v += static_cast<double>(p.scale) * l;
      }
      if (p.bias != nullptr)
        v += load_elem<double>(p.bias, p.bias_dtype, o);
      static_cast<double*>(p.out)[m * p.out_row_stride + o] = v;
    }
}

} // namespace lora_ops::cpu
