// CPU feature kernels (csrc/feature.h): channel pooling of |x|^p and its gradient, one thread per
// block of samples or rows, vectorised along the spatial axis; the squared error and its gradient
// in one pass, summed per fixed chunk (so the result does not depend on the thread count).
#include "../feature.h"
#include "cpu_common.h"
#include "cpu_outputs.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace kdkernels {
namespace {

// |x|^p, with the common p = 2 and p = 1 spelled out so that they vectorise.
template <typename acc_t>
KD_INLINE acc_t power(acc_t x, acc_t p) {
  if (p == acc_t(2)) return x * x;
  const acc_t magnitude = std::abs(x);
  if (p == acc_t(1)) return magnitude;
  return magnitude == acc_t(0) ? acc_t(0) : std::pow(magnitude, p);
}

// p |x|^(p - 1) sign(x), 0 at x = 0.
template <typename acc_t>
KD_INLINE acc_t power_slope(acc_t x, acc_t p) {
  if (p == acc_t(2)) return 2 * x;
  const acc_t sign = x > 0 ? acc_t(1) : (x < 0 ? acc_t(-1) : acc_t(0));
  if (p == acc_t(1)) return sign;
  return x == acc_t(0) ? acc_t(0) : p * std::pow(std::abs(x), p - 1) * sign;
}

template <typename scalar_t>
KD_CPU_CLONES void pool_samples(const scalar_t* x, int64_t channels, int64_t size, int64_t stride_n,
                                int64_t stride_c, at::opmath_type<scalar_t> p, at::opmath_type<scalar_t>* out,
                                int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_channels = acc_t(1) / static_cast<acc_t>(channels);
  for (int64_t n = begin; n < end; ++n) {
    acc_t* row = out + n * size;
    std::fill(row, row + size, acc_t(0));
    for (int64_t c = 0; c < channels; ++c) {
      const scalar_t* in = x + n * stride_n + c * stride_c;
#pragma omp simd
      for (int64_t s = 0; s < size; ++s) row[s] += power(static_cast<acc_t>(in[s]), p);
    }
#pragma omp simd
    for (int64_t s = 0; s < size; ++s) row[s] *= inv_channels;
  }
}

template <typename scalar_t>
KD_CPU_CLONES void grad_rows(const scalar_t* x, const at::opmath_type<scalar_t>* grad_map, int64_t channels,
                             int64_t size, int64_t stride_n, int64_t stride_c, at::opmath_type<scalar_t> p,
                             scalar_t* out, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_channels = acc_t(1) / static_cast<acc_t>(channels);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / channels, c = row % channels;
    const scalar_t* in = x + n * stride_n + c * stride_c;
    const acc_t* g = grad_map + n * size;
    scalar_t* o = out + row * size;
#pragma omp simd
    for (int64_t s = 0; s < size; ++s) {
      o[s] = static_cast<scalar_t>(g[s] * inv_channels * power_slope(static_cast<acc_t>(in[s]), p));
    }
  }
}

constexpr int64_t kErrorChunk = 16384;
// Below this many chunks (256k elements) one thread is faster than waking the pool.
constexpr int64_t kSerialChunks = 16;

template <typename scalar_t>
KD_CPU_CLONES void error_chunks(const scalar_t* s, const scalar_t* t, int64_t numel, at::opmath_type<scalar_t> scale,
                                scalar_t* grad, at::opmath_type<scalar_t>* partial, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    const int64_t first = chunk * kErrorChunk, last = std::min(numel, first + kErrorChunk);
    acc_t sum = 0;
    if (grad != nullptr) {
#pragma omp simd reduction(+ : sum)
      for (int64_t i = first; i < last; ++i) {
        const acc_t d = static_cast<acc_t>(s[i]) - static_cast<acc_t>(t[i]);
        sum += d * d;
        grad[i] = static_cast<scalar_t>(scale * d);
      }
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t i = first; i < last; ++i) {
        const acc_t d = static_cast<acc_t>(s[i]) - static_cast<acc_t>(t[i]);
        sum += d * d;
      }
    }
    partial[chunk] = sum;
  }
}

void check_features(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1, op,
              ": [N, C, S] CPU features with unit stride along S expected");
}

at::ScalarType accumulation(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

at::Tensor attention_pool_cpu(const at::Tensor& x, double p) {
  check_features("attention_pool_cpu", x);
  const int64_t samples = x.size(0), channels = x.size(1), size = x.size(2);
  at::Tensor out = at::empty({samples, size}, x.options().dtype(accumulation(x)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "attention_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, samples, 1, [&](int64_t begin, int64_t end) {
      pool_samples(x.data_ptr<scalar_t>(), channels, size, x.stride(0), x.stride(1), static_cast<acc_t>(p),
                   out.data_ptr<acc_t>(), begin, end);
    });
  });
  return out;
}

at::Tensor attention_grad_cpu(const at::Tensor& x, const at::Tensor& grad_map, double p) {
  check_features("attention_grad_cpu", x);
  const int64_t samples = x.size(0), channels = x.size(1), size = x.size(2);
  const at::Tensor g = grad_map.to(accumulation(x)).contiguous();
  TORCH_CHECK(g.dim() == 2 && g.size(0) == samples && g.size(1) == size,
              "attention_grad_cpu: grad_map [N, S] expected");
  at::Tensor out = at::empty({samples, channels, size}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "attention_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, samples * channels, 1, [&](int64_t begin, int64_t end) {
      grad_rows(x.data_ptr<scalar_t>(), g.data_ptr<acc_t>(), channels, size, x.stride(0), x.stride(1),
                static_cast<acc_t>(p), out.data_ptr<scalar_t>(), begin, end);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> squared_error_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                     double scale, bool grad) {
  TORCH_CHECK(student.device().is_cpu() && student.sizes() == teacher.sizes() && student.is_contiguous() &&
                  teacher.is_contiguous() && student.scalar_type() == teacher.scalar_type(),
              "squared_error_cpu: contiguous CPU tensors of one shape and dtype expected");
  const int64_t numel = student.numel(), chunks = (numel + kErrorChunk - 1) / kErrorChunk;
  at::Tensor partial = at::zeros({std::max<int64_t>(chunks, 1)}, student.options().dtype(accumulation(student)));
  at::Tensor gradient =
      grad ? cpu::empty_output(student.sizes(), student.options()) : at::empty({0}, student.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "squared_error_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, chunks, kSerialChunks, [&](int64_t begin, int64_t end) {
      error_chunks(student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), numel, static_cast<acc_t>(scale),
                   grad ? gradient.data_ptr<scalar_t>() : nullptr, partial.data_ptr<acc_t>(), begin, end);
    });
  });
  return {partial.sum(), gradient};
}

}  // namespace kdkernels
