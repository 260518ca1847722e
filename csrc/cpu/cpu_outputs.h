// Allocation of the CPU kernels' large outputs (the [N, V] gradients).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kdkernels {
namespace cpu {

// at::empty, with the 2 MiB-aligned interior of the allocation (if any) advised to transparent huge
// pages on Linux. A large output is a fresh mapping, first touched by the kernel that writes it: in
// 4 KiB pages those faults cost about as much as the kernel's own work at 512 x 32000 fp32, in
// 2 MiB pages a seventh of that. Where the system has no transparent huge pages the advice is
// ignored.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(1) << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1), last = (begin + out.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return out;
}

}  // namespace cpu
}  // namespace kdkernels
