// Every lora_ops op schema, in one place. The op bodies are csrc/bindings/ops_*.cpp; each device
// registers all of them the same way (csrc/bindings/register_ops.h) from csrc/bindings/register_cpu.cpp
// and register_cuda.cpp (a file that is not compiled removes its impls cleanly); fake (meta) kernels
// and autograd live next to the Python wrappers in lora_ops/ops/.
//
// An NF4 weight is ONE value in every schema: `Tensor[] w, int[] w_meta` (lora_ops.NF4Weight.op_args):
//   w = [packed, absmax] (plain, absmax f32 [nb]) or [packed, absmax u8 codes, absmax2, nested_code, offset]
//   w_meta = [blocksize, *shape]; validated only by csrc/bindings/weight_arg.cpp.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "bindings/cpu_path_query.h"
#include "cpu/qlora_cpu.h"

TORCH_LIBRARY(lora_ops, m) {
  // ---- NF4 storage (spec: ../shared/spec/nf4-format.md) -------------------------------------------
  // Blockwise NF4 codes of w (any shape, fp32/fp16/bf16): packed uint8 [ceil(n/2), 1], absmax f32 [n/bs].
  m.def("nf4_quantize(Tensor w, int blocksize) -> (Tensor packed, Tensor absmax)");
  // absmax f32 [nb] -> (qabsmax u8 [nb], absmax2 f32 [ceil(nb/256)], offset f32 []), nested blocksize 256.
  m.def("nf4_double_quantize(Tensor absmax, Tensor nested_code) -> (Tensor qabsmax, Tensor absmax2, Tensor offset)");
  // The dense weight [*w_meta[1:]] in `dtype`.
  m.def("nf4_dequantize(Tensor[] w, int[] w_meta, ScalarType dtype) -> Tensor");
  // The same into an existing contiguous `out` of the weight's shape (its dtype: fp32/fp16/bf16).
  m.def("nf4_dequantize_into(Tensor[] w, int[] w_meta, Tensor(a!) out) -> ()");

  // ---- Fused QLoRA linear -------------------------------------------------------------------------
  // Kernel seam: csrc/kernels/common/qlora_params.h. x [..., K] fp16/bf16/fp32 (fp64: CPU only); the weight
  // (w, w_meta) is NF4 [N, K]; A [r, K], B [N, r] in x's dtype or fp32 (any strides); rng: int64 [2] CPU tensor (seed, offset),
  // required when dropout_p > 0 (mask: csrc/kernels/common/dropout_rng.h). Autograd lives in
  // lora_ops/ops/qlora.py and composes the backward from the primitives below.
  // y [..., N] = x·Wᵀ + scale·s·Bᵀ + bias (x's dtype), s = drop(x)·Aᵀ [M, r] fp32 (saved for backward).
  m.def(
      "qlora_linear(Tensor x, Tensor[] w, int[] w_meta, Tensor A, Tensor B, Tensor? bias, float scale, "
      "float dropout_p, Tensor? rng) -> (Tensor y, Tensor s)");
  // The fused dequant-GEMM with LoRA epilogue. transpose_w=False: a [..., K] -> a·Wᵀ + scale·lora_s·lora_wᵀ + bias
  // [..., N]; transpose_w=True (dx): a [..., N] -> a·W + scale·(lora_s·lora_wᵀ)∘mask/(1-p) [..., K].
  // lora_s [M, r] fp32, lora_w [n_out, r] (B, or Aᵀ as a view); both absent for no LoRA term.
  m.def(
      "qlora_matmul(Tensor a, Tensor[] w, int[] w_meta, bool transpose_w, Tensor? lora_s, Tensor? lora_w, "
      "float scale, Tensor? bias, float dropout_p, Tensor? rng) -> Tensor");
  // [M, r] fp32 = drop(a)·fᵀ with a [..., l], f [r, l] (A, or Bᵀ as a view); dropout mask of a when p > 0.
  m.def("lora_down(Tensor a, Tensor f, float dropout_p, Tensor? rng) -> Tensor");
  // [p, q] out_dtype = scale · leftᵀ·drop(right), left [..., p], right [..., q] (same leading dims):
  // dA = lora_outer(u, x, ...), dB = lora_outer(dy, s, ...) with dropout_p = 0.
  m.def(
      "lora_outer(Tensor left, Tensor right, float scale, float dropout_p, Tensor? rng, ScalarType out_dtype) "
      "-> Tensor");
  // bool [rows, cols]: the LoRA dropout keep-mask of x viewed [rows, cols] (tests; kernels never store it).
  m.def("lora_dropout_mask(int rows, int cols, float dropout_p, Tensor rng) -> Tensor");

  // ---- Multi-adapter serving (csrc/kernels/common/multi_lora_params.h) -----------------------------------
  // Each row of x [..., K] picks a slot of an adapter pool: A [C, r_max, K], Bt [C, r_max, N] (B transposed per
  // slot; x's dtype or fp32), scales f32 [C], ranks int32 [C] (0: empty slot), adapter_ids int64 (one per row,
  // -1: the base alone). y = x·Wᵀ + bias + scales[c]·(x·A[c][:r]ᵀ)·Bt[c][:r] with c = adapter_ids[row]; the
  // base runs once for all rows. Forward only (serving).
  m.def(
      "multi_lora_linear(Tensor x, Tensor[] w, int[] w_meta, Tensor A, Tensor Bt, Tensor scales, Tensor ranks, "
      "Tensor adapter_ids, Tensor? bias) -> Tensor");

  // ---- Paged AdamW --------------------------------------------------------------------------------
  // Fused multi-tensor AdamW step, in place, torch.optim.AdamW's math (csrc/kernels/common/adamw_params.h).
  // Per index i: params[i] f32/f16/bf16 contiguous (any shape; usually a 1-D slice of one parameter that
  // lies in one state page), grads[i] same dtype and numel, exp_avgs[i]/exp_avg_sqs[i] f32 same numel.
  // hparams: f64 CPU [n, 7], row i = (lr, beta1, beta2, weight_decay, eps, step, maximize) of tensor i,
  // step counting this update (>= 1). CUDA: one launch per 36 tensors of one dtype, any sizes.
  m.def(
      "adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor hparams) -> ()");
  // The same update in page-table form (what PagedAdamW calls: no per-piece tensor views in Python).
  // pages: f32 [n_slots, 2, page_elems] (row 0 exp_avg, row 1 exp_avg_sq) on the params' device.
  // pieces: i64 CPU [m, 5] rows (param i, begin, end, slot, offset): elements [begin, end) of flattened
  // params[i] have their state at pages[slot, :, offset : offset + end - begin]. hparams: one row per param.
  m.def(
      "adamw_step_pages_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!) pages, Tensor pieces, Tensor hparams) "
      "-> ()");
  // CUDA unified memory for the `managed` paging backend (CUDA builds only; no tensor inputs, so these
  // are registered as CompositeExplicitAutograd in csrc/bindings/register_cuda.cpp).
  // A new f32 [numel] tensor in cudaMallocManaged memory, reported as on cuda:device; freed with cudaFree.
  m.def("managed_empty(int numel, int device) -> Tensor");
  // 1 if `device` supports concurrent managed access (prefetch + GPU/CPU coherence), else 0.
  m.def("managed_concurrent_access(int device) -> int");
  // cudaMemPrefetchAsync of t's bytes on the current stream to cuda:t.device (to_host=False) or the host.
  m.def("managed_prefetch_(Tensor(a!) t, bool to_host) -> ()");
}

