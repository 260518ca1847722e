"""Backward of ops that compute their gradients in the forward and save them: hand the saved
gradients on as they are when that is safe, else scale them by the upstream gradient."""

from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def _graph_is_kept() -> bool:
    """Whether this backward runs with retain_graph=True (assumed so where torch cannot say)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is None or keep_graph()


def owns_saved(grad: Tensor) -> bool:
    """Whether this backward owns the saved gradients: the upstream gradient holds real data (not
    while tracing or capturing a CUDA graph) and the graph is freed after this backward, so that
    nothing reads the saved buffers again."""
    concrete = type(grad) is torch.Tensor and not torch._is_functional_tensor(grad)
    capturing = grad.is_cuda and torch.cuda.is_current_stream_capturing()
    return concrete and not torch.compiler.is_compiling() and not capturing and not _graph_is_kept()


def check_first_order() -> None:
    if torch.is_grad_enabled():
        raise NotImplementedError("kdkernels losses have no second derivative: backward with create_graph=True "
                                  "is not supported")


def scaled(grads: list[Optional[Tensor]], scale: Tensor) -> list[Optional[Tensor]]:
    """The saved gradients times the upstream gradient `scale` (broadcast against them). The
    product is formed in fp32 and rounded once into the gradient's dtype, so that a loss scale
    (e.g. 65536, inf in fp16) never meets the half-precision range on its own. Where this backward
    owns the saved gradients (owns_saved) they are scaled in place, or handed on as they are when
    the upstream gradient is all ones (on CUDA that check costs one small device sync, far cheaper
    than the pass over the gradients it saves), as fresh aliases (detach()): autograd stores a
    gradient that nothing else references as the leaf's .grad, but copies one that the saved
    context still holds. Else the product goes into new tensors."""
    owned = owns_saved(scale)
    if owned and bool((scale == 1).all()):
        return [None if grad is None else grad.detach() for grad in grads]
    scale = scale.to(torch.promote_types(scale.dtype, torch.float32))
    return [None if grad is None else torch.mul(grad, scale, out=grad if owned else torch.empty_like(grad)).detach()
            for grad in grads]


def register_leading_gradients_autograd(op, num_inputs: int, per_row: bool = False) -> None:
    """Autograd of a custom op whose outputs are the loss (a scalar, or [N] per row when per_row)
    and then the gradients the forward wrote for its leading inputs, in order (each empty when not
    asked for or absent): backward scales them by the upstream gradient (row by row when per_row)."""

    def setup_context(ctx, inputs, output) -> None:
        grads = output[1:]
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(*grads)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss: Optional[Tensor], *_grad_outputs):
        if grad_loss is None:
            return (None,) * num_inputs
        check_first_order()
        grads = [grad if needed and grad.numel() else None
                 for grad, needed in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        scale = grad_loss.unsqueeze(-1) if per_row else grad_loss
        return (*scaled(grads, scale),) + (None,) * (num_inputs - len(grads))

    op.register_autograd(backward, setup_context=setup_context)
