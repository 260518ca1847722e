// CUDA entry point of kd_loss: argument checks as in the CPU entry point, outputs, dtype and
// divergence dispatch, and the launch configuration of the kernels in kd_loss_kernels.cuh.
#include "../kd_loss.h"
#include "kd_loss_kernels.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <cstdint>
#include <vector>

namespace kdkernels {
namespace {

using cuda_kernels::KernelArgs;

// The CUDA type of an ATen scalar type.
template <typename T>
struct CudaScalar {
  using type = T;
};
template <>
struct CudaScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct CudaScalar<at::Half> {
  using type = __half;
};

struct RowLayout {
  const void* data;
  int64_t row_stride;  // elements
};

// Whether every row of every tensor starts at the same element offset modulo `width`, as the
// vectorised kernel requires (the offset may be nonzero: the kernel handles the unaligned head).
bool equally_aligned(const std::vector<RowLayout>& tensors, int64_t rows, size_t elem_size, int width) {
  const auto offset = [&](const RowLayout& t) { return reinterpret_cast<uintptr_t>(t.data) / elem_size % width; };
  for (const RowLayout& t : tensors) {
    if (offset(t) != offset(tensors[0])) return false;
    if (rows > 1 && (t.row_stride - tensors[0].row_stride) % width != 0) return false;
  }
  return true;
}

// Threads per row: from 4 warps up to max_threads, at least about 4 packs per thread.
int threads_for(int64_t packs, int max_threads) {
  int threads = 4 * cuda_kernels::kWarpSize;
  while (threads < max_threads && int64_t{threads} * 4 < packs) threads *= 2;
  return threads;
}

// Launches one CTA per row. The rows are kept in shared memory when they are read more than
// once (gradients, or read 2) and fit the opt-in shared-memory limit of a block.
template <typename Div, int kVec, typename scalar_t, typename acc_t>
void launch(KernelArgs<scalar_t, acc_t> args, int64_t rows, bool need_soft, cudaStream_t stream) {
  const auto kernel = cuda_kernels::kd_loss_rows_kernel<Div, kVec, scalar_t, acc_t>;
  static const size_t static_smem = [&] {
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    return attributes.sharedSizeBytes;
  }();
  int device = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));

  const bool reread = args.grad_student || args.grad_teacher || (need_soft && !Div::kSumsFromStats);
  const size_t cache_bytes =
      static_cast<size_t>(cuda_kernels::cache_elems(args.vocab, kVec)) * sizeof(scalar_t) * (need_soft ? 2 : 1);
  args.cache_rows = reread && static_smem + cache_bytes <= static_cast<size_t>(smem_optin);
  const size_t smem = args.cache_rows ? cache_bytes : 0;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const int threads = threads_for((int64_t{args.vocab} + kVec - 1) / kVec, cuda_kernels::kMaxThreads<acc_t>);
  kernel<<<static_cast<unsigned int>(rows), threads, smem, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

KDLossOutputs kd_loss_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                   const std::optional<at::Tensor>& target,
                                   const std::optional<at::Tensor>& row_weight, double temperature, double softcap,
                                   bool standardize, double soft_weight, double hard_weight, int64_t divergence,
                                   const std::vector<double>& divergence_args, int64_t ignore_index, bool student_grad,
                                   bool teacher_grad) {
  const at::Tensor target_rows =
      check_kd_loss_inputs("kd_loss_forward_cuda", student, teacher, target, row_weight, temperature);
  TORCH_CHECK(student.is_cuda(), "kd_loss_forward_cuda: CUDA tensors expected");
  TORCH_CHECK_VALUE(softcap == 0 && !standardize,
                    "kd_loss_forward_cuda: softcap and standardize run on the triton and cpu backends");
  TORCH_CHECK_VALUE(divergence != static_cast<int64_t>(Divergence::kAdaptiveKL),
                    "kd_loss_forward_cuda: adaptive KL runs on the triton and cpu backends");
  const int64_t rows = student.size(0), vocab = student.size(1);
  TORCH_CHECK(vocab <= INT_MAX - 64, "kd_loss_forward_cuda: V must be below 2^31 - 64");
  TORCH_CHECK(rows <= INT_MAX, "kd_loss_forward_cuda: N must be below 2^31");
  // The kernel reads the weight as fp32 on the device.
  const at::Tensor weight = row_weight.has_value() ? row_weight->to(at::kFloat).contiguous() : at::Tensor();
  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({rows}, student.options().dtype(acc_dtype));
  at::Tensor grad_student = at::empty({student_grad ? rows : 0, vocab}, student.options());
  at::Tensor grad_teacher = at::empty({teacher_grad ? rows : 0, vocab}, student.options());
  at::Tensor status = at::empty({rows}, student.options().dtype(at::kChar));
  const auto kind = static_cast<Divergence>(divergence);
  const bool need_soft = soft_weight != 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "kd_loss_forward_cuda", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    using acc_t = at::opmath_type<scalar_t>;
    const KernelArgs<cuda_t, acc_t> args{
        reinterpret_cast<const cuda_t*>(student.data_ptr<scalar_t>()),
        reinterpret_cast<const cuda_t*>(teacher.data_ptr<scalar_t>()), student.stride(0), teacher.stride(0),
        target.has_value() ? target_rows.data_ptr<int64_t>() : nullptr, loss.data_ptr<acc_t>(),
        student_grad ? reinterpret_cast<cuda_t*>(grad_student.data_ptr<scalar_t>()) : nullptr,
        teacher_grad ? reinterpret_cast<cuda_t*>(grad_teacher.data_ptr<scalar_t>()) : nullptr,
        status.data_ptr<int8_t>(), weight.defined() ? weight.data_ptr<float>() : nullptr,
        static_cast<int>(vocab), ignore_index, static_cast<acc_t>(1.0 / temperature),
        static_cast<acc_t>(soft_weight), static_cast<acc_t>(hard_weight), temperature == 1.0,
        /*cache_rows=*/false, make_divergence_params<acc_t>(kind, divergence_args)};
    // The tensors whose rows the kernel accesses in packs.
    std::vector<RowLayout> layouts{{args.student, args.student_stride}};
    if (need_soft) layouts.push_back({args.teacher, args.teacher_stride});
    if (student_grad) layouts.push_back({args.grad_student, vocab});
    if (teacher_grad) layouts.push_back({args.grad_teacher, vocab});
    constexpr int kVec = cuda_kernels::kVectorWidth<cuda_t>;
    const bool vectorised = equally_aligned(layouts, rows, sizeof(cuda_t), kVec);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const bool known = dispatch_divergence(kind, [&](auto div) {
      using Div = decltype(div);
      if (rows == 0) return;
      if (vectorised) {
        launch<Div, kVec>(args, rows, need_soft, stream);
      } else {
        launch<Div, 1>(args, rows, need_soft, stream);
      }
    });
    TORCH_CHECK_VALUE(known, "kd_loss_forward_cuda: unknown divergence id ", divergence);
  });

  return {loss, grad_student, grad_teacher, status};
}

}  // namespace kdkernels
