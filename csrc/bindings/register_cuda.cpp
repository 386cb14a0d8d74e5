// The CUDA backend: the torch-free launchers of csrc/kernels/cuda/ on torch's current stream (the op
// bodies set the device with a DeviceGuard), registered for the CUDA dispatch key; plus the unified-
// memory helpers of the `managed` paging backend. qlora_matmul's kernel is chosen by
// cuda::choose_matmul_path from the CUDA crossover table.
#include <ATen/ops/from_blob.h>
#include <ATen/ops/isnan.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <optional>

#include "bindings/cuda_call.h"
#include "bindings/env_overrides.h"
#include "bindings/qlora_slab.h"
#include "bindings/register_ops.h"
#include "cuda/adamw.h"
#include "cuda/managed_memory.h"
#include "cuda/nf4_cuda.h"
#include "cuda/qlora_cuda.h"
#include "cuda/qlora_cuda_path.h"

namespace lora_ops {
namespace {

// Quantize, then report whether a block held NaN/Inf: the kernel marks such blocks with absmax = NaN
// and the ONE device synchronization of this op reads that flag back (documented in the Python
// wrapper), because the op must raise instead of returning codes for a non-finite weight.
bool nf4_quantize(const Nf4QuantizeParams& p, const at::Tensor& absmax) {
  check_cuda(cuda::nf4_quantize(p, current_stream()), "nf4_quantize");
  return at::isnan(absmax).any().item<bool>();
}

// LORA_OPS_QLORA_FORCE (env_overrides.h) as a path, or nullptr.
const cuda::CudaMatmulPath* forced_path() {
  static constexpr cuda::CudaMatmulPath kTcDecode = cuda::CudaMatmulPath::kTcDecode,
                                        kDecode = cuda::CudaMatmulPath::kDecode,
                                        kTensorCore = cuda::CudaMatmulPath::kTensorCore,
                                        kSlabGemm = cuda::CudaMatmulPath::kSlabGemm,
                                        kFfma = cuda::CudaMatmulPath::kFfma;
  const char* f = qlora_forced_path();
  if (f == nullptr)
    return nullptr;
  if (std::strcmp(f, "tc_decode") == 0)
    return &kTcDecode;
  if (std::strcmp(f, "decode") == 0)
    return &kDecode;
  if (std::strcmp(f, "mma") == 0)
    return &kTensorCore;
  if (std::strcmp(f, "slab") == 0)
    return &kSlabGemm;
  if (std::strcmp(f, "ffma") == 0)
    return &kFfma;
  return nullptr;
}

void decode_window(const Nf4Weight& w, DType value_dtype, int64_t row_len, int64_t r0, int64_t r1, int64_t c0,
                   int64_t c1, float* dst, int64_t ld) {
  check_cuda(cuda::nf4_decode_window(w, value_dtype, row_len, r0, r1, c0, c1, dst, ld, current_stream()),
             "qlora_matmul (slab decode)");
}

void decode_window_16bit(const Nf4Weight& w, DType value_dtype, int64_t row_len, int64_t r0, int64_t r1, int64_t c0,
                         int64_t c1, uint16_t* dst, int64_t ld) {
  check_cuda(cuda::nf4_decode_window_16bit(w, value_dtype, row_len, r0, r1, c0, c1, dst, ld, current_stream()),
             "qlora_matmul (slab decode)");
}
// W slabs of <= 32 MiB (in the GEMM's dtype) stay in an H100/H200's L2 (50 / 60 MB) for their GEMM;
// activations are widened (fp32 GEMM) and extended by the LoRA columns in chunks of <= 256 MiB. Two slab
// buffers (64 MiB of scratch): the next slab decodes on a side stream while cuBLAS multiplies the current
// one (CudaSlabStreams).
constexpr int64_t kCudaSlabBytes = int64_t{32} << 20, kCudaSlabRowsBytes = int64_t{256} << 20;

// SlabStreams (bindings/qlora_slab.h) on CUDA: the side stream waits once for the inputs (everything the
// current stream ran before the first decode) and, per buffer, for the GEMM that last read it; the current
// stream waits for each slab's decode before its GEMM. Events only, no host synchronization; the side
// stream's last decode is waited for by the current stream, so the buffers may be freed in its order.
class CudaSlabStreams final : public SlabStreams {
public:
  CudaSlabStreams() : main_(c10::cuda::getCurrentCUDAStream()), side_(c10::cuda::getStreamFromPool()) {}
  void begin_decode(int slot) override {
    if (!started_) {
      inputs_.record(main_);
      inputs_.block(side_);
      started_ = true;
    }
    gemm_done_[slot].block(side_); // a no-op until the slot's first GEMM was recorded
    guard_.emplace(side_);
  }
  void end_decode(int slot) override {
    decoded_[slot].record(side_);
    guard_.reset();
    decoded_[slot].block(main_);
  }
  void end_gemm(int slot) override { gemm_done_[slot].record(main_); }

private:
  c10::cuda::CUDAStream main_, side_;
  c10::cuda::CUDAEvent inputs_, decoded_[2], gemm_done_[2]; // cudaEventDisableTiming, created at first record
  std::optional<c10::cuda::CUDAStreamGuard> guard_;
  bool started_ = false;
};

void qlora_matmul(const QloraMatmulParams& p) {
  constexpr const char* op = "qlora_matmul";
  const int cc_major = current_device_attr(cudaDevAttrComputeCapabilityMajor);
  const int sms = current_device_attr(cudaDevAttrMultiProcessorCount);
  switch (cuda::choose_matmul_path(p, cuda::kCudaCrossover, cc_major, forced_path())) {
  case cuda::CudaMatmulPath::kTcDecode: {
    const int splits =
        cuda::qlora_tc_decode_splits(p, sms, current_device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin));
    Workspace ws(cuda::qlora_splitk_workspace_bytes(p, splits));
    check_cuda(cuda::qlora_tc_decode(p, splits, ws.ptr(), current_stream()), op);
    return;
  }
  case cuda::CudaMatmulPath::kDecode: {
    const int splits = cuda::qlora_decode_splits(p, sms);
    Workspace ws(cuda::qlora_splitk_workspace_bytes(p, splits));
    check_cuda(cuda::qlora_decode(p, splits, ws.ptr(), current_stream()), op);
    return;
  }
  case cuda::CudaMatmulPath::kTensorCore:
    check_cuda(cuda::qlora_mma(p, current_stream()), op);
    return;
  case cuda::CudaMatmulPath::kSlabGemm: {
    CudaSlabStreams streams;
    // bf16 activations take the bf16 GEMM kind (cuBLAS bf16, fp32 accumulation; its split-K reductions
    // follow torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction, as torch's own bf16 matmul).
    qlora_matmul_slab(p, SlabKernels{c10::Device(c10::DeviceType::CUDA), decode_window, decode_window_16bit, nullptr},
                      kCudaSlabBytes, kCudaSlabRowsBytes, /*bf16_gemm=*/true, &streams);
    return;
  }
  case cuda::CudaMatmulPath::kFfma: {
    const int splits = cuda::qlora_ffma_splits(p, sms);
    Workspace ws(cuda::qlora_splitk_workspace_bytes(p, splits));
    check_cuda(cuda::qlora_ffma(p, splits, ws.ptr(), current_stream()), op);
    return;
  }
  }
}

void lora_down(const LoraDownParams& p) {
  const int splits = cuda::lora_down_splits(p, current_device_attr(cudaDevAttrMultiProcessorCount));
  Workspace ws(cuda::lora_down_workspace_bytes(p, splits));
  check_cuda(cuda::lora_down(p, splits, ws.ptr(), current_stream()), "lora_down");
}

void lora_outer(const LoraOuterParams& p) {
  const int splits = cuda::lora_outer_splits(p, current_device_attr(cudaDevAttrMultiProcessorCount));
  Workspace ws(cuda::lora_outer_workspace_bytes(p, splits));
  check_cuda(cuda::lora_outer(p, splits, ws.ptr(), current_stream()), "lora_outer");
}

// lora_dropout_mask has no impl here: its only tensor input (rng) is a CPU tensor, so the dispatcher
// always routes it to the CPU kernel; the GPU kernels apply the same mask function in-register.
const Backend kCudaBackend{
    c10::DeviceType::CUDA,
    /*supports_float64=*/false,
    &nf4_quantize,
    [](const Nf4DoubleQuantParams& p) {
      check_cuda(cuda::nf4_double_quantize(p, current_stream()), "nf4_double_quantize");
    },
    [](const Nf4DequantizeParams& p) { check_cuda(cuda::nf4_dequantize(p, current_stream()), "nf4_dequantize"); },
    &qlora_matmul,
    &lora_down,
    &lora_outer,
    /*lora_dropout_mask=*/nullptr,
    [](const AdamwStepParams& p) { check_cuda(cuda::adamw_step(p, current_stream()), "adamw_step_"); },
};

at::Tensor managed_empty(int64_t numel, int64_t device) {
  TORCH_CHECK_VALUE(numel > 0, "managed_empty: numel must be positive, got ", numel);
  TORCH_CHECK_VALUE(device >= 0 && device < c10::cuda::device_count(), "managed_empty: no CUDA device ", device);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  void* ptr = nullptr;
  check_cuda(cuda::managed_alloc(&ptr, static_cast<size_t>(numel) * sizeof(float)), "managed_empty");
  return at::from_blob(
      ptr, {numel}, [](void* p) { cuda::managed_free(p); },
      at::TensorOptions().dtype(at::kFloat).device(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device))));
}

