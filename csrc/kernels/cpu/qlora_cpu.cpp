// CPU fused QLoRA linear. Design (numbers in bench/notes_qlora_cpu.md):
//
//   Which path runs is chosen by choose_matmul_path (cpu/qlora_cpu_path.h), not here.
//   small M (forward, row-dot): AVX2 with K % blocksize == 0: codes decoded in registers and multiplied
//     into every x row at once (nf4_rowdot.h); otherwise per 4 W rows, decode them into an L1 buffer (AVX2:
//     8 codes per step via variable shifts + two vpermps table lookups) and dot them with each x row.
//   small M (dx, axpy): threads own column ranges of W, decode each W row segment once
//     and axpy it into every row's fp32 accumulator.
//   otherwise: cache-blocked GEMM. Per M-block (256..1024 rows of x converted to fp32 once), threads take
//     64-wide output panels (split into row parts too when there are few panels); for each reduction
//     block of kKB, the panel of W is dequantized into a thread-local scratch laid out as 4 micro-panels
//     [kKB][16] (64 KiB, L2-resident), and a register tile sweeps the M-block over it: 6x16 with AVX2
//     (12 ymm accumulators, FMA), 12x16 with AVX-512 (gemm_ukernel_avx512.cpp; the same bits).
//
//        x32 (M-block, fp32)         W panel scratch (per thread)        C tile (per thread)
//        [rows x n_in]       x       [kKB x 64] = 4 x [kKB x 16]   ->    [rows x 64] fp32
//              ^ 6 / 12 rows at a time       ^ 16 columns at a time
//
//   Without dropout the LoRA term rides as r more reduction terms through the same tile (x rows get s,
//   the panel r rows of scale·lora_w); with dropout the epilogue adds it (masked) to the fp32 tile. The
//   epilogue adds bias and rounds once to the output dtype. Never a dense W, never an [M, N] fp32 buffer.
//
// AVX2/FMA/F16C code lives in functions with __attribute__((target(...))) selected at run time with
// __builtin_cpu_supports, so the library itself runs on any x86-64 (no -march=native). The binding layer
// calls select_cpu_kernels once at load (cpu_isa.h; LORA_OPS_NO_AVX512=1 caps it at AVX2,
// LORA_OPS_NO_AVX2=1 at the portable path; tests use both). The AVX-512 kernels: the fused row-dot
// (nf4_rowdot_avx512.cpp), the GEMM tile (gemm_ukernel_avx512.cpp) and the dequantize block decoders
// (nf4_dequant_avx512.cpp); everything else (axpy, the buffered row-dot, and the LoRA factor ops of
// lora_factors_cpu.cpp) runs its AVX2 kernel on an AVX-512 machine. Element and row conversions:
// row_convert.h.
#include "cpu/qlora_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/nf4_format.h"
#include "cpu/cpu_isa.h"
#include "cpu/float_convert.h"
#include "cpu/gemm_ukernel_avx512.h"
#include "cpu/nf4_cpu.h"

#include "cpu/nf4_rowdot.h"
#include "cpu/row_convert.h"
#include "cpu/simd_round.h"
#include "cpu/x86_target.h"

