"""Which kernel backends exist for a device, and the choice behind backend="auto"."""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, Callable, Union

import torch

from kdkernels.ops import extension

BACKENDS = ("cpu", "triton", "cuda", "reference")
_HAS_TRITON = importlib.util.find_spec("triton") is not None

DeviceLike = Union[torch.device, str, None]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in for inputs of `dtype`: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def available_backends(device: DeviceLike = None) -> list[str]:
    """Backends that can run on `device` (default: CUDA when present, else CPU), fastest first.
    The Triton kernels run on CPU tensors too when TRITON_INTERPRET=1 (Triton's interpreter)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    module = extension.compiled()
    live: list[str] = []
    if device_type == "cpu" and module is not None:
        live.append("cpu")
    if device_type == "cuda" and module is not None and module.with_cuda:
        live.append("cuda")
    if _HAS_TRITON and (device_type == "cuda" or (device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        live.append("triton")
    live.append("reference")
    return live


def resolve_backend(backend: str, device: torch.device, supported: tuple[str, ...] = BACKENDS) -> str:
    """The concrete backend for `backend` ("auto" or a name) on `device`, among those an op has
    kernels for (`supported`), or a ValueError."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    live = [name for name in available_backends(device) if name in supported]
    if backend == "auto":
        return live[0]
    if backend not in supported:
        raise ValueError(f"backend {backend!r} has no kernel for this operation or these options; use one of {live}")
    if backend not in live:
        reason = f" ({extension.load_error})" if backend == "cpu" and extension.load_error else ""
        raise ValueError(
            f"backend {backend!r} is not available for {device.type} tensors{reason}; available: {live}"
        )
    return backend


def kernels(backend: str, module: str, *names: str) -> tuple[Callable[..., Any], ...]:
    """The kernels `names` of a backend, each `<name>_<backend>`: from kdkernels.triton.<module>
    for "triton" (imported on first use: triton is slow to import), else from the compiled
    extension."""
    source = importlib.import_module(f"kdkernels.triton.{module}") if backend == "triton" else extension.require()
    found = tuple(getattr(source, f"{name}_{backend}", None) for name in names)
    if backend == "reference" or None in found:
        raise ValueError(f"{module} has no {backend!r} kernel")
    return found
