// The CPU kd_loss kernel split over translation units: kd_loss_forward_cpu (kd_loss_cpu.cpp)
// checks a call and allocates its outputs, and kd_loss_part<k> (kd_loss_cpu_part<k>.cpp, each an
// instantiation of kd_loss_cpu_kernel.h) runs the divergences whose id is k modulo kKdLossParts,
// so that the build compiles the parts in parallel.
#pragma once

#include "../divergences.h"
#include "../kd_loss.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace kdkernels {
namespace cpu {

constexpr int kKdLossParts = 4;

// The checked arguments of one kd_loss_forward_cpu or kd_loss_shard_cpu call, with its outputs
// allocated (a gradient that is not wanted is empty); soft_weight and hard_weight include the
// row weight.
struct KDLossCall {
  at::Tensor student, teacher, target;  // target undefined without one
  at::Tensor loss, grad_student, grad_teacher, status;
  double temperature, softcap;
  bool standardize;
  double soft_weight, hard_weight;
  Divergence divergence;
  std::vector<double> divergence_args;
  int64_t ignore_index;
  int shard_stage = -1;  // a ShardStage (csrc/kd_loss.h), -1 for whole rows; loss is then its output
  at::Tensor norms, sums;  // the shard stages' inputs, undefined where not used
};

template <int kPart>
bool kd_loss_part(const KDLossCall& call);

}  // namespace cpu
}  // namespace kdkernels