namespace lora_ops::cpu {
namespace {

constexpr float kCodebook[16] = {LORA_OPS_NF4_VALUES};
constexpr int kMR = 6;       // micro-kernel rows (x rows per register tile)
constexpr int kNR = 16;      // micro-kernel columns (two ymm vectors)
constexpr int kPanel = 64;   // output columns per thread task (4 micro-panels)
constexpr int64_t kKB = 256; // reduction block: 4 x [256 x 16] fp32 = 64 KiB scratch
// Rows of x converted to fp32 at a time (an M-block; bounds every buffer): as many as fit kX32Bytes,
// within [kMBMin, kMBMax]. Each M-block decodes all of W once more: with 256-row blocks that decode was
// ~9 % of a 2048 x 4096 x 4096 fp32 forward on Zen 4 (perf); 768 or 1024 rows took 7 % less time.
constexpr int64_t kMBMin = 256, kMBMax = 1024;
constexpr int64_t kX32Bytes = int64_t{12} << 20;

CpuIsa isa_of_this_cpu() {
#ifdef LORA_OPS_X86
  __builtin_cpu_init(); // also checks that the OS saves the ymm / zmm state
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
    return CpuIsa::kPortable;
  for (const bool has : {__builtin_cpu_supports("avx512f") != 0, __builtin_cpu_supports("avx512bw") != 0,
                         __builtin_cpu_supports("avx512vl") != 0, __builtin_cpu_supports("avx512dq") != 0,
                         __builtin_cpu_supports("avx512bf16") != 0})
    if (!has)
      return CpuIsa::kAvx2;
  return CpuIsa::kAvx512;
#else
  return CpuIsa::kPortable;
#endif
}
// Constant-initialized (portable) until select_cpu_kernels() runs at library load, so the order of
// static initializers across files does not matter. g_use_avx2: the level is kAvx2 or above.
CpuIsa g_isa = CpuIsa::kPortable;
bool g_use_avx2 = false;

// The weight value rule (spec section 4): the fp32 product rounded once to the compute dtype.
inline float round_to_compute(float v, DType t) {
  switch (t) {
  case DType::kFloat16:
    return fp16_to_float(float_to_fp16(v));
  case DType::kBFloat16:
    return bf16_to_float(float_to_bf16(v));
  default:
    return v; // fp32 and the fp64 path use the exact fp32 product
  }
}

// ---- NF4 decode of a run of consecutive (flattened) weight elements into fp32 ------------------
void decode_segment_portable(const Nf4Weight& w, DType t, int64_t f, int64_t len, float* dst) {
  const int64_t bs = w.blocksize;
  const int64_t end = f + len;
  float tab[16];
  while (f < end) {
    const int64_t b = f / bs;
    const int64_t run_end = std::min(end, (b + 1) * bs);
    const float amax = nf4_block_absmax(w, b);
    for (int c = 0; c < 16; ++c)
      tab[c] = round_to_compute(nf4_decode(kCodebook[c], amax), t);
    for (; f < run_end; ++f) {
      const uint8_t byte = w.packed[f >> 1];
      *dst++ = tab[(f & 1) ? nf4_low(byte) : nf4_high(byte)];
    }
  }
}

#ifdef LORA_OPS_X86
// 8 codes per step: the 4 packed bytes are broadcast to 8 lanes and shifted so lane i holds code i
// (element 2j = high nibble of byte j: shifts 4,0,12,8,...); vpermps looks codes 0-7 and 8-15 up in
// two 8-entry tables and bit 3 (moved to the sign bit) selects between them.
LORA_AVX2 void decode_segment_avx2(const Nf4Weight& w, DType t, int64_t f, int64_t len, float* dst) {
  const int64_t bs = w.blocksize;
  const int64_t end = f + len;
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  const __m256i low4 = _mm256_set1_epi32(0xF);
  const __m256 cb_lo = _mm256_loadu_ps(kCodebook);
  const __m256 cb_hi = _mm256_loadu_ps(kCodebook + 8);
  alignas(32) float tab[16];
  while (f < end) {
    const int64_t b = f / bs;
    const int64_t run_end = std::min(end, (b + 1) * bs);
    const __m256 amax = _mm256_set1_ps(nf4_block_absmax(w, b));
    // One fp32 product per code (exactly nf4_decode), then one rounding to the compute dtype.
    const __m256 t_lo = round_to_compute_avx2(_mm256_mul_ps(cb_lo, amax), t);
    const __m256 t_hi = round_to_compute_avx2(_mm256_mul_ps(cb_hi, amax), t);
    if (f & 1) { // odd start: the low nibble of a byte, then the run is byte-aligned
      _mm256_store_ps(tab, t_lo);
      _mm256_store_ps(tab + 8, t_hi);
      *dst++ = tab[nf4_low(w.packed[f >> 1])];
      ++f;
    }
    for (; f + 8 <= run_end; f += 8, dst += 8) {
      uint32_t u;
      std::memcpy(&u, w.packed + (f >> 1), 4);
      const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(u)), shifts), low4);
      const __m256 lo = _mm256_permutevar8x32_ps(t_lo, idx);
      const __m256 hi = _mm256_permutevar8x32_ps(t_hi, idx);
      _mm256_storeu_ps(dst, _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))));
    }
    if (f < run_end) {
      _mm256_store_ps(tab, t_lo);
      _mm256_store_ps(tab + 8, t_hi);
      for (; f < run_end; ++f) {
        const uint8_t byte = w.packed[f >> 1];
        *dst++ = tab[(f & 1) ? nf4_low(byte) : nf4_high(byte)];
      }
    }
  }
}
#endif

void decode_segment(const Nf4Weight& w, DType t, int64_t f, int64_t len, float* dst) {
#ifdef LORA_OPS_X86
  if (g_use_avx2)
    return decode_segment_avx2(w, t, f, len, dst);
#endif
  decode_segment_portable(w, t, f, len, dst);
}

// ---- dot product (GEMV path) ------------------------------------------------------------------
float dot_portable(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j)
      acc[j] += a[i + j] * b[i + j];
  float s = 0.0f;
  for (int j = 0; j < 8; ++j)
    s += acc[j];
  for (; i < n; ++i)
    s += a[i] * b[i];
  return s;
}

#ifdef LORA_OPS_X86
LORA_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8)
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  const __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, s);
  float r = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; i < n; ++i)
    r += a[i] * b[i];
  return r;
}
#endif

#ifdef LORA_OPS_X86
// out[j] = x · w_j for 4 weight rows at once: one x load feeds 4 FMAs; 2-way unrolled so 8 independent
// accumulator chains cover the FMA latency.
LORA_AVX2 void dot4_avx2(const float* x, const float* w, int64_t ldw, int64_t n, float* out) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j)
    a[j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
    for (int j = 0; j < 4; ++j) {
      a[j] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w + j * ldw + i), a[j]);
      a[4 + j] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w + j * ldw + i + 8), a[4 + j]);
    }
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 x0 = _mm256_loadu_ps(x + i);
    for (int j = 0; j < 4; ++j)
      a[j] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w + j * ldw + i), a[j]);
  }
  for (int j = 0; j < 4; ++j) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_add_ps(a[j], a[4 + j]));
    float r = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (int64_t t = i; t < n; ++t)
      r += x[t] * w[j * ldw + t];
    out[j] = r;
  }
}

// Transposes an 8x8 fp32 tile: rows src[r * lds .. +8] -> rows dst[c * ldd .. +8].
LORA_AVX2 inline void transpose8x8_avx2(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i)
    r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}
#endif

float dot(const float* a, const float* b, int64_t n) {
#ifdef LORA_OPS_X86
  if (g_use_avx2)
    return dot_avx2(a, b, n);
#endif
  return dot_portable(a, b, n);
}

