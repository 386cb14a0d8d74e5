// A single-OS-thread CPU emulation of the CUDA execution model, used to RUN the fused QLoRA kernels'
// source (qlora_*.cu, lora_small.cu) where no GPU exists. Every CUDA thread of a CTA is a fiber
// (ucontext) with its own stack; fibers switch only at __syncthreads, __syncwarp and warp-collective
// operations (shuffles, ldmatrix, mma.sync), so a CTA of 256 threads costs one core and no OS
// scheduling. __shared__ variables are function statics (CTAs run one after another), dynamic shared
// memory is a per-launch arena, and the kernels' inline PTX is routed (tests/test_qlora_cuda_emulated.py
// rewrites every `asm volatile(...)` into a ::lora_emu::ptx(...) call) to emulations of:
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32  (PTX ISA fragment layouts)
//   ldmatrix.sync.aligned.m8n8.x4{,.trans}.shared.b16
//   cp.async.cg.shared.global (16 bytes, src-size 0 / 16), commit_group, wait_group
// cp.async copies are DEFERRED until the wait_group that guarantees them (or flagged if never waited),
// so a read of a ring slot before its wait shows up as wrong output.
//
// Checks it makes by itself (abort with a message): a barrier that can never complete (divergent
// __syncthreads, early exit), warp collectives reached by lanes at different instructions, shared
// addresses outside the dynamic arena, copies still pending at thread exit. Schedule policies
// (round-robin: warps in lockstep; priority forward / reverse / shuffled: one warp runs ahead to its
// next __syncthreads before the others move) change the interleaving between barriers, so a missing
// barrier or a shared-memory race changes the result under some policy (the test runs several).
// Not emulated: timing, the real memory model, device math intrinsics (host versions run).
#pragma once
#define __shared__ static
#define __launch_bounds__(...)
#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <random>
#include <vector>

// The running fiber's built-in variables (set by the scheduler before every resume).
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace lora_emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "EMULATION ERROR: %s (block %u,%u,%u thread %u)\n", what, blockIdx.x, blockIdx.y, blockIdx.z,
               threadIdx.x);
  std::fflush(stderr);
  std::abort();
}

struct Barrier {
  int expected = 0, count = 0;
  uint32_t gen = 0;
  std::vector<int> waiters;
};

struct PendingCopy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes;  // bytes read from src; the rest of the 16 are zero-filled
};

struct Fiber {
  ucontext_t ctx;
  bool done = false, blocked = false;
  std::vector<std::vector<PendingCopy>> groups;  // committed cp.async groups, oldest first
  std::vector<PendingCopy> open;                 // issued, not yet committed
};

// Warp-collective exchange slots: double-buffered by barrier generation, so one barrier per collective.
struct WarpSlots {
  Barrier bar;
  uint64_t v[2][32][8];
  int op[2][32];
};

enum SchedulePolicy { kRoundRobin = 0, kPriorityForward = 1, kPriorityReverse = 2, kPriorityShuffled = 3, kRoundRobinShuffled = 4 };
inline int g_policy = kRoundRobin;
inline std::mt19937 g_sched_rng(7);
inline int g_sms = 2;                     // the emulated "device": SM count the launchers see
inline int g_smem_optin = 232448;         // its per-block shared memory limit (opt-in): 227 KB as sm_90; sm_86 99 KB
inline long long g_ctas = 0, g_switches = 0;  // statistics

struct Cta {
  int n = 0;
  std::vector<Fiber> fibers;
  Barrier bar;
  std::vector<WarpSlots> warps;
  ucontext_t main_ctx;
  int cur = -1;
  const std::function<void()>* job = nullptr;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
};
inline Cta* g_cta = nullptr;

inline std::vector<char*>& stacks() {
  static std::vector<char*> s;
  return s;
}
constexpr size_t kStackBytes = 256 * 1024;

inline void yield_blocked() {
  Cta& c = *g_cta;
  const int me = c.cur;
  c.fibers[me].blocked = true;
  swapcontext(&c.fibers[me].ctx, &c.main_ctx);
}

inline void arrive(Barrier& b) {
  if (++b.count == b.expected) {
    b.count = 0;
    ++b.gen;
    for (int w : b.waiters) g_cta->fibers[w].blocked = false;
    b.waiters.clear();
    return;
  }
  b.waiters.push_back(g_cta->cur);
  yield_blocked();
}

inline int lane() { return static_cast<int>(threadIdx.x % 32); }
inline WarpSlots& warp() { return g_cta->warps[threadIdx.x / 32]; }

