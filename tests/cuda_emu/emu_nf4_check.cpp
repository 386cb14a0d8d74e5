// Runs the CUDA NF4 kernels' source under the CPU emulation (emu_fiber_runtime.h) and compares every
// output byte with the CPU kernels (csrc/kernels/cpu/nf4_cpu.cpp). Prints one line per failure and
// a summary; exit status 1 on any mismatch. build_emu.py rewrites the .cu files' CUDA-only syntax
// (kernel launches `k<<<g, b, s, st>>>(...)` become `::lora_emu::make_launch(k, g, b, s, st)(...)`).
#include "emu_fiber_runtime.h"
// (the runtime must come first)
#include "cuda/nf4_dequantize.cu"
#include "cuda/nf4_double_quantize.cu"
#include "cuda/nf4_quantize.cu"

#include <cstdio>
#include <cstdlib>
#include <random>

#include "cpu/float_convert.h"
#include "cpu/nf4_cpu.h"
#include "emu_nested_state.h"

using namespace lora_ops;

namespace {

int g_failures = 0, g_checks = 0;

void expect_equal(const void* a, const void* b, size_t bytes, const char* what, int64_t n, int bs, int dtype, int extra) {
  ++g_checks;
  if (std::memcmp(a, b, bytes) == 0) return;
  ++g_failures;
  const auto* x = static_cast<const uint8_t*>(a);
  const auto* y = static_cast<const uint8_t*>(b);
  size_t i = 0;
  while (x[i] == y[i]) ++i;
  std::printf("MISMATCH %s: numel=%lld blocksize=%d dtype=%d case=%d first differing byte %zu (%02x vs %02x)\n", what,
              static_cast<long long>(n), bs, dtype, extra, i, x[i], y[i]);
}

// Input values as raw 16/32-bit storage, plus a byte shift to make the pointer misaligned.
std::vector<uint8_t> make_input(int64_t n, DType t, std::mt19937& rng, int zero_blocks_of) {
  std::normal_distribution<float> nd(0.0f, 0.05f);
  const int es = dtype_size(t);
  std::vector<uint8_t> buf(n * es);
  for (int64_t i = 0; i < n; ++i) {
    float v = nd(rng);
    if (zero_blocks_of > 0 && (i / zero_blocks_of) % 3 == 1) v = 0.0f;  // some all-zero blocks
    if (i % 97 == 5) v = 0.0f;
    if (t == DType::kFloat32) std::memcpy(&buf[i * 4], &v, 4);
    else {
      const uint16_t h = t == DType::kFloat16 ? cpu::float_to_fp16(v) : cpu::float_to_bf16(v);
      std::memcpy(&buf[i * 2], &h, 2);
    }
  }
  return buf;
}

void check_case(int64_t n, int bs, DType t, int shift, std::mt19937& rng) {
  const int es = dtype_size(t);
  std::vector<uint8_t> input = make_input(n, t, rng, bs);
  // Device buffers (host memory here), optionally misaligned by `shift` bytes.
  std::vector<uint8_t> in_store(n * es + 64);
  uint8_t* in_dev = in_store.data() + ((16 - reinterpret_cast<uintptr_t>(in_store.data()) % 16) % 16) + shift * es;
  std::memcpy(in_dev, input.data(), n * es);
  const int64_t nb = (n + bs - 1) / bs, nbytes = (n + 1) / 2;

  Nf4QuantizeParams p;
  p.input = in_dev;
  p.input_dtype = t;
  p.numel = n;
  p.blocksize = bs;
  std::vector<uint8_t> packed_gpu(nbytes + 32, 0xEE), packed_cpu(nbytes, 0xDD);
  std::vector<float> absmax_gpu(nb, -1.0f), absmax_cpu(nb, -2.0f);
  uint8_t* packed_dev = packed_gpu.data() + ((16 - reinterpret_cast<uintptr_t>(packed_gpu.data()) % 16) % 16) + shift;
  p.packed = packed_dev;
  p.absmax = absmax_gpu.data();
  if (cuda::nf4_quantize(p, nullptr) != cudaSuccess) { ++g_failures; std::printf("quantize launch failed\n"); }
  p.packed = packed_cpu.data();
  p.absmax = absmax_cpu.data();
  cpu::nf4_quantize(p);
  expect_equal(packed_dev, packed_cpu.data(), nbytes, "quantize packed", n, bs, int(t), shift);
  expect_equal(absmax_gpu.data(), absmax_cpu.data(), nb * 4, "quantize absmax", n, bs, int(t), shift);
  if (packed_dev[nbytes] != 0xEE) { ++g_failures; std::printf("quantize wrote past the end (n=%lld)\n", (long long)n); }

  // Double quantization, offset = mean (as the binding computes it).
  const lora_emu::NestedState nested_state(absmax_cpu);  // the same map and offset for both sides
  const int64_t ng = (nb + 255) / 256;
  std::vector<uint8_t> q_gpu(nb, 0xAB), q_cpu(nb, 0xCD);
  std::vector<float> a2_gpu(ng, -1.0f), a2_cpu(ng, -2.0f);
  Nf4DoubleQuantParams d = nested_state.params(absmax_cpu, q_gpu.data(), a2_gpu.data());
  if (cuda::nf4_double_quantize(d, nullptr) != cudaSuccess) { ++g_failures; std::printf("dq launch failed\n"); }
  d.qabsmax = q_cpu.data();
  d.absmax2 = a2_cpu.data();
  cpu::nf4_double_quantize(d);
  expect_equal(q_gpu.data(), q_cpu.data(), nb, "double-quant codes", n, bs, int(t), shift);
  expect_equal(a2_gpu.data(), a2_cpu.data(), ng * 4, "double-quant absmax2", n, bs, int(t), shift);

  // Dequantize, plain and nested, to every output type.
  for (int nested = 0; nested < 2; ++nested) {
    for (DType ot : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
      const int os = dtype_size(ot);
      std::vector<uint8_t> out_gpu(n * os + 64, 0xEE), out_cpu(n * os, 0xDD);
      uint8_t* out_dev = out_gpu.data() + ((16 - reinterpret_cast<uintptr_t>(out_gpu.data()) % 16) % 16) + shift * os;
      Nf4DequantizeParams q;
      q.weight.packed = packed_dev;
      q.weight.numel = n;
      q.weight.blocksize = bs;
      if (nested) {
        q.weight.qabsmax = q_cpu.data();
        q.weight.absmax2 = a2_cpu.data();
        q.weight.nested_code = nested_state.code.data();
        q.weight.offset = &nested_state.offset;
      } else {
        q.weight.absmax = absmax_cpu.data();
      }
      q.out_dtype = ot;
      q.out = out_dev;
      if (cuda::nf4_dequantize(q, nullptr) != cudaSuccess) { ++g_failures; std::printf("dequant launch failed\n"); }
      q.out = out_cpu.data();
      cpu::nf4_dequantize(q);
      expect_equal(out_dev, out_cpu.data(), n * os, nested ? "dequantize nested" : "dequantize plain", n, bs,
                   int(ot), shift);
      if (out_dev[n * os] != 0xEE) { ++g_failures; std::printf("dequantize wrote past the end\n"); }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::mt19937 rng(argc > 1 ? std::atoi(argv[1]) : 1234);
  lora_emu::g_sms = 1;  // a 1-SM "device" with 2 resident CTAs: persistent grids of 2 (the sizes below)
  // Sizes around the kernels' boundaries: chunk (32 elements), warp segment (1024), one pass of the
  // emulated 2-CTA grid (2 CTAs x 8 warps x 2 segments = 32768 elements), odd numel, partial blocks.
  // Every blocksize and dtype, aligned (16-byte vector paths) and misaligned (scalar paths).
  for (int64_t n : {1, 31, 33, 1023, 1024, 1025, 4099})
    for (int bs : {32, 64, 128, 256, 512, 1024, 2048, 4096})
      for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16})
        for (int shift : {0, 1})
          if (shift == 0 || bs == 32 || bs == 4096) check_case(n, bs, t, shift, rng);
  // Several grid-stride passes and several nested (256-block) groups: fewer combinations (slow here).
  for (int64_t n : {32768 * 2 + 1024 * 3 + 37, 32768 * 4 - 1})
    for (int bs : {32, 64, 4096})
      for (DType t : {DType::kFloat32, DType::kBFloat16}) check_case(n, bs, t, 0, rng);
  check_case(32768 * 2 + 5, 64, DType::kFloat16, 1, rng);
  std::printf("emulated CUDA NF4 kernels vs CPU kernels: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
