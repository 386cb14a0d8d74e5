#include "bindings/env_overrides.h"

#include <cstdlib>

namespace lora_ops {
namespace {

bool flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

int64_t integer(const char* name) {
  const char* v = std::getenv(name);
  return (v != nullptr && v[0] != '\0') ? std::atoll(v) : -1;
}

} // namespace

const EnvOverrides& env_overrides() {
  static const EnvOverrides env = [] {
    EnvOverrides e;
    e.poison_outputs = flag("LORA_OPS_POISON_OUTPUTS");
    e.no_avx2 = flag("LORA_OPS_NO_AVX2");
    e.no_avx512 = flag("LORA_OPS_NO_AVX512");
    e.no_avx512_bf16 = flag("LORA_OPS_NO_AVX512_BF16");
    e.cpu_row_dot_max_m = integer("LORA_OPS_GEMV_MAX_M");
    e.cpu_fused_row_dot_max_m = integer("LORA_OPS_FUSED_ROWDOT_MAX_M");
    e.cpu_axpy_max_m = integer("LORA_OPS_AXPY_MAX_M");
    e.cpu_slab_min_m = integer("LORA_OPS_SLAB_MIN_M");
    e.cpu_slab_bytes = integer("LORA_OPS_SLAB_BYTES");
    e.cpu_slab_rows_bytes = integer("LORA_OPS_SLAB_ROWS_BYTES");
    e.cpu_slab_bf16_gemm = integer("LORA_OPS_SLAB_BF16_GEMM");
    e.cpu_slab_check_streams = flag("LORA_OPS_SLAB_CHECK_STREAMS");
    return e;
  }();
  return env;
}

const char* qlora_forced_path() {
  const char* v = std::getenv("LORA_OPS_QLORA_FORCE");
  return (v != nullptr && *v != '\0') ? v : nullptr;
}

} // namespace lora_ops
