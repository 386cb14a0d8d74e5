// Large-M qlora_matmul: W dequantized in bounded slabs into one reused fp32 scratch, each slab multiplied
// by ATen's GEMM (CPU: MKL / oneDNN sgemm; CUDA: cuBLAS, TF32 where torch allows it) straight into its
// output columns. The same loop on both devices; only the window decode (and the dropout epilogue,
// CPU only) are device kernels (SlabKernels).
//
//   forward  y  = [x | s] · [W | scale·B]ᵀ          slab = W rows [n0, n1)    -> y columns [n0, n1)
//   dx       dx = [dy | u] · [W ; scale·Aᵀ-view]ᵀ   slab = W columns [k0, k1) -> dx columns [k0, k1)
//
// The LoRA term rides in r extra reduction columns of the same GEMM. With dropout the dx LoRA term is
// masked elementwise, so it stays out of the GEMM and the kernels' epilogue adds it (with bias) while
// rounding the fp32 slab once (SlabKernels::finish_tile).
//
// Two GEMM kinds. fp32 (default; CUDA's fp32 activations): the slab holds the weight values
// rounded to the compute dtype (the qlora_params.h contract) widened exactly, activations widen exactly,
// products accumulate in fp32 and the output is rounded once -- the contract bit for bit up to summation
// order, fp32 adapters kept at fp32. ATen's sgemm is the fast GEMM on AVX2 CPUs: its bf16 GEMM was ~6x
// slower on the 2-core AMD EPYC (Zen 1) this was measured on (bench/notes_qlora_cpu.md). bf16 (bf16_gemm:
// CPUs with AVX512_BF16, where oneDNN's bf16 GEMM is ~2x its sgemm; CUDA's bf16 activations): the slab
// holds the same values in bf16 (exact), x is used as is, products are exact in fp32 and accumulate in
// fp32, the output is rounded once; the fp32 LoRA operands and bias ride as hi + lo bf16 pairs (relative
// error ~2^-16 of the LoRA term, instead of 2^-24). With dropout in dx the fp32 kind runs (its epilogue
// needs fp32 sums).
//
// Memory: the activation copy is bounded by rows_bytes (M is chunked beyond it; each chunk decodes W once
// more), the W slab by slab_bytes (in the GEMM's dtype; the bf16 GEMM with an odd K decodes through one
// more fp32 window of twice that; two such buffers where SlabStreams overlaps decode and GEMM), an fp32
// output slab of rows x slab width where the GEMM cannot write the output itself. Never a dense W.
#include "bindings/qlora_slab.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "bindings/cpu_huge_pages.h"
#include "bindings/tensor_checks.h"

