"""kdkernels: fused knowledge-distillation kernels for PyTorch."""

from kdkernels.functional import dkd_loss, fused_linear_kd_loss, kd_loss
from kdkernels.nn import DKDLoss, FusedLinearKDLoss, KDLoss
from kdkernels.ops import available_backends

__version__ = "0.1.0"

__all__ = ["DKDLoss", "FusedLinearKDLoss", "KDLoss", "available_backends", "dkd_loss", "fused_linear_kd_loss",
           "kd_loss", "__version__"]
