// Host models of the PTX helpers of csrc/kernels/cuda/qlora_mma.cu, for the CPU emulation only
// (included INSIDE that file's namespace when LORA_OPS_CUDA_EMULATION is defined). They follow the
// PTX ISA's per-lane layouts: ldmatrix.m8n8.x4 (lane l gives the row address of matrix l / 8; lane l
// receives, of matrix j, row l / 4, columns 2(l % 4), +1; .trans: the transposed element pairs) and
// mma.m16n8k16.row.col (A: a0 (g, 2t..), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..); B: b0
// (k = 2t.., n = g), b1 (k = 2t+8.., n = g); C/D: c0,c1 (g, 2t..), c2,c3 (g+8, 2t..); g = lane / 4,
// t = lane % 4). cp.async copies synchronously (a stricter ordering than the hardware's).
using SmemAddr = uintptr_t;

inline SmemAddr smem_u32(const void* p) { return reinterpret_cast<uintptr_t>(p); }

inline void cp_async16(SmemAddr dst, const void* src, bool valid) {
  if (valid) std::memcpy(reinterpret_cast<void*>(dst), src, 16);
  else std::memset(reinterpret_cast<void*>(dst), 0, 16);
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

// Every lane's 64-bit value, in lane order (two warp barriers).
inline void emu_allgather(uint64_t v, uint64_t (&out)[32]) {
  lora_emu::Warp& w = lora_emu::warp();
  w.slots[lora_emu::lane()] = v;
  w.bar.arrive_and_wait();
  for (int i = 0; i < 32; ++i) out[i] = w.slots[i];
  w.bar.arrive_and_wait();
}

inline void ldmatrix_x4(uint32_t (&r)[4], SmemAddr addr) {
  uint64_t all[32];
  emu_allgather(addr, all);
  const int l = lora_emu::lane();
  for (int j = 0; j < 4; ++j) std::memcpy(&r[j], reinterpret_cast<const char*>(all[j * 8 + l / 4]) + (l % 4) * 4, 4);
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], SmemAddr addr) {
  uint64_t all[32];
  emu_allgather(addr, all);
  const int l = lora_emu::lane(), g = l / 4, t = l % 4;
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    std::memcpy(&lo, reinterpret_cast<const char*>(all[j * 8 + 2 * t]) + g * 2, 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(all[j * 8 + 2 * t + 1]) + g * 2, 2);
    r[j] = lo | (static_cast<uint32_t>(hi) << 16);
  }
}

inline float emu_widen(uint16_t h, __half) { return __half2float(__ushort_as_half(h)); }
inline float emu_widen(uint16_t h, __nv_bfloat16) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }

template <typename T>
inline void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, T) {
  uint64_t a01[32], a23[32], bb[32];
  emu_allgather(a[0] | (static_cast<uint64_t>(a[1]) << 32), a01);
  emu_allgather(a[2] | (static_cast<uint64_t>(a[3]) << 32), a23);
  emu_allgather(b0 | (static_cast<uint64_t>(b1) << 32), bb);
  auto reg = [](const uint64_t* lo2, const uint64_t* hi2, int r, int lane) -> uint32_t {
    const uint64_t v = (r < 2 ? lo2 : hi2)[lane];
    return static_cast<uint32_t>(r % 2 == 0 ? v : v >> 32);
  };
  auto elem_a = [&](int row, int k) {
    const int r = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    const uint32_t w = reg(a01, a23, r, (row % 8) * 4 + (k % 8) / 2);
    return emu_widen(static_cast<uint16_t>(w >> (16 * (k % 2))), T{});
  };
  auto elem_b = [&](int k, int n) {
    const uint64_t v = bb[n * 4 + (k % 8) / 2];
    const uint32_t w = static_cast<uint32_t>(k >= 8 ? v >> 32 : v);
    return emu_widen(static_cast<uint16_t>(w >> (16 * (k % 2))), T{});
  };
  const int l = lora_emu::lane(), g = l / 4, t = l % 4;
  for (int c = 0; c < 4; ++c) {
    const int row = g + (c >> 1) * 8, col = 2 * t + (c & 1);
    float acc = d[c];
    for (int k = 0; k < 16; ++k) acc = std::fma(elem_a(row, k), elem_b(k, col), acc);
    d[c] = acc;
  }
}