namespace lora_ops {
namespace {

// Slab widths are multiples of this (whole SIMD vectors / GEMM micro-tiles).
constexpr int64_t kSlabAlign = 16;

// A non-owning tensor over kernel-params memory (the op body owns it for the whole call).
at::Tensor view(const void* ptr, DType t, at::IntArrayRef sizes, at::IntArrayRef strides, c10::Device device) {
  return at::from_blob(const_cast<void*>(ptr), sizes, strides,
                       at::TensorOptions().dtype(scalar_type_of(t)).device(device));
}

// The first rows x cols elements of a flat fp32 scratch, as a contiguous matrix.
at::Tensor matrix(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

} // namespace

void qlora_matmul_slab(const QloraMatmulParams& p, const SlabKernels& k, int64_t slab_bytes, int64_t rows_bytes,
                       bool bf16_gemm, SlabStreams* streams) {
  const int64_t M = p.m, N = p.n, K = p.k;
  if (M == 0)
    return;
  const bool tw = p.transpose_w;
  const int64_t n_in = tw ? N : K, n_out = tw ? K : N;
  const bool fold = p.rank > 0 && !p.dropout.enabled(); // masked LoRA term: added by the epilogue instead
  const bool epilogue = p.rank > 0 && !fold;
  const int64_t r = fold ? p.rank : 0;
  // The bf16 GEMM: bf16 activations and no fp32 epilogue left to run. Its extra reduction columns hold
  // the fp32 LoRA operands split hi + lo (s·B ≈ s_hi·B_hi + s_hi·B_lo + s_lo·B_hi, 3r columns) and the
  // bias as hi + lo against two columns of ones, so the output is still rounded once.
  const bool g16 = bf16_gemm && p.a_dtype == DType::kBFloat16 && !epilogue;
  const bool bias_in_k = g16 && p.bias != nullptr;
  const int64_t kk = n_in + (g16 ? 3 * r + (bias_in_k ? 2 : 0) : r); // GEMM reduction length
  const at::ScalarType gt = g16 ? at::kBFloat16 : at::kFloat;
  const int64_t gsize = g16 ? 2 : 4;

  TORCH_CHECK(!epilogue || k.finish_tile != nullptr, "qlora_matmul: the slab path on ", k.device,
              " cannot mask the LoRA term (dispatch error)");
  const at::Tensor a = view(p.a, p.a_dtype, {M, n_in}, {p.a_row_stride, p.a_col_stride}, k.device);
  const at::Tensor out = view(p.out, p.a_dtype, {M, n_out}, {p.out_row_stride, 1}, k.device);
  at::Tensor s, lw, bias;
  if (fold) {
    s = view(p.lora_s, DType::kFloat32, {M, r}, {p.lora_s_row_stride, 1}, k.device);
    lw = view(p.lora_w, p.lora_w_dtype, {n_out, r}, {p.lora_w_stride_o, p.lora_w_stride_q}, k.device);
  }
  if (p.bias != nullptr && !epilogue)
    bias = view(p.bias, p.bias_dtype, {n_out}, {1}, k.device).to(at::kFloat);
  const float scale = static_cast<float>(p.scale); // rounded once, as the kernels do
  at::Tensor lw_hi, lw_lo, bias_hi, bias_lo; // bf16 GEMM: the split operands (small: [n_out, r], [n_out])
  if (g16 && fold) {
    const at::Tensor lws = lw.to(at::kFloat).mul(scale);
    lw_hi = lws.to(at::kBFloat16);
    lw_lo = lws.sub(lw_hi.to(at::kFloat)).to(at::kBFloat16);
  }
  if (bias_in_k) {
    bias_hi = bias.to(at::kBFloat16);
    bias_lo = bias.sub(bias_hi.to(at::kFloat)).to(at::kBFloat16);
  }

  // Slab width: output columns whose W slab ([kk, width] in the GEMM's dtype) fits slab_bytes; a multiple
  // of the quantization blocksize where the slab holds a block: dx windows then cut W's rows between
  // blocks (a block cut by a window edge decodes in part, through the scalar tail).
  const int64_t fit = std::max<int64_t>(slab_bytes / (gsize * kk), kSlabAlign);
  const int64_t align = p.weight.blocksize <= fit ? std::max<int64_t>(p.weight.blocksize, kSlabAlign) : kSlabAlign;
  int64_t width = fit / align * align;
  width = std::min(width, n_out);
  // Row chunks of at most rows_bytes, all about the same size (M = 8192 in chunks of 8097 + 95 rows would
  // decode W a second time for 95 rows).
  const int64_t rows_fit = std::min(M, std::max<int64_t>(rows_bytes / (gsize * kk), 1));
  const int64_t n_chunks = (M + rows_fit - 1) / rows_fit;
  const int64_t mc_max = (M + n_chunks - 1) / n_chunks;

  const auto opts = at::TensorOptions().dtype(gt).device(k.device);
  // The activation copy can be tens of MiB (59 MiB at M 2048, K 14336): on CPU on huge pages, whose first
  // touch faults 2 MiB at a time instead of 4 KiB.
  const at::Tensor a_buf = k.device.is_cpu() ? empty_cpu_output({mc_max * kk}, opts) : at::empty({mc_max * kk}, opts);
  const int n_slots = streams != nullptr ? 2 : 1; // W buffers: one decoding while the other feeds the GEMM
  at::Tensor w_bufs[2];
  for (int i = 0; i < n_slots; ++i)
    w_bufs[i] = at::empty({kk * width}, opts);
  // The GEMM writes its output columns in place when it produces the output dtype itself (bf16 GEMM, or fp32
  // activations) and no epilogue follows: the single rounding is the GEMM's, and no slab of y is copied.
  const bool in_place = !epilogue && scalar_type_of(p.a_dtype) == gt;
  const at::Tensor y_buf = in_place ? at::Tensor() : at::empty({mc_max * width}, opts);
  // bf16 GEMM: the window is decoded straight to bf16 where the device can (rows start on whole bytes),
  // else to fp32 here and narrowed (exactly: bf16 values) into the W buffer.
  const bool direct16 = g16 && k.decode_window_16bit != nullptr && K % 2 == 0;
  at::Tensor w32_bufs[2];
  for (int i = 0; i < n_slots; ++i)
    w32_bufs[i] = g16 && !direct16 ? at::empty({n_in * width}, opts.dtype(at::kFloat)) : w_bufs[i];
  auto bf16_ptr = [](const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
  int64_t slab_index = 0; // counted across row chunks: the slots keep alternating

  for (int64_t m0 = 0; m0 < M; m0 += mc_max) {
    const int64_t mc = std::min(mc_max, M - m0);
    const at::Tensor am = matrix(a_buf, mc, kk);
    am.narrow(1, 0, n_in).copy_(a.narrow(0, m0, mc));
    if (fold && !g16)
      am.narrow(1, n_in, r).copy_(s.narrow(0, m0, mc));
    if (fold && g16) {
      const at::Tensor sm = s.narrow(0, m0, mc);
      const at::Tensor s_hi = sm.to(at::kBFloat16);
      am.narrow(1, n_in, r).copy_(s_hi);
      am.narrow(1, n_in + r, r).copy_(s_hi);
      am.narrow(1, n_in + 2 * r, r).copy_(sm.sub(s_hi.to(at::kFloat)));
    }
    if (bias_in_k)
      am.narrow(1, n_in + 3 * r, 2).fill_(1);
    for (int64_t o0 = 0; o0 < n_out; o0 += width, ++slab_index) {
      const int64_t ow = std::min(width, n_out - o0);
      const int slot = static_cast<int>(slab_index % n_slots);
      const at::Tensor& w_buf = w_bufs[slot];
      const at::Tensor& w32_buf = w32_bufs[slot];
      if (streams != nullptr)
        streams->begin_decode(slot);
      // op(W)'s slab as a [kk, ow] GEMM operand: forward keeps W rows (a [ow, kk] buffer used transposed),
      // dx W columns (a [kk, ow] buffer). The reduction rows after n_in hold scale · lora_w of these
      // outputs (hi, lo, hi with the bf16 GEMM) and the bias (hi, lo).
      at::Tensor wop;
      if (!tw) {
        const at::Tensor wb = matrix(w_buf, ow, kk);
        if (direct16) {
          k.decode_window_16bit(p.weight, p.a_dtype, K, o0, o0 + ow, 0, K, bf16_ptr(wb), kk);
        } else if (g16) {
          const at::Tensor w32 = matrix(w32_buf, ow, n_in);
          k.decode_window(p.weight, p.a_dtype, K, o0, o0 + ow, 0, K, w32.data_ptr<float>(), n_in);
          wb.narrow(1, 0, K).copy_(w32);
        } else {
          k.decode_window(p.weight, p.a_dtype, K, o0, o0 + ow, 0, K, wb.data_ptr<float>(), kk);
        }
        if (fold && !g16)
          wb.narrow(1, K, r).copy_(lw.narrow(0, o0, ow)).mul_(scale);
        if (fold && g16) {
          wb.narrow(1, K, r).copy_(lw_hi.narrow(0, o0, ow));
          wb.narrow(1, K + r, r).copy_(lw_lo.narrow(0, o0, ow));
          wb.narrow(1, K + 2 * r, r).copy_(lw_hi.narrow(0, o0, ow));
        }
        if (bias_in_k) {
          wb.select(1, K + 3 * r).copy_(bias_hi.narrow(0, o0, ow));
          wb.select(1, K + 3 * r + 1).copy_(bias_lo.narrow(0, o0, ow));
        }
        wop = wb.t();
      } else {
        const at::Tensor wb = matrix(w_buf, kk, ow);
        if (direct16) {
          k.decode_window_16bit(p.weight, p.a_dtype, K, 0, N, o0, o0 + ow, bf16_ptr(wb), ow);
        } else if (g16) {
          const at::Tensor w32 = matrix(w32_buf, N, ow);
          k.decode_window(p.weight, p.a_dtype, K, 0, N, o0, o0 + ow, w32.data_ptr<float>(), ow);
          wb.narrow(0, 0, N).copy_(w32);
        } else {
          k.decode_window(p.weight, p.a_dtype, K, 0, N, o0, o0 + ow, wb.data_ptr<float>(), ow);
        }
        if (fold && !g16)
          wb.narrow(0, N, r).copy_(lw.narrow(0, o0, ow).t()).mul_(scale);
        if (fold && g16) {
          wb.narrow(0, N, r).copy_(lw_hi.narrow(0, o0, ow).t());
          wb.narrow(0, N + r, r).copy_(lw_lo.narrow(0, o0, ow).t());
          wb.narrow(0, N + 2 * r, r).copy_(lw_hi.narrow(0, o0, ow).t());
        }
        if (bias_in_k) {
          wb.select(0, N + 3 * r).copy_(bias_hi.narrow(0, o0, ow));
          wb.select(0, N + 3 * r + 1).copy_(bias_lo.narrow(0, o0, ow));
        }
        wop = wb;
      }
      if (streams != nullptr)
        streams->end_decode(slot);
      at::Tensor y = in_place ? out.narrow(0, m0, mc).narrow(1, o0, ow) : matrix(y_buf, mc, ow);
      if (bias.defined() && !bias_in_k)
        at::addmm_out(y, bias.narrow(0, o0, ow), am, wop);
      else
        at::mm_out(y, am, wop); // the bf16 GEMM accumulates in fp32 and rounds once into y
      if (streams != nullptr)
        streams->end_gemm(slot);
      if (epilogue)
        k.finish_tile(p, m0, mc, o0, ow, y.data_ptr<float>(), ow);
      else if (!in_place)
        out.narrow(0, m0, mc).narrow(1, o0, ow).copy_(y); // fp32 y: the single rounding to the output dtype
    }
  }
}

} // namespace lora_ops
