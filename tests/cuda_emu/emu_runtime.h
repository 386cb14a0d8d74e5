// A tiny CPU emulation of the CUDA execution model, enough to RUN the NF4 kernels' source on a
// machine without a GPU: every CUDA thread of a CTA is a std::thread, __syncthreads is a CTA-wide
// std::barrier, warp shuffles / __syncwarp are per-warp barriers over a slot array, __shared__
// variables are function statics (CTAs run one after another). It checks indexing, tails,
// alignment paths, grid-stride loops and reductions; it cannot check device intrinsics (the host
// fallbacks of LORA_FMUL_RN etc. run instead), timing, or the real memory model.
// Include this BEFORE the kernel sources, in ONE translation unit (it defines the runtime calls);
// tests/test_nf4_cuda_emulated.py builds it.
#pragma once
#define __shared__ static
#define __launch_bounds__(...)
#include <cuda_runtime_api.h>
#include <vector_functions.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace lora_emu {

struct Warp {
  std::barrier<> bar{32};
  uint64_t slots[32];
};
struct Cta {
  explicit Cta(int threads) : bar(threads), warps(threads / 32) {}
  std::barrier<> bar;
  std::vector<Warp> warps;
};
inline thread_local Cta* t_cta = nullptr;

inline int lane() { return threadIdx.x % 32; }
inline Warp& warp() { return t_cta->warps[threadIdx.x / 32]; }

template <typename T>
T shfl(T v, int src) {
  static_assert(sizeof(T) <= 8);
  Warp& w = warp();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slots[lane()] = bits;
  w.bar.arrive_and_wait();
  const uint64_t got = w.slots[src & 31];
  w.bar.arrive_and_wait();
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}

// One std::thread per CUDA thread of a CTA, created once and reused by every launch (creating
// threads per launch dominated the run time).
class Pool {
 public:
  static Pool& get(int n) {
    static Pool pool(n);
    return pool;
  }
  void run(const std::function<void(int)>& job) {
    job_ = &job;
    start_.arrive_and_wait();
    done_.arrive_and_wait();
  }

 private:
  explicit Pool(int n) : start_(n + 1), done_(n + 1) {
    for (int t = 0; t < n; ++t)
      std::thread([this, t] {
        for (;;) {
          start_.arrive_and_wait();
          (*job_)(t);
          done_.arrive_and_wait();
        }
      }).detach();
  }
  std::barrier<> start_, done_;
  const std::function<void(int)>* job_ = nullptr;
};

// Runs kernel(args...) over the grid: CTAs in sequence, each on the pool's blockDim threads.
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  template <typename... A>
  void operator()(A&&... args) const {
    for (unsigned b = 0; b < grid.x; ++b) {
      Cta cta(static_cast<int>(block.x));
      const std::function<void(int)> job = [&](int t) {
        threadIdx = make_uint3(t, 0, 0);
        blockIdx = make_uint3(b, 0, 0);
        blockDim = block;
        gridDim = grid;
        t_cta = &cta;
        kernel(args...);
      };
      Pool::get(static_cast<int>(block.x)).run(job);
    }
  }
};
template <typename... P>
Launch<P...> make_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t = 0, cudaStream_t = nullptr) {
  return Launch<P...>{kernel, grid, block};
}

inline int g_sms = 1;  // a 1-SM "device" with 2 resident CTAs: persistent grids of 2, so grid-stride loops run

}  // namespace lora_emu

inline void __syncthreads() { lora_emu::t_cta->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { lora_emu::warp().bar.arrive_and_wait(); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) { return lora_emu::shfl(v, lora_emu::lane() ^ mask); }
template <typename T>
T __shfl_sync(unsigned, T v, int src) { return lora_emu::shfl(v, src); }
template <typename T>
T __ldg(const T* p) { return *p; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
using std::isnan;  // nvcc declares isnan in the global namespace for device code
inline uint32_t max(uint32_t a, uint32_t b) { return a > b ? a : b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// The runtime calls the launchers make (no device: fixed answers for a 2-SM "GPU").
cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = lora_emu::g_sms; return cudaSuccess; }
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, size_t) { *n = 2; return cudaSuccess; }
cudaError_t cudaGetLastError() { return cudaSuccess; }
