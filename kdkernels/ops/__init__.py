"""Custom-op registration (torch.library) and backend dispatch for the kernels."""

from kdkernels.ops.backends import available_backends, resolve_backend
from kdkernels.ops.kd_loss import DIVERGENCES, kd_loss_rows

__all__ = ["DIVERGENCES", "available_backends", "kd_loss_rows", "resolve_backend"]
