// Every lora_ops op schema, in one place. Implementations register themselves per dispatch key in
// csrc/bindings/*_cpu.cpp and *_cuda.cpp (a file that is not compiled removes its impls cleanly);
// fake (meta) kernels and autograd live next to the Python wrappers in lora_ops/ops/.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(lora_ops, m) {
  // ---- NF4 storage (spec: ../shared/spec/nf4-format.md) -------------------------------------------
  // Blockwise NF4 codes of w (any shape, fp32/fp16/bf16): packed uint8 [ceil(n/2), 1], absmax f32 [n/bs].
  m.def("nf4_quantize(Tensor w, int blocksize) -> (Tensor packed, Tensor absmax)");
  // absmax f32 [nb] -> (qabsmax u8 [nb], absmax2 f32 [ceil(nb/256)], offset f32 []), nested blocksize 256.
  m.def("nf4_double_quantize(Tensor absmax, Tensor nested_code) -> (Tensor qabsmax, Tensor absmax2, Tensor offset)");
  // Dense weight of `shape` in `dtype`. absmax: f32 (plain) or u8 codes with absmax2/nested_code/offset.
  m.def(
      "nf4_dequantize(Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? nested_code, Tensor? offset, "
      "int blocksize, int[] shape, ScalarType dtype) -> Tensor");

  // ---- Fused QLoRA linear -------------------------------------------------------------------------
  // (schemas of the fused linear family go here)

  // ---- Paged AdamW --------------------------------------------------------------------------------
  // (schemas of the optimizer family go here)
}

// Importing lora_ops._C runs the static registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "lora_ops native ops (see torch.ops.lora_ops)", -1, nullptr, nullptr, nullptr,
      nullptr, nullptr};
  PyObject* m = PyModule_Create(&module);
#ifdef LORA_OPS_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}