// Posts this lane's values, waits for the whole warp, returns the buffer holding every lane's values.
inline uint64_t (*exchange(int op, std::initializer_list<uint64_t> vals))[8] {
  WarpSlots& w = warp();
  const int buf = static_cast<int>(w.bar.gen & 1);
  int i = 0;
  for (uint64_t v : vals) w.v[buf][lane()][i++] = v;
  w.op[buf][lane()] = op;
  arrive(w.bar);
  for (int l = 0; l < 32; ++l)
    if (w.op[buf][l] != op) fail("lanes of a warp reached different warp-collective operations");
  return w.v[buf];
}

template <typename T>
T shfl(T v, int src) {
  static_assert(sizeof(T) <= 8);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  uint64_t(*all)[8] = exchange(1, {bits});
  T r;
  std::memcpy(&r, &all[src & 31][0], sizeof(T));
  return r;
}

inline void fiber_entry(int idx) {
  Cta& c = *g_cta;
  (*c.job)();
  Fiber& f = c.fibers[idx];
  if (!f.open.empty() || !f.groups.empty()) fail("thread exited with cp.async copies never waited for");
  f.done = true;
}

// Runs the whole CTA `b` of a launch: every fiber to completion, in the current schedule policy.
inline void run_cta(uint3 b, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& job) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (block.y != 1 || block.z != 1 || n % 32 != 0) fail("emulation supports 1-D blocks of whole warps");
  Cta c;
  c.n = n;
  c.fibers.resize(n);
  c.bar.expected = n;
  c.warps.resize(n / 32);
  for (auto& w : c.warps) w.bar.expected = 32;
  std::vector<unsigned char> smem(smem_bytes + 256, 0xCD);  // poisoned: reads of unwritten smem show
  c.smem = smem.data() + ((128 - reinterpret_cast<uintptr_t>(smem.data()) % 128) % 128);
  c.smem_bytes = smem_bytes;
  c.job = &job;
  g_cta = &c;
  auto& st = stacks();
  while (static_cast<int>(st.size()) < n) st.push_back(static_cast<char*>(std::malloc(kStackBytes)));
  for (int t = 0; t < n; ++t) {
    Fiber& f = c.fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = st[t];
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &c.main_ctx;
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_entry), 1, t);
  }
  blockIdx = b;
  gridDim = grid;
  blockDim = block;
  // Round-robin policies resume every runnable fiber once per pass (warps advance in lockstep);
  // priority policies always resume the FIRST runnable fiber of the order, so one warp runs ahead
  // from barrier to barrier while the others wait (exposes missing __syncthreads between warps).
  std::vector<int> order(n);
  for (int t = 0; t < n; ++t) order[t] = (g_policy == kPriorityReverse) ? n - 1 - t : t;
  if (g_policy == kPriorityShuffled) std::shuffle(order.begin(), order.end(), g_sched_rng);
  const bool priority = g_policy != kRoundRobin && g_policy != kRoundRobinShuffled;
  int alive = n;
  while (alive > 0) {
    if (g_policy == kRoundRobinShuffled) std::shuffle(order.begin(), order.end(), g_sched_rng);
    bool progressed = false;
    for (int t : order) {
      Fiber& f = c.fibers[t];
      if (f.done || f.blocked) continue;
      c.cur = t;
      threadIdx = make_uint3(t, 0, 0);
      blockIdx = b;
      ++g_switches;
      swapcontext(&c.main_ctx, &f.ctx);
      progressed = true;
      if (f.done) --alive;
      if (priority) break;
    }
    if (!progressed && alive > 0) {
      threadIdx = make_uint3(c.bar.waiters.empty() ? 0 : c.bar.waiters[0], 0, 0);
      fail("deadlock: a barrier can never complete (divergent __syncthreads / warp op, or early exit)");
    }
  }
  g_cta = nullptr;
  ++g_ctas;
}

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          const std::function<void()> job = [&] { kernel(args...); };
          run_cta(make_uint3(x, y, z), grid, block, smem, job);
        }
  }
};
template <typename... P>
Launch<P...> make_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launch<P...>{kernel, grid, block, smem};
}

inline unsigned char* dynamic_smem() { return g_cta->smem; }
inline unsigned char* smem_at(uint32_t addr, uint32_t bytes) {
  if (static_cast<size_t>(addr) + bytes > g_cta->smem_bytes) fail("shared address outside the dynamic arena");
  return g_cta->smem + addr;
}

