// The CPU backend: the torch-free kernels of csrc/kernels/cpu/, registered for the CPU dispatch key.
// qlora_matmul's kernel is chosen by cpu::choose_matmul_path from the CPU crossover table (with the
// benchmark overrides of env_overrides.h applied here, once); its large-M path (kSlabGemm) calls ATen's
// GEMM and so runs here, in qlora_slab.cpp (the loop CUDA's fp32 large-M path shares).
#include <torch/library.h>

#include "bindings/cpu_path_query.h"
#include "bindings/env_overrides.h"
#include "bindings/qlora_slab.h"
#include "bindings/register_ops.h"
#include "cpu/adamw_cpu.h"
#include "cpu/nf4_cpu.h"
#include "cpu/lora_factors_cpu.h"
#include "cpu/qlora_cpu.h"
#include "cpu/qlora_cpu_path.h"

namespace lora_ops {
namespace {

cpu::CpuCrossover crossover_table() {
  cpu::CpuCrossover t = cpu::crossover_for(cpu::cpu_isa());
  const EnvOverrides& env = env_overrides();
  if (env.cpu_row_dot_max_m >= 0)
    t.row_dot_max_m = env.cpu_row_dot_max_m;
  if (env.cpu_fused_row_dot_max_m >= 0)
    t.fused_row_dot_max_m_bytes = t.fused_row_dot_max_m_other = env.cpu_fused_row_dot_max_m;
  if (env.cpu_axpy_max_m >= 0)
    t.axpy_max_m = env.cpu_axpy_max_m;
  if (env.cpu_slab_min_m >= 0) {
    t.slab_min_m_fwd_bf16 = t.slab_min_m_dx_bf16 = t.slab_min_m_fwd_fp16 = t.slab_min_m_dx_fp16 =
        t.slab_min_m_fwd_fp32 = t.slab_min_m_dx_fp32 = env.cpu_slab_min_m;
    t.slab_min_work = 0;
  }
  if (env.cpu_slab_bytes > 0)
    t.slab_bytes = env.cpu_slab_bytes;
  if (env.cpu_slab_rows_bytes > 0)
    t.slab_rows_bytes = env.cpu_slab_rows_bytes;
  if (env.cpu_slab_bf16_gemm >= 0)
    t.slab_bf16_gemm = env.cpu_slab_bf16_gemm != 0;
  return t;
}

const SlabKernels kCpuSlabKernels{c10::Device(c10::DeviceType::CPU), cpu::nf4_decode_window,
                                  cpu::nf4_decode_window_16bit, cpu::qlora_finish_tile};

// LORA_OPS_SLAB_CHECK_STREAMS=1 (tests): the CPU slab path runs with two W buffers, as on CUDA, under this
// SlabStreams, which has no stream to switch on the CPU but checks the loop's calls (per slab begin_decode,
// end_decode, end_gemm of one slot; slots alternating from 0), so the buffer alternation CUDA's overlap
// relies on runs, and is checked, where no GPU is.
class CheckedSlabStreams final : public SlabStreams {
public:
  void begin_decode(int slot) override {
    expect(Step::kBeginDecode, slot);
    step_ = Step::kEndDecode;
  }
  void end_decode(int slot) override {
    expect(Step::kEndDecode, slot);
    step_ = Step::kEndGemm;
  }
  void end_gemm(int slot) override {
    expect(Step::kEndGemm, slot);
    step_ = Step::kBeginDecode;
    slot_ = 1 - slot;
  }

private:
  enum class Step { kBeginDecode, kEndDecode, kEndGemm };
  void expect(Step step, int slot) const {
    TORCH_CHECK(step == step_ && slot == slot_, "qlora_matmul slab path: SlabStreams called out of order (slot ",
                slot, ", expected slot ", slot_, ")");
  }
  Step step_ = Step::kBeginDecode;
  int slot_ = 0;
};

// The table in use: read once (the overrides are read at library load).
const cpu::CpuCrossover& cpu_table() {
  static const cpu::CpuCrossover table = crossover_table();
  return table;
}

void qlora_matmul(const QloraMatmulParams& p) {
  const cpu::CpuCrossover& table = cpu_table();
  const cpu::CpuMatmulPath path = cpu::choose_matmul_path(p, table, cpu::cpu_isa());
  if (path == cpu::CpuMatmulPath::kSlabGemm) {
    CheckedSlabStreams checked;
    return qlora_matmul_slab(p, kCpuSlabKernels, table.slab_bytes, table.slab_rows_bytes, // ATen's GEMM: bound here
                             table.slab_bf16_gemm, env_overrides().cpu_slab_check_streams ? &checked : nullptr);
  }
  cpu::qlora_matmul(p, path);
}

const Backend kCpuBackend{
    c10::DeviceType::CPU,
    /*supports_float64=*/true,
    [](const Nf4QuantizeParams& p, const at::Tensor&) { return cpu::nf4_quantize(p) > 0; },
    &cpu::nf4_double_quantize,
    &cpu::nf4_dequantize,
    &qlora_matmul,
    &cpu::lora_down,
    &cpu::lora_outer,
    &cpu::dropout_mask,
    &cpu::adamw_step,
};

} // namespace

const char* cpu_matmul_path(int64_t m, int64_t n, int64_t k, DType a_dtype, bool transpose_w, int32_t blocksize) {
  QloraMatmulParams p;
  p.m = m;
  p.n = n;
  p.k = k;
  p.a_dtype = a_dtype;
  p.transpose_w = transpose_w;
  p.weight.numel = n * k;
  p.weight.blocksize = blocksize;
  return cpu::cpu_matmul_path_name(cpu::choose_matmul_path(p, cpu_table(), cpu::cpu_isa()));
}

TORCH_LIBRARY_IMPL(lora_ops, CPU, m) {
  const EnvOverrides& env = env_overrides();
  cpu::select_cpu_kernels(env.no_avx2          ? cpu::CpuIsa::kPortable
                          : env.no_avx512      ? cpu::CpuIsa::kAvx2
                          : env.no_avx512_bf16 ? cpu::CpuIsa::kAvx512
                                               : cpu::CpuIsa::kAvx512Bf16);
  register_ops<&kCpuBackend>(m);
}

} // namespace lora_ops