// ---- micro-kernel: C[MR x 16] (+)= x[MR x kb] · P[kb x 16] -------------------------------------
// The kb products are summed from 0 and then added to C (accumulate): blocked summation over the
// reduction, whose fp32 error stays near a BLAS GEMM's (a chain over all of K had 3-7x that at K = 4096).
template <int MR>
void ukernel_portable(const float* x, int64_t ldx, const float* pw, int64_t kb, float* c, int64_t ldc,
                      bool accumulate) {
  float acc[MR][kNR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j)
      acc[i][j] = 0.0f;
  for (int64_t k = 0; k < kb; ++k) {
    const float* wk = pw + k * kNR;
    for (int i = 0; i < MR; ++i) {
      const float xv = x[i * ldx + k];
      for (int j = 0; j < kNR; ++j)
        acc[i][j] += xv * wk[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j)
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
}

#ifdef LORA_OPS_X86
// 12 ymm accumulators (6 rows x 2 vectors), 2 weight loads and 6 broadcasts per k: FMA-bound. The
// accumulators are named variables (an array of __m256 made gcc spill them to the stack every k).
#define LORA_UK_ROW(i)                                                                                                 \
  if constexpr (MR > i) {                                                                                              \
    const __m256 xv = _mm256_broadcast_ss(x + i * ldx + k);                                                            \
    c##i##0 = _mm256_fmadd_ps(xv, w0, c##i##0);                                                                        \
    c##i##1 = _mm256_fmadd_ps(xv, w1, c##i##1);                                                                        \
  }
#define LORA_UK_INIT(i) __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps();
#define LORA_UK_STORE(i)                                                                                               \
  if constexpr (MR > i) {                                                                                              \
    _mm256_storeu_ps(c + i * ldc, accumulate ? _mm256_add_ps(_mm256_loadu_ps(c + i * ldc), c##i##0) : c##i##0);       \
    _mm256_storeu_ps(c + i * ldc + 8, accumulate ? _mm256_add_ps(_mm256_loadu_ps(c + i * ldc + 8), c##i##1) : c##i##1); \
  }
template <int MR>
LORA_AVX2 void ukernel_avx2(const float* x, int64_t ldx, const float* pw, int64_t kb, float* c, int64_t ldc,
                            bool accumulate) {
  LORA_UK_INIT(0)
  LORA_UK_INIT(1) LORA_UK_INIT(2) LORA_UK_INIT(3) LORA_UK_INIT(4) LORA_UK_INIT(5) for (int64_t k = 0; k < kb; ++k) {
    const __m256 w0 = _mm256_load_ps(pw + k * kNR);
    const __m256 w1 = _mm256_load_ps(pw + k * kNR + 8);
    LORA_UK_ROW(0) LORA_UK_ROW(1) LORA_UK_ROW(2) LORA_UK_ROW(3) LORA_UK_ROW(4) LORA_UK_ROW(5)
  }
  LORA_UK_STORE(0) LORA_UK_STORE(1) LORA_UK_STORE(2) LORA_UK_STORE(3) LORA_UK_STORE(4) LORA_UK_STORE(5)
}
#undef LORA_UK_ROW
#undef LORA_UK_INIT
#undef LORA_UK_STORE
#endif

template <int MR>
void ukernel(const float* x, int64_t ldx, const float* pw, int64_t kb, float* c, int64_t ldc, bool accumulate) {
#ifdef LORA_OPS_X86
  if (g_use_avx2)
    return ukernel_avx2<MR>(x, ldx, pw, kb, c, ldc, accumulate);
#endif
  ukernel_portable<MR>(x, ldx, pw, kb, c, ldc, accumulate);
}

// Rows per register tile at the SIMD level in use (ukernel_rows takes up to this many).
int64_t tile_rows() { return g_isa == CpuIsa::kAvx512 ? kMrAvx512 : kMR; }

void ukernel_rows(int mr, const float* x, int64_t ldx, const float* pw, int64_t kb, float* c, int64_t ldc,
                  bool accumulate) {
#ifdef LORA_OPS_X86
  if (g_isa == CpuIsa::kAvx512)
    return ukernel_avx512(mr, x, ldx, pw, kb, c, ldc, accumulate);
#endif
  switch (mr) {
  case 1:
    return ukernel<1>(x, ldx, pw, kb, c, ldc, accumulate);
  case 2:
    return ukernel<2>(x, ldx, pw, kb, c, ldc, accumulate);
  case 3:
    return ukernel<3>(x, ldx, pw, kb, c, ldc, accumulate);
  case 4:
    return ukernel<4>(x, ldx, pw, kb, c, ldc, accumulate);
  case 5:
    return ukernel<5>(x, ldx, pw, kb, c, ldc, accumulate);
  default:
    return ukernel<6>(x, ldx, pw, kb, c, ldc, accumulate);
  }
}

// ---- 64-bit aligned scratch ---------------------------------------------------------------------
struct AlignedBuffer {
  std::vector<float> storage;
  float* ptr = nullptr;
  explicit AlignedBuffer(int64_t n) : storage(static_cast<size_t>(n + 16), 0.0f) {
    auto addr = reinterpret_cast<uintptr_t>(storage.data());
    ptr = storage.data() + ((64 - addr % 64) % 64) / sizeof(float);
  }
};

#ifdef LORA_OPS_X86
// fp32 -> bf16 / fp16 with round-to-nearest-even, 8 at a time (bf16: NaN is kept quiet as in
// float_to_bf16; fp16: F16C vcvtps2ph).
LORA_AVX2 void store_row_16bit_avx2(uint16_t* out, const float* c, int64_t n, DType t) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(c + i);
    __m128i h;
    if (t == DType::kFloat16) {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      const __m256i u = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
      r = _mm256_blendv_epi8(r, qnan, nan);
      // pack the low 16 bits of 8 lanes (values < 2^16, so unsigned saturation is exact)
      h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  for (; i < n; ++i)
    out[i] = t == DType::kFloat16 ? float_to_fp16(c[i]) : float_to_bf16(c[i]);
}
#endif

// lr[t] = Σ_q s[q] · lw[q * kPanel + t] for the kPanel columns, q in order: the LoRA term of one output
// row (AVX2: one fused multiply-add per term, the 64 columns in 8 ymm accumulators).
void lora_panel_term_portable(const float* s, const float* lw, int64_t rank, float* lr) {
  for (int t = 0; t < kPanel; ++t)
    lr[t] = 0.0f;
  for (int64_t q = 0; q < rank; ++q)
    for (int t = 0; t < kPanel; ++t)
      lr[t] += s[q] * lw[q * kPanel + t];
}
#ifdef LORA_OPS_X86
static_assert(kPanel == 64, "lora_panel_term_avx2 holds kPanel columns in 8 ymm registers");
LORA_AVX2 void lora_panel_term_avx2(const float* s, const float* lw, int64_t rank, float* lr) {
  __m256 acc[8];
  for (int v = 0; v < 8; ++v)
    acc[v] = _mm256_setzero_ps();
  for (int64_t q = 0; q < rank; ++q) {
    const __m256 sv = _mm256_set1_ps(s[q]);
    for (int v = 0; v < 8; ++v)
      acc[v] = _mm256_fmadd_ps(sv, _mm256_loadu_ps(lw + q * kPanel + 8 * v), acc[v]);
  }
  for (int v = 0; v < 8; ++v)
    _mm256_storeu_ps(lr + 8 * v, acc[v]);
}
#endif
void lora_panel_term(const float* s, const float* lw, int64_t rank, float* lr) {
#ifdef LORA_OPS_X86
  if (g_use_avx2)
    return lora_panel_term_avx2(s, lw, rank, lr);
#endif
  lora_panel_term_portable(s, lw, rank, lr);
}

// ---- the shared epilogue: LoRA term (masked in backward), bias, single rounding ------------------
struct Epilogue {
  const QloraMatmulParams& p;
  uint32_t key = 0;

  explicit Epilogue(const QloraMatmulParams& params) : p(params) { key = dropout_key(p.dropout.seed); }

  // lw[q * kPanel + t] = lora_w[o0 + t, q] in fp32 (zero beyond ow).
  // Reads along lora_w's contiguous index (B [N, r] in forward: q; the Aᵀ view in dx: t): column-wise
  // reads of B touched a new cache line per element and cost ~10% of an M = 1 forward.
  void load_lora_panel(int64_t o0, int64_t ow, float* lw) const {
    const auto elem = [&](int64_t t, int64_t q) {
      return load_elem<float>(p.lora_w, p.lora_w_dtype, (o0 + t) * p.lora_w_stride_o + q * p.lora_w_stride_q);
    };
    if (ow < kPanel)
      std::fill(lw, lw + p.rank * kPanel, 0.0f);
    if (p.lora_w_dtype == DType::kFloat32 && p.lora_w_stride_q == 1) { // PEFT's fp32 B: no per-element switch
      const float* b = static_cast<const float*>(p.lora_w) + o0 * p.lora_w_stride_o;
      for (int64_t t = 0; t < ow; ++t)
        for (int64_t q = 0; q < p.rank; ++q)
          lw[q * kPanel + t] = b[t * p.lora_w_stride_o + q];
      return;
    }
    if (p.lora_w_stride_q < p.lora_w_stride_o) {
      for (int64_t t = 0; t < ow; ++t)
        for (int64_t q = 0; q < p.rank; ++q)
          lw[q * kPanel + t] = elem(t, q);
    } else {
      for (int64_t q = 0; q < p.rank; ++q)
        for (int64_t t = 0; t < ow; ++t)
          lw[q * kPanel + t] = elem(t, q);
    }
  }

  // Asks for the panel's lora_w rows ahead of load_lora_panel (B in forward, contiguous rows): issued
  // before the panel's W rows are decoded, so they arrive during that work instead of after it.
  void prefetch_lora_panel(int64_t o0, int64_t ow) const {
#ifdef LORA_OPS_X86
    if (p.rank == 0 || p.lora_w_stride_q != 1)
      return;
    const int64_t row_bytes = p.rank * dtype_size(p.lora_w_dtype);
    const char* base = static_cast<const char*>(p.lora_w);
    for (int64_t t = 0; t < ow; ++t) {
      const char* row = base + (o0 + t) * p.lora_w_stride_o * dtype_size(p.lora_w_dtype);
      for (int64_t b = 0; b < row_bytes; b += 64)
        _mm_prefetch(row + b, _MM_HINT_T0);
    }
#else
    (void)o0;
    (void)ow;
#endif
  }

  // Finishes row m (global) of the panel: c[t] holds the fp32 base product for columns o0 + t (with
  // lw == nullptr: the LoRA term is in it already, folded into the reduction by the caller).
  void finish_row(int64_t m, int64_t o0, int64_t ow, float* c, const float* lw) const {
    if (p.rank > 0 && lw != nullptr) {
      float lr[kPanel];
      lora_panel_term(static_cast<const float*>(p.lora_s) + m * p.lora_s_row_stride, lw, p.rank, lr);
      if (p.dropout.enabled())
        apply_mask(m, o0, ow, lr);
      const float scale = static_cast<float>(p.scale);
      for (int64_t t = 0; t < ow; ++t)
        c[t] += scale * lr[t];
    }
    if (p.bias != nullptr)
      for (int64_t t = 0; t < ow; ++t)
        c[t] += load_elem<float>(p.bias, p.bias_dtype, o0 + t);
    store_row(m, o0, ow, c);
  }

  void apply_mask(int64_t m, int64_t o0, int64_t ow, float* v) const {
    const DropoutParams& d = p.dropout;
    const uint64_t ctr0 =
        d.offset + static_cast<uint64_t>(m) * static_cast<uint64_t>(d.cols) + static_cast<uint64_t>(o0);
    for (int64_t t = 0; t < ow; ++t) {
      const uint64_t ctr = ctr0 + static_cast<uint64_t>(t);
      const uint32_t h =
          dropout_hash(key, dropout_hi_key(key, static_cast<uint32_t>(ctr >> 32)), static_cast<uint32_t>(ctr));
      v[t] = dropout_apply(dropout_keep_hash(h, d.threshold), v[t], d.keep_scale);
    }
  }

  void store_row(int64_t m, int64_t o0, int64_t ow, const float* c) const {
    const int64_t base = m * p.out_row_stride + o0;
#ifdef LORA_OPS_X86
    if (g_use_avx2 && p.a_dtype != DType::kFloat32) {
      store_row_16bit_avx2(static_cast<uint16_t*>(p.out) + base, c, ow, p.a_dtype);
      return;
    }
#endif
    switch (p.a_dtype) {
    case DType::kFloat32:
      std::memcpy(static_cast<float*>(p.out) + base, c, static_cast<size_t>(ow) * sizeof(float));
      break;
    case DType::kBFloat16: {
      uint16_t* o = static_cast<uint16_t*>(p.out) + base;
      for (int64_t t = 0; t < ow; ++t)
        o[t] = float_to_bf16(c[t]);
      break;
    }
    default: {
      uint16_t* o = static_cast<uint16_t*>(p.out) + base;
      for (int64_t t = 0; t < ow; ++t)
        o[t] = float_to_fp16(c[t]);
    }
    }
  }
};

// All M rows of a ([M, cols], any strides and dtype) as one contiguous fp32 block: the small-M paths
// read each row once per W row, so they convert up front.
std::vector<float> rows_to_f32(const QloraMatmulParams& p, int64_t cols) {
  std::vector<float> out(static_cast<size_t>(p.m * cols));
  for (int64_t m = 0; m < p.m; ++m)
    load_row(p.a, p.a_dtype, m * p.a_row_stride, p.a_col_stride, cols, out.data() + m * cols);
  return out;
}

// Why a work threshold on the matmul kernels' OpenMP regions: a region costs a fork/join even on an idle
// machine, and when another process holds a core, a wait for a descheduled thread (milliseconds, measured
// by bench/bench_call_overhead.py on a loaded 2-core box); below this many multiply-adds plus weight
// decodes one thread is faster. Results do not depend on it: every output element is computed by one
// thread in every kernel below.
bool worth_threads(const QloraMatmulParams& p) { return (p.m + 1) * p.n * p.k > (int64_t{1} << 17); }

// Forward with few rows: each thread takes 64 W rows (output columns) at a time and either decodes them in
// registers straight into the dot products (kRowDotFused, nf4_rowdot.h) or decodes 4 rows at a time into
// an L1 buffer and dots them with each x row (kRowDot).
void matmul_gemv(const QloraMatmulParams& p, CpuMatmulPath path) {
  const int64_t K = p.k, N = p.n, M = p.m;
  std::vector<float> x32 = rows_to_f32(p, K);
  const Epilogue ep(p);
  constexpr int64_t kRows = kPanel; // W rows per task: the epilogue works on 64 columns at a time
  const int64_t n_tasks = (N + kRows - 1) / kRows;
  const bool fused = path == CpuMatmulPath::kRowDotFused; // codes decoded in registers
  if (fused)
    rowdot_prepare_x(p.weight, p.a_dtype, M, K, x32.data());
#pragma omp parallel if (worth_threads(p))
  {
    AlignedBuffer wrow(fused ? 0 : 4 * K);
    std::vector<float> lw(static_cast<size_t>(std::max<int64_t>(p.rank, 1) * kPanel));
    std::vector<float> c(static_cast<size_t>(M * kPanel));
#pragma omp for schedule(static)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int64_t o0 = task * kRows;
      const int64_t ow = std::min(kRows, N - o0);
      int64_t t = 0;
      ep.prefetch_lora_panel(o0, ow);
#ifdef LORA_OPS_X86
      if (fused) {
        rowdot_fused(p.weight, p.a_dtype, K, o0, ow, x32.data(), M, c.data(), kPanel);
        t = ow;
      }
      if (g_use_avx2) {
        for (; t + 4 <= ow; t += 4) {
          decode_segment(p.weight, p.a_dtype, (o0 + t) * K, 4 * K, wrow.ptr); // 4 consecutive W rows
          float d[4];
          for (int64_t m = 0; m < M; ++m) {
            dot4_avx2(x32.data() + m * K, wrow.ptr, K, K, d);
            for (int j = 0; j < 4; ++j)
              c[m * kPanel + t + j] = d[j];
          }
        }
      }
#endif
      for (; t < ow; ++t) {
        decode_segment(p.weight, p.a_dtype, (o0 + t) * K, K, wrow.ptr);
        for (int64_t m = 0; m < M; ++m)
          c[m * kPanel + t] = dot(x32.data() + m * K, wrow.ptr, K);
      }
      if (p.rank > 0)
        ep.load_lora_panel(o0, ow, lw.data());
      for (int64_t m = 0; m < M; ++m)
        ep.finish_row(m, o0, ow, c.data() + m * kPanel, lw.data());
    }
  }
}

// dx with few rows: out[m, k] = Σ_n a[m, n] · W[n, k]. Threads own column ranges of W (kAxpyCols wide)
// and stream every W row segment once, decoding it into an L1 buffer and adding a[m, n] times it to
// each row's fp32 accumulator (an axpy; no transposition of W, long contiguous decode runs).
constexpr int64_t kAxpyCols = 512;
// W rows summed from 0 before their sum joins the accumulator: one chain over all N (4096..14336 terms)
// had several times the fp32 error of torch's matmul (tests/test_qlora_cpu_accuracy.py).
constexpr int64_t kAxpyRun = 256;

void axpy_portable(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    y[i] += a * x[i];
}
#ifdef LORA_OPS_X86
LORA_AVX2 void axpy_avx2(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i)
    y[i] += a * x[i];
}
#endif
void axpy(float a, const float* x, float* y, int64_t n) {
#ifdef LORA_OPS_X86
  if (g_use_avx2)
    return axpy_avx2(a, x, y, n);
#endif
  axpy_portable(a, x, y, n);
}

void matmul_axpy_transposed(const QloraMatmulParams& p) {
  const int64_t K = p.k, N = p.n, M = p.m;
  const std::vector<float> a32 = rows_to_f32(p, N);
  const Epilogue ep(p);
  const int64_t n_tasks = (K + kAxpyCols - 1) / kAxpyCols;
#pragma omp parallel if (worth_threads(p))
  {
    AlignedBuffer wrow(kAxpyCols);
    std::vector<float> acc(static_cast<size_t>(M * kAxpyCols));
    std::vector<float> part(static_cast<size_t>(M * kAxpyCols)); // the sum over the current run of W rows
    std::vector<float> lw(static_cast<size_t>(std::max<int64_t>(p.rank, 1) * kPanel));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int64_t k0 = task * kAxpyCols;
      const int64_t kw = std::min(kAxpyCols, K - k0);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t n0 = 0; n0 < N; n0 += kAxpyRun) { // blocked summation over n (as the GEMM tile's over K)
        std::fill(part.begin(), part.end(), 0.0f);
        for (int64_t n = n0; n < std::min(N, n0 + kAxpyRun); ++n) {
          decode_segment(p.weight, p.a_dtype, n * K + k0, kw, wrow.ptr);
          for (int64_t m = 0; m < M; ++m) {
            const float av = a32[m * N + n];
            if (av != 0.0f)
              axpy(av, wrow.ptr, part.data() + m * kAxpyCols, kw);
          }
        }
        for (int64_t m = 0; m < M; ++m)
          axpy(1.0f, part.data() + m * kAxpyCols, acc.data() + m * kAxpyCols, kw);
      }
      for (int64_t o0 = k0; o0 < k0 + kw; o0 += kPanel) {
        const int64_t ow = std::min<int64_t>(kPanel, k0 + kw - o0);
        if (p.rank > 0)
          ep.load_lora_panel(o0, ow, lw.data());
        for (int64_t m = 0; m < M; ++m)
          ep.finish_row(m, o0, ow, acc.data() + m * kAxpyCols + (o0 - k0), lw.data());
      }
    }
  }
}

// Dequantizes the W panel for output columns [o0, o0 + ow) and reduction indices [i0, i0 + kb) into 4
// micro-panels [kKB][16] (columns beyond ow are zero).
void dequant_panel(const QloraMatmulParams& p, int64_t o0, int64_t ow, int64_t i0, int64_t kb, float* scratch,
                   float* tmp) {
  const int64_t K = p.k;
  const int n_micro = static_cast<int>((ow + kNR - 1) / kNR);
#ifdef LORA_OPS_X86
  if (!p.transpose_w && g_use_avx2) {
    // 8 W rows are decoded into tmp [8][kKB], then 8x8 tiles are transposed into the micro-panel.
    for (int64_t t0 = 0; t0 < n_micro * kNR; t0 += 8) {
      for (int64_t rr = 0; rr < 8; ++rr) {
        float* row = tmp + rr * kKB;
        if (t0 + rr < ow)
          decode_segment(p.weight, p.a_dtype, (o0 + t0 + rr) * K + i0, kb, row);
        else
          std::fill(row, row + kb, 0.0f);
      }
      float* dst = scratch + (t0 / kNR) * kKB * kNR + (t0 % kNR);
      int64_t kk = 0;
      for (; kk + 8 <= kb; kk += 8)
        transpose8x8_avx2(tmp + kk, kKB, dst + kk * kNR, kNR);
      for (; kk < kb; ++kk)
        for (int64_t rr = 0; rr < 8; ++rr)
          dst[kk * kNR + rr] = tmp[rr * kKB + kk];
    }
    return;
  }
#endif
  if (!p.transpose_w) {
    // Output column o is W row o; the reduction runs along that row (contiguous codes): decode the
    // row segment, then scatter it into column o % 16 of its micro-panel.
    for (int64_t t = 0; t < n_micro * kNR; ++t) {
      float* dst = scratch + (t / kNR) * kKB * kNR + (t % kNR);
      if (t < ow) {
        decode_segment(p.weight, p.a_dtype, (o0 + t) * K + i0, kb, tmp);
        for (int64_t kk = 0; kk < kb; ++kk)
          dst[kk * kNR] = tmp[kk];
      } else {
        for (int64_t kk = 0; kk < kb; ++kk)
          dst[kk * kNR] = 0.0f;
      }
    }
  } else {
    // Output column o is W column o; reduction index n is W row n, whose codes for [o0, o0 + ow) are
    // contiguous: decode and copy 16-wide chunks (no transposed copy of W exists anywhere).
    for (int64_t kk = 0; kk < kb; ++kk) {
      decode_segment(p.weight, p.a_dtype, (i0 + kk) * K + o0, ow, tmp);
      for (int64_t t = ow; t < n_micro * kNR; ++t)
        tmp[t] = 0.0f;
      for (int j = 0; j < n_micro; ++j)
        std::memcpy(scratch + j * kKB * kNR + kk * kNR, tmp + j * kNR, kNR * sizeof(float));
    }
  }
}

void matmul_gemm(const QloraMatmulParams& p) {
  const int64_t n_in = p.transpose_w ? p.n : p.k;
  const int64_t n_out = p.transpose_w ? p.k : p.n;
  const int64_t n_panels = (n_out + kPanel - 1) / kPanel;
  // Row pitch padded off multiples of 4 KiB so the 6 rows a micro-kernel reads do not alias in L1.
  // Without dropout the LoRA term joins the reduction as r more terms (LoRA folded into K): x rows get
  // s [m, :] after their n_in values, the panel r more rows scale·lw[o, :], and the micro-kernel does
  // the rest (a separate term per output row cost half as much as the K = 128 product itself). With
  // dropout the term is masked per output element, so it stays in the epilogue.
  const bool fold = p.rank > 0 && !p.dropout.enabled();
  const int64_t n_fold = fold ? p.rank : 0;
  const int64_t ldx = ((n_in + n_fold + 15) / 16) * 16 + 16;
  const int64_t block_rows = std::clamp<int64_t>(kX32Bytes / (4 * ldx), kMBMin, kMBMax);
  const int64_t mb_max = std::min(block_rows, p.m);
  std::vector<float> x32(static_cast<size_t>(mb_max * ldx));
  const Epilogue ep(p);
  const bool parallel = worth_threads(p);
  const int64_t n_threads = parallel ? omp_get_max_threads() : 1;
  const int64_t mr_max = tile_rows();
  for (int64_t m0 = 0; m0 < p.m; m0 += block_rows) {
    const int64_t mb = std::min(block_rows, p.m - m0);
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t m = 0; m < mb; ++m) {
      load_row(p.a, p.a_dtype, (m0 + m) * p.a_row_stride, p.a_col_stride, n_in, x32.data() + m * ldx);
      if (fold)
        std::memcpy(x32.data() + m * ldx + n_in, static_cast<const float*>(p.lora_s) + (m0 + m) * p.lora_s_row_stride,
                    static_cast<size_t>(n_fold) * sizeof(float));
    }
    // Fewer panels than 4 per thread (small N, as in the demo's k/v projections: one panel) would leave
    // threads idle or unevenly loaded: the rows are then split into parts too, a task being (panel, part). Parts of
    // one panel re-decode it, unless one thread runs them back to back with the whole reduction in
    // one block (the scratch still holds it).
    const int64_t n_parts =
        std::clamp<int64_t>((4 * n_threads + n_panels - 1) / n_panels, 1, (mb + mr_max - 1) / mr_max);
    const int64_t part_rows = ((mb + n_parts - 1) / n_parts + mr_max - 1) / mr_max * mr_max;
    const int64_t n_tasks = n_panels * n_parts;
#pragma omp parallel if (parallel)
    {
      AlignedBuffer scratch(kKB * kPanel);
      std::vector<float> tmp(static_cast<size_t>(8 * kKB));
      AlignedBuffer c(mb * kPanel);
      std::vector<float> lw(static_cast<size_t>(std::max<int64_t>(p.rank, 1) * kPanel));
      AlignedBuffer lora_panel(n_fold * kPanel); // fold: micro-panels [r][16] of scale·lw
      int64_t in_scratch = -1; // the panel whose whole reduction the scratch holds (n_in <= kKB)
      const auto run_task = [&](int64_t task) {
        const int64_t panel = task / n_parts, r0 = (task % n_parts) * part_rows;
        const int64_t r1 = std::min(mb, r0 + part_rows);
        if (r0 >= r1)
          return;
        const int64_t o0 = panel * kPanel;
        const int64_t ow = std::min<int64_t>(kPanel, n_out - o0);
        const int n_micro = static_cast<int>((ow + kNR - 1) / kNR);
        for (int64_t i0 = 0; i0 < n_in; i0 += kKB) {
          const int64_t kb = std::min(kKB, n_in - i0);
          if (!(n_in <= kKB && in_scratch == panel))
            dequant_panel(p, o0, ow, i0, kb, scratch.ptr, tmp.data());
          in_scratch = n_in <= kKB ? panel : -1;
          for (int64_t mg = r0; mg < r1; mg += mr_max) {
            const int mr = static_cast<int>(std::min<int64_t>(mr_max, r1 - mg));
            for (int j = 0; j < n_micro; ++j)
              ukernel_rows(mr, x32.data() + mg * ldx + i0, ldx, scratch.ptr + j * kKB * kNR, kb,
                           c.ptr + mg * kPanel + j * kNR, kPanel, i0 > 0);
          }
        }
        if (p.rank > 0)
          ep.load_lora_panel(o0, ow, lw.data());
        if (fold) {
          const float scale = static_cast<float>(p.scale);
          for (int j = 0; j < n_micro; ++j)
            for (int64_t q = 0; q < n_fold; ++q)
              for (int cc = 0; cc < kNR; ++cc)
                lora_panel.ptr[(j * n_fold + q) * kNR + cc] = scale * lw[q * kPanel + j * kNR + cc];
          for (int64_t mg = r0; mg < r1; mg += mr_max) {
            const int mr = static_cast<int>(std::min<int64_t>(mr_max, r1 - mg));
            for (int j = 0; j < n_micro; ++j)
              ukernel_rows(mr, x32.data() + mg * ldx + n_in, ldx, lora_panel.ptr + j * n_fold * kNR, n_fold,
                           c.ptr + mg * kPanel + j * kNR, kPanel, true);
          }
        }
        for (int64_t m = r0; m < r1; ++m)
          ep.finish_row(m0 + m, o0, ow, c.ptr + m * kPanel, fold ? nullptr : lw.data());
      };
      if (n_parts > 1) { // contiguous task runs per thread: a panel's parts mostly on one thread
#pragma omp for schedule(static)
        for (int64_t task = 0; task < n_tasks; ++task)
          run_task(task);
      } else {
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < n_tasks; ++task)
          run_task(task);
      }
    }
  }
}