// ---- inline PTX ------------------------------------------------------------------------------------
// One asm operand: outputs keep a pointer (written back), inputs their value as 64 bits.
struct Opnd {
  void* ptr = nullptr;
  uint64_t val = 0;
};
template <typename T>
Opnd Out(T& x) {
  Opnd o;
  o.ptr = &x;
  std::memcpy(&o.val, &x, sizeof(T) <= 8 ? sizeof(T) : 8);
  return o;
}
template <typename T>
Opnd In(const T& x) {
  Opnd o;
  if constexpr (std::is_pointer_v<T>) {
    o.val = reinterpret_cast<uint64_t>(x);
  } else if constexpr (std::is_floating_point_v<T>) {
    float f = static_cast<float>(x);
    std::memcpy(&o.val, &f, 4);
  } else {
    o.val = static_cast<uint64_t>(x);
  }
  return o;
}

inline float bits_f16(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}
inline float bits_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void complete_groups(Fiber& f, size_t keep) {
  while (f.groups.size() > keep) {
    for (const PendingCopy& c : f.groups.front()) {
      std::memset(c.dst, 0, 16);
      if (c.bytes > 0) std::memcpy(c.dst, c.src, c.bytes);
    }
    f.groups.erase(f.groups.begin());
  }
}

// ldmatrix .x4 .b16: lanes 8j..8j+7 address the 8 rows (16 bytes each) of matrix j; lane l receives in
// register j the pair (row l/4, cols 2(l%4), +1) -- with .trans the pair (rows 2(l%4), +1; col l/4).
inline void ldmatrix(uint32_t* r[4], uint32_t addr, bool trans) {
  uint64_t(*all)[8] = exchange(trans ? 3 : 2, {addr});
  const int l = lane();
  for (int j = 0; j < 4; ++j) {
    uint16_t e[2];
    for (int h = 0; h < 2; ++h) {
      const int row = trans ? 2 * (l % 4) + h : l / 4;
      const int col = trans ? l / 4 : 2 * (l % 4) + h;
      const uint32_t row_addr = static_cast<uint32_t>(all[8 * j + row][0]);
      if (row_addr % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
      std::memcpy(&e[h], smem_at(row_addr + 2 * col, 2), 2);
    }
    *r[j] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
}

// mma.sync m16n8k16 row.col, fp32 accumulate. Fragment layouts (PTX ISA "Matrix Fragments for
// mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A 16x16: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B 16x8 (k x n): b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C/D 16x8: c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
// Products are exact; the sum is taken in double and rounded once to fp32 (the hardware's internal
// order and rounding differ slightly; the checker's tolerance covers that).
inline void mma16816(float* d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], bool bf16) {
  uint64_t(*all)[8] = exchange(bf16 ? 5 : 4, {a[0], a[1], a[2], a[3], b[0], b[1]});
  auto elem = [&](uint64_t word, int half) {
    const uint16_t h = static_cast<uint16_t>(static_cast<uint32_t>(word) >> (16 * half));
    return bf16 ? bits_bf16(h) : bits_f16(h);
  };
  auto A = [&](int row, int k) {  // owner lane g = row % 8, t = (k % 8) / 2
    const int owner = (row % 8) * 4 + (k % 8) / 2;
    const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return elem(all[owner][reg], k % 2);
  };
  auto B = [&](int k, int n) {
    const int owner = n * 4 + (k % 8) / 2;
    return elem(all[owner][4 + (k >= 8 ? 1 : 0)], k % 2);
  };
  const int g = lane() / 4, t = lane() % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i % 2);
    double s = c[i];
    for (int k = 0; k < 16; ++k) s += static_cast<double>(A(row, k)) * static_cast<double>(B(k, col));
    *d[i] = static_cast<float>(s);
  }
}

inline std::vector<int> operand_indices(const char* tmpl) {
  std::vector<int> idx;
  for (const char* p = tmpl; *p; ++p)
    if (*p == '%' && p[1] >= '0' && p[1] <= '9') idx.push_back(static_cast<int>(std::strtol(p + 1, nullptr, 10)));
  return idx;
}

inline bool starts_with(const char* s, const char* prefix) { return std::strncmp(s, prefix, std::strlen(prefix)) == 0; }

