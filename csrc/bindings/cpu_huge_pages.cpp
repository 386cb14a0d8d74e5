#include "bindings/cpu_huge_pages.h"

#include <cstdlib>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace lora_ops {

at::Tensor empty_cpu_output(at::IntArrayRef shape, const at::TensorOptions& options) {
#ifdef __linux__
  int64_t numel = 1;
  for (const int64_t s : shape)
    numel *= s;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (bytes >= kHugePageOutputBytes) {
    constexpr size_t kHuge = 2 << 20;
    const size_t size = (static_cast<size_t>(bytes) + kHuge - 1) / kHuge * kHuge;
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHuge, size) == 0) {
      madvise(ptr, size, MADV_HUGEPAGE); // advice only: on failure the pages are ordinary ones
      return at::from_blob(ptr, shape, [](void* p) { std::free(p); }, options);
    }
  }
#endif
  return at::empty(shape, options);
}

} // namespace lora_ops
