// CUDA registrations of the fused QLoRA linear ops. Validation, output allocation and the tensor ->
// params translation are shared with the CPU backend (qlora_ops_common.cpp); this file supplies the
// kernel calls: the current torch stream of the input's device (CUDAGuard), split-K workspaces from
// the caching allocator (stream-ordered, no sync), every CUDA error turned into a RuntimeError, and the
// choice of qlora_matmul kernel (qlora_matmul_path below).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "bindings/qlora_ops.h"
#include "cuda/qlora_cuda.h"

namespace lora_ops {
namespace {

// ---- qlora_matmul dispatch ---------------------------------------------------------------------------
// Crossover constants, in ONE place. NOT YET MEASURED ON A GPU: they follow the kernels' design limits
// (the decode kernel keeps M <= 16 accumulator rows per lane, its transposed form M <= 4), not
// timings. bench/bench_qlora.py on a GPU must set them; record the measured table in
// bench/dispatch_qlora.md.
constexpr int64_t kDecodeMaxM = 16;  // forward, M <= this and the decode layout conditions hold -> decode
constexpr int64_t kDecodeMaxMT = 4;  // transposed (dx) form, likewise; larger M -> tensor-core kernel
static_assert(kDecodeMaxM <= cuda::kDecodeMaxRows, "the decode kernel supports at most kDecodeMaxRows rows");
static_assert(kDecodeMaxMT <= cuda::kDecodeMaxRowsT, "the transposed decode kernel supports at most 4 rows");

enum class MatmulPath { kDecode, kTensorCore, kFfma };

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

int device_attr(cudaDeviceAttr attr) {
  int dev = 0, v = 0;
  check_cuda(cudaGetDevice(&dev), "lora_ops");
  check_cuda(cudaDeviceGetAttribute(&v, attr, dev), "lora_ops");
  return v;
}

int current_sms() { return device_attr(cudaDevAttrMultiProcessorCount); }

// Testing / benchmarking override: LORA_OPS_QLORA_FORCE = decode | mma | ffma forces a path when the
// kernel supports the call (otherwise the normal rule applies).
const char* forced_path() {
  const char* v = std::getenv("LORA_OPS_QLORA_FORCE");
  return (v != nullptr && *v != '\0') ? v : nullptr;
}

MatmulPath qlora_matmul_path(const QloraMatmulParams& p) {
  const bool tc_ok = p.a_dtype != DType::kFloat32 && device_attr(cudaDevAttrComputeCapabilityMajor) >= 8 &&
                     cuda::qlora_mma_supported(p);
  const bool decode_ok = cuda::qlora_decode_supported(p);
  if (const char* f = forced_path()) {
    if (std::strcmp(f, "decode") == 0 && decode_ok) return MatmulPath::kDecode;
    if (std::strcmp(f, "mma") == 0 && tc_ok) return MatmulPath::kTensorCore;
    if (std::strcmp(f, "ffma") == 0) return MatmulPath::kFfma;
  }
  if (decode_ok && p.m <= (p.transpose_w ? kDecodeMaxMT : kDecodeMaxM)) return MatmulPath::kDecode;
  if (tc_ok) return MatmulPath::kTensorCore;
  return MatmulPath::kFfma;
}

// fp32 scratch on the current device, stream-ordered by the caching allocator: freeing it after the
// launches is safe (the block is reused only by work queued later on the same stream). None (an
// undefined tensor, nullptr to the launcher) when no split needs it.
struct Workspace {
  at::Tensor t;
  explicit Workspace(size_t bytes) {
    if (bytes == 0) return;
    const int64_t n = static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float));
    t = at::empty({n}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, c10::cuda::current_device()));
  }
  float* ptr() { return t.defined() ? t.data_ptr<float>() : nullptr; }
};

