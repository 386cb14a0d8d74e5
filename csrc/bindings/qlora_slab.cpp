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
// Why fp32 GEMMs for bf16 / fp16 activations (CPU; CUDA sends only fp32 activations here): the slab holds the weight values rounded to the compute
// dtype (the qlora_params.h contract) widened exactly, activations widen exactly, products accumulate in
// fp32 and the output is rounded once -- the contract bit for bit up to summation order, fp32 adapters
// kept at fp32 (no hi/lo split needed). And ATen's sgemm is the fast GEMM on AVX2 CPUs: its bf16 GEMM
// was ~6x slower on the 2-core AMD EPYC this was measured on (bench/notes_qlora_cpu.md).
//
// Memory: the fp32 activation copy is bounded by rows_bytes (M is chunked beyond it; each chunk decodes
// W once more), the W slab by slab_bytes, the fp32 output slab by rows x slab width. Never a dense W.
#include "bindings/qlora_slab.h"

#include <ATen/ATen.h>

#include <algorithm>

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

void qlora_matmul_slab(const QloraMatmulParams& p, const SlabKernels& k, int64_t slab_bytes, int64_t rows_bytes) {
  const int64_t M = p.m, N = p.n, K = p.k;
  const bool tw = p.transpose_w;
  const int64_t n_in = tw ? N : K, n_out = tw ? K : N;
  const bool fold = p.rank > 0 && !p.dropout.enabled(); // masked LoRA term: added by the epilogue instead
  const bool epilogue = p.rank > 0 && !fold;
  const int64_t r = fold ? p.rank : 0;
  const int64_t kk = n_in + r; // GEMM reduction length

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

  // Slab width: output columns whose fp32 W slab ([kk, width]) fits slab_bytes.
  int64_t width = std::max<int64_t>(slab_bytes / (4 * kk), kSlabAlign) / kSlabAlign * kSlabAlign;
  width = std::min(width, n_out);
  const int64_t mc_max = std::min(M, std::max<int64_t>(rows_bytes / (4 * kk), 1));

  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(k.device);
  const at::Tensor a32_buf = at::empty({mc_max * kk}, f32);
  const at::Tensor w_buf = at::empty({kk * width}, f32);
  const at::Tensor y_buf = at::empty({mc_max * width}, f32);

  for (int64_t m0 = 0; m0 < M; m0 += mc_max) {
    const int64_t mc = std::min(mc_max, M - m0);
    const at::Tensor a32 = matrix(a32_buf, mc, kk);
    a32.narrow(1, 0, n_in).copy_(a.narrow(0, m0, mc));
    if (fold)
      a32.narrow(1, n_in, r).copy_(s.narrow(0, m0, mc));
    for (int64_t o0 = 0; o0 < n_out; o0 += width) {
      const int64_t ow = std::min(width, n_out - o0);
      // op(W)'s slab as a [kk, ow] GEMM operand: forward keeps W rows (a [ow, kk] buffer used transposed),
      // dx W columns (a [kk, ow] buffer). The last r reduction rows hold scale · lora_w of these outputs.
      at::Tensor wop;
      if (!tw) {
        const at::Tensor wb = matrix(w_buf, ow, kk);
        k.decode_window(p.weight, p.a_dtype, K, o0, o0 + ow, 0, K, wb.data_ptr<float>(), kk);
        if (fold)
          wb.narrow(1, K, r).copy_(lw.narrow(0, o0, ow)).mul_(scale);
        wop = wb.t();
      } else {
        const at::Tensor wb = matrix(w_buf, kk, ow);
        k.decode_window(p.weight, p.a_dtype, K, 0, N, o0, o0 + ow, wb.data_ptr<float>(), ow);
        if (fold)
          wb.narrow(0, N, r).copy_(lw.narrow(0, o0, ow).t()).mul_(scale);
        wop = wb;
      }
      at::Tensor y32 = matrix(y_buf, mc, ow);
      if (bias.defined())
        at::addmm_out(y32, bias.narrow(0, o0, ow), a32, wop);
      else
        at::mm_out(y32, a32, wop);
      if (epilogue)
        k.finish_tile(p, m0, mc, o0, ow, y32.data_ptr<float>(), ow);
      else
        out.narrow(0, m0, mc).narrow(1, o0, ow).copy_(y32); // the single rounding to the output dtype
    }
  }
}

} // namespace lora_ops
