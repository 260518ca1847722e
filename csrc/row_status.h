// Per-row outcome of a kd_loss kernel; kdkernels/ops/kd_loss.py (RowStatus) mirrors these codes
// and turns them into errors.
#pragma once

#include <cstdint>

namespace kdkernels {

enum RowStatus : int8_t {
  kOk = 0,
  kTargetOutOfRange = 1,
  kTargetMasked = 2,
  kStudentNonFinite = 3,
  kTeacherNonFinite = 4,
  kStudentAllMasked = 5,
  kTeacherAllMasked = 6,
  kIndexOutOfRange = 7,  // top-k KD: a teacher id outside [0, V)
  kDuplicateIndex = 8,   // top-k KD: a teacher id twice in a row
};

}  // namespace kdkernels
