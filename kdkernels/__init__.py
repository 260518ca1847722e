"""kdkernels: fused knowledge-distillation kernels for PyTorch."""

from kdkernels.functional import (dist_loss, dkd_loss, fused_linear_kd_loss, fused_linear_topk_kd_loss, kd_loss,
                                  topk_kd_loss)
from kdkernels.nn import DISTLoss, DKDLoss, FusedLinearKDLoss, FusedLinearTopKKDLoss, KDLoss, TopKKDLoss
from kdkernels.ops import available_backends

__version__ = "0.1.0"

__all__ = ["DISTLoss", "DKDLoss", "FusedLinearKDLoss", "FusedLinearTopKKDLoss", "KDLoss", "TopKKDLoss",
           "available_backends", "dist_loss", "dkd_loss", "fused_linear_kd_loss", "fused_linear_topk_kd_loss", "kd_loss",
           "topk_kd_loss", "__version__"]