void cuda_matmul(const QloraMatmulParams& p) {
  constexpr const char* op = "qlora_matmul";
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  switch (qlora_matmul_path(p)) {
    case MatmulPath::kDecode: {
      const int splits = cuda::qlora_decode_splits(p, current_sms());
      Workspace ws(cuda::qlora_splitk_workspace_bytes(p, splits));
      check_cuda(cuda::qlora_decode(p, splits, ws.ptr(), stream), op);
      return;
    }
    case MatmulPath::kTensorCore:
      check_cuda(cuda::qlora_mma(p, stream), op);
      return;
    case MatmulPath::kFfma: {
      const int splits = cuda::qlora_ffma_splits(p, current_sms());
      Workspace ws(cuda::qlora_splitk_workspace_bytes(p, splits));
      check_cuda(cuda::qlora_ffma(p, splits, ws.ptr(), stream), op);
      return;
    }
  }
}

void cuda_down(const LoraDownParams& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int splits = cuda::lora_down_splits(p, current_sms());
  Workspace ws(cuda::lora_down_workspace_bytes(p, splits));
  check_cuda(cuda::lora_down(p, splits, ws.ptr(), stream), "lora_down");
}

void cuda_outer(const LoraOuterParams& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int splits = cuda::lora_outer_splits(p, current_sms());
  Workspace ws(cuda::lora_outer_workspace_bytes(p, splits));
  check_cuda(cuda::lora_outer(p, splits, ws.ptr(), stream), "lora_outer");
}

const QloraBackend kCuda{
    /*supports_float64=*/false,
    &cuda_matmul,
    &cuda_down,
    &cuda_outer,
};

std::tuple<at::Tensor, at::Tensor> linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                          const std::optional<at::Tensor>& absmax2,
                                          const std::optional<at::Tensor>& code, const std::optional<at::Tensor>& offset,
                                          int64_t blocksize, int64_t out_features, const at::Tensor& A,
                                          const at::Tensor& B, const std::optional<at::Tensor>& bias, double scale,
                                          double p, const std::optional<at::Tensor>& rng) {
  const c10::cuda::CUDAGuard guard(x.device());
  return qlora_linear_op(x, packed, absmax, absmax2, code, offset, blocksize, out_features, A, B, bias, scale, p, rng,
                         kCuda);
}

at::Tensor matmul(const at::Tensor& a, const at::Tensor& packed, const at::Tensor& absmax,
                  const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code,
                  const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t n, int64_t k, bool transpose_w,
                  const std::optional<at::Tensor>& lora_s, const std::optional<at::Tensor>& lora_w, double scale,
                  const std::optional<at::Tensor>& bias, double p, const std::optional<at::Tensor>& rng) {
  const c10::cuda::CUDAGuard guard(a.device());
  return qlora_matmul_op(a, packed, absmax, absmax2, code, offset, blocksize, n, k, transpose_w, lora_s, lora_w, scale,
                         bias, p, rng, kCuda);
}

at::Tensor down(const at::Tensor& a, const at::Tensor& f, double p, const std::optional<at::Tensor>& rng) {
  const c10::cuda::CUDAGuard guard(a.device());
  return lora_down_op(a, f, p, rng, kCuda);
}

at::Tensor outer(const at::Tensor& left, const at::Tensor& right, double scale, double p,
                 const std::optional<at::Tensor>& rng, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(left.device());
  return lora_outer_op(left, right, scale, p, rng, out_dtype, kCuda);
}

}  // namespace

// lora_dropout_mask has no tensor input on the data device (rng is a CPU tensor), so the dispatcher
// always routes it to the CPU kernel; the CUDA mask kernel (cuda::lora_dropout_mask) is the same
// function of (seed, offset, i, j) and the GPU kernels apply it in-register.
TORCH_LIBRARY_IMPL(lora_ops, CUDA, m) {
  m.impl("qlora_linear", &linear);
  m.impl("qlora_matmul", &matmul);
  m.impl("lora_down", &down);
  m.impl("lora_outer", &outer);
}

}  // namespace lora_ops