namespace {

// cpu_matmul_path(m, n, k, dtype, transpose_w, blocksize) -> str: the CPU path of a qlora_matmul call
// (bindings/cpu_path_query.h); dtype is "float32", "float16", "bfloat16" or "float64".
PyObject* py_cpu_matmul_path(PyObject*, PyObject* args) {
  long long m = 0, n = 0, k = 0, blocksize = 0;
  const char* dtype = nullptr;
  int transpose_w = 0;
  if (!PyArg_ParseTuple(args, "LLLspL", &m, &n, &k, &dtype, &transpose_w, &blocksize))
    return nullptr;
  const std::string d(dtype);
  lora_ops::DType t;
  if (d == "float32")
    t = lora_ops::DType::kFloat32;
  else if (d == "float16")
    t = lora_ops::DType::kFloat16;
  else if (d == "bfloat16")
    t = lora_ops::DType::kBFloat16;
  else if (d == "float64")
    t = lora_ops::DType::kFloat64;
  else {
    PyErr_Format(PyExc_ValueError, "cpu_matmul_path: dtype must be float32, float16, bfloat16 or float64, got %s",
                 dtype);
    return nullptr;
  }
  if (m < 1 || n < 1 || k < 1 || blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0) {
    PyErr_SetString(PyExc_ValueError, "cpu_matmul_path: m, n, k >= 1 and a blocksize that is a power of two in 32..4096");
    return nullptr;
  }
  return PyUnicode_FromString(
      lora_ops::cpu_matmul_path(m, n, k, t, transpose_w != 0, static_cast<int32_t>(blocksize)));
}

PyMethodDef kMethods[] = {
    {"cpu_matmul_path", py_cpu_matmul_path, METH_VARARGS, "The CPU path of a qlora_matmul call of these sizes."},
    {nullptr, nullptr, 0, nullptr}};

} // namespace

// Importing lora_ops._C runs the static registrations above; the module holds build facts and one query.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "lora_ops native ops (see torch.ops.lora_ops)", -1, kMethods, nullptr, nullptr,
      nullptr, nullptr};
  PyObject* m = PyModule_Create(&module);
#ifdef LORA_OPS_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  // Which CPU kernels were chosen at load time (AVX2+FMA+F16C or portable), for `python -m lora_ops env`.
  PyModule_AddStringConstant(m, "CPU_SIMD", lora_ops::cpu::cpu_isa_name(lora_ops::cpu::cpu_isa()));
  // The highest level this CPU could run, and each kernel family's choice at the level in use.
  PyModule_AddStringConstant(m, "CPU_SIMD_SUPPORTED", lora_ops::cpu::cpu_isa_name(lora_ops::cpu::cpu_isa_supported()));
  PyModule_AddStringConstant(m, "CPU_KERNELS", lora_ops::cpu::cpu_kernel_families());
  return m;
}
