"""kdkernels: fused knowledge-distillation kernels for PyTorch."""

from kdkernels.functional import kd_loss
from kdkernels.nn import KDLoss
from kdkernels.ops import available_backends

__version__ = "0.1.0"

__all__ = ["KDLoss", "available_backends", "kd_loss", "__version__"]