// ---- float64 path (gradcheck): plain loops, fp64 accumulation, W = exact fp32 products ----------
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

} // namespace

void select_cpu_kernels(CpuIsa max_isa) {
  g_isa = std::min(max_isa, cpu_isa_supported());
  g_use_avx2 = g_isa >= CpuIsa::kAvx2;
  set_nf4_isa(g_isa);
}

CpuIsa cpu_isa() { return g_isa; }

CpuIsa cpu_isa_supported() {
  static const CpuIsa supported = isa_of_this_cpu();
  return supported;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
  case CpuIsa::kAvx512: return "avx512";
  case CpuIsa::kAvx2: return "avx2";
  default: return "portable";
  }
}

void qlora_matmul(const QloraMatmulParams& p, CpuMatmulPath path) {
  if (p.m == 0)
    return;
  switch (path) {
  case CpuMatmulPath::kFloat64:
    return matmul_f64(p);
  case CpuMatmulPath::kRowDot:
  case CpuMatmulPath::kRowDotFused:
    return matmul_gemv(p, path);
  case CpuMatmulPath::kAxpy:
    return matmul_axpy_transposed(p);
  case CpuMatmulPath::kGemm:
    return matmul_gemm(p);
  case CpuMatmulPath::kSlabGemm: // runs in the binding layer (ATen's GEMM); never reaches the kernels
    return matmul_gemm(p);
  }
}