int64_t managed_concurrent_access(int64_t device) {
  TORCH_CHECK_VALUE(device >= 0 && device < c10::cuda::device_count(), "managed_concurrent_access: no CUDA device ",
                    device);
  int supported = 0;
  check_cuda(cuda::managed_concurrent_access(static_cast<int>(device), &supported), "managed_concurrent_access");
  return supported;
}

void managed_prefetch(at::Tensor& t, bool to_host) {
  TORCH_CHECK(t.is_cuda(), "managed_prefetch_: expected a CUDA (managed) tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "managed_prefetch_: the tensor must be contiguous");
  const c10::cuda::CUDAGuard guard(t.device());
  check_cuda(cuda::managed_prefetch(t.data_ptr(), t.nbytes(), to_host ? -1 : t.device().index(), current_stream()),
             "managed_prefetch_");
}

} // namespace

TORCH_LIBRARY_IMPL(lora_ops, CUDA, m) {
  register_ops<&kCudaBackend>(m);
  m.impl("managed_prefetch_", &managed_prefetch);
}

// No tensor inputs, so no backend key to dispatch on: one kernel for every backend.
TORCH_LIBRARY_IMPL(lora_ops, CompositeExplicitAutograd, m) {
  m.impl("managed_empty", &managed_empty);
  m.impl("managed_concurrent_access", &managed_concurrent_access);
}

} // namespace lora_ops