// The inline asm statements of the kernels, routed here by the test's source rewrite.
inline void ptx(const char* tmpl, std::initializer_list<Opnd> list) {
  std::vector<Opnd> ops(list);
  const std::vector<int> ix = operand_indices(tmpl);
  auto u32 = [&](int i) { return static_cast<uint32_t>(ops[ix[i]].val); };
  while (*tmpl == ' ' || *tmpl == '\n' || *tmpl == '\t') ++tmpl;
  if (starts_with(tmpl, "mma.sync.aligned.m16n8k16.row.col.f32.")) {
    const bool bf = starts_with(tmpl, "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32");
    const bool hf = starts_with(tmpl, "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32");
    if ((!bf && !hf) || ix.size() != 14) fail("unsupported mma variant");
    float* d[4];
    float c[4];
    for (int i = 0; i < 4; ++i) {
      d[i] = static_cast<float*>(ops[ix[i]].ptr);
      const uint32_t cb = static_cast<uint32_t>(ops[ix[10 + i]].val);
      std::memcpy(&c[i], &cb, 4);
    }
    const uint32_t a[4] = {u32(4), u32(5), u32(6), u32(7)};
    const uint32_t b[2] = {u32(8), u32(9)};
    mma16816(d, a, b, c, bf);
  } else if (starts_with(tmpl, "ldmatrix.sync.aligned.m8n8.x4.")) {
    const bool trans = starts_with(tmpl, "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16");
    if ((!trans && !starts_with(tmpl, "ldmatrix.sync.aligned.m8n8.x4.shared.b16")) || ix.size() != 5)
      fail("unsupported ldmatrix variant");
    uint32_t* r[4];
    for (int i = 0; i < 4; ++i) r[i] = static_cast<uint32_t*>(ops[ix[i]].ptr);
    ldmatrix(r, u32(4), trans);
  } else if (starts_with(tmpl, "cp.async.cg.shared.global")) {
    if (ix.size() != 3 || std::strstr(tmpl, "], 16,") == nullptr) fail("unsupported cp.async form");
    const uint32_t dst = u32(0);
    const int src_size = static_cast<int>(u32(2));
    if (dst % 16 != 0) fail("cp.async destination not 16-byte aligned");
    if (src_size != 0 && src_size != 16) fail("cp.async src-size other than 0 / 16");
    const auto* src = reinterpret_cast<const unsigned char*>(ops[ix[1]].val);
    if (src_size > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async source not 16-byte aligned");
    g_cta->fibers[g_cta->cur].open.push_back({smem_at(dst, 16), src, src_size});
  } else if (starts_with(tmpl, "cp.async.commit_group")) {
    Fiber& f = g_cta->fibers[g_cta->cur];
    f.groups.push_back(std::move(f.open));
    f.open.clear();
  } else if (starts_with(tmpl, "cp.async.wait_group")) {
    complete_groups(g_cta->fibers[g_cta->cur], static_cast<size_t>(u32(0)));
  } else if (starts_with(tmpl, "cp.async.wait_all")) {
    Fiber& f = g_cta->fibers[g_cta->cur];
    f.groups.push_back(std::move(f.open));
    f.open.clear();
    complete_groups(f, 0);
  } else {
    std::fprintf(stderr, "unemulated PTX: %s\n", tmpl);
    fail("unemulated inline PTX");
  }
}

}  // namespace lora_emu

inline void __syncthreads() { lora_emu::arrive(lora_emu::g_cta->bar); }
inline void __syncwarp(unsigned = 0xffffffffu) { lora_emu::exchange(6, {0}); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) { return lora_emu::shfl(v, lora_emu::lane() ^ mask); }
template <typename T>
T __shfl_sync(unsigned, T v, int src) { return lora_emu::shfl(v, src); }
template <typename T>
T __ldg(const T* p) { return *p; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
using std::isnan;
inline uint32_t max(uint32_t a, uint32_t b) { return a > b ? a : b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline size_t __cvta_generic_to_shared(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < lora_emu::g_cta->smem || c >= lora_emu::g_cta->smem + lora_emu::g_cta->smem_bytes)
    lora_emu::fail("__cvta_generic_to_shared of a pointer outside the dynamic shared arena");
  return static_cast<size_t>(c - lora_emu::g_cta->smem);
}

// The runtime calls the launchers make.
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  *v = attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? lora_emu::g_smem_optin : lora_emu::g_sms;
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, size_t) { *n = 2; return cudaSuccess; }
// As the driver: a dynamic shared memory size over the device's opt-in limit is refused (static shared
// memory is not modelled, so the launchers must leave room for theirs themselves).
template <typename K>
cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute attr, int v) {
  return attr == cudaFuncAttributeMaxDynamicSharedMemorySize && v > lora_emu::g_smem_optin ? cudaErrorInvalidValue
                                                                                             : cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