void nf4_decode_range(const Nf4Weight& w, DType value_dtype, int64_t e0, int64_t e1, float* dst) {
  if (e1 > e0)
    decode_segment(w, value_dtype, e0, e1 - e0, dst);
}

void nf4_decode_window(const Nf4Weight& w, DType value_dtype, int64_t row_len, int64_t r0, int64_t r1, int64_t c0,
                       int64_t c1, float* dst, int64_t ld) {
#pragma omp parallel for schedule(static)
  for (int64_t r = r0; r < r1; ++r) {
    if (r + kWindowPrefetchRows < r1)
      nf4_prefetch_run(w, (r + kWindowPrefetchRows) * row_len + c0, (r + kWindowPrefetchRows) * row_len + c1);
    nf4_decode_range(w, value_dtype, r * row_len + c0, r * row_len + c1, dst + (r - r0) * ld);
  }
}

void qlora_finish_tile(const QloraMatmulParams& p, int64_t m0, int64_t mb, int64_t o0, int64_t ow, float* acc,
                       int64_t ld) {
  const Epilogue ep(p);
  const int64_t n_panels = (ow + kPanel - 1) / kPanel;
#pragma omp parallel
  {
    std::vector<float> lw(static_cast<size_t>(std::max<int64_t>(p.rank, 1) * kPanel));
#pragma omp for schedule(static)
    for (int64_t panel = 0; panel < n_panels; ++panel) {
      const int64_t c0 = o0 + panel * kPanel;
      const int64_t cw = std::min<int64_t>(kPanel, o0 + ow - c0);
      if (p.rank > 0)
        ep.load_lora_panel(c0, cw, lw.data());
      for (int64_t m = 0; m < mb; ++m)
        ep.finish_row(m0 + m, c0, cw, acc + m * ld + (c0 - o0), lw.data());
    }
  }
}

void dropout_mask(const DropoutMaskParams& p) {
  const DropoutParams& d = p.dropout;
  const uint32_t key = dropout_key(d.seed);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < p.rows; ++i) {
    const uint64_t ctr0 = d.offset + static_cast<uint64_t>(i) * static_cast<uint64_t>(d.cols);
    for (int64_t j = 0; j < d.cols; ++j) {
      const uint64_t ctr = ctr0 + static_cast<uint64_t>(j);
      const uint32_t h =
          dropout_hash(key, dropout_hi_key(key, static_cast<uint32_t>(ctr >> 32)), static_cast<uint32_t>(ctr));
      p.out[i * d.cols + j] = (!d.enabled() || dropout_keep_hash(h, d.threshold)) ? 1 : 0;
    }
  }
}

} // namespace lora_ops::cpu
