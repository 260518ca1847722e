// Part 0 of the CPU kd_loss kernel (csrc/cpu/kd_loss_cpu.h).
#include "kd_loss_cpu_kernel.h"

template bool kdkernels::cpu::kd_loss_part<0>(const kdkernels::cpu::KDLossCall& call);
