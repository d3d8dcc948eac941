"""What our trainers must synchronise by hand under multi-GPU (DDP) training.

DDP averages the gradients of the module it wraps and nothing else. Two pieces of training state
live outside the student network and would drift apart between workers: the CWD aligners (trained
beside the student, not inside it) and the sparse-training coefficient (adapted from validation
metrics that only rank 0 computes). In a single process both functions change nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes in the default process group; 1 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def broadcast_float(value: float | None, src: int = 0) -> float:
    """The ``value`` of rank ``src``, on every rank (``value`` itself in a single process)."""
    if world_size() == 1:
        return float(value)  # type: ignore[arg-type]
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return float(box[0])


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over the ranks, as DDP does for the module it wraps.

    A parameter without a gradient takes part with zeros: every rank must join every all-reduce.
    """
    size = world_size()
    if size == 1:
        return
    for param in parameters:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad.div_(size)
