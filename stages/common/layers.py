"""What pruned checkpoints contain besides ultralytics' own modules: resized channel splits.

A module whose forward splits a tensor along channels computes the sizes in its own code from
its widths before pruning (C2f and C3k2 ``chunk(2, 1)`` cv1's output, C2PSA splits it at
``self.c``, ...). Pruning may keep parts of unequal width, so such a module carries
``pruned_splits`` (the n-th channel split made during its forward -> the sizes to split at now),
and two forward hooks run its forward under a mode that replays those splits at those sizes.
One mechanism for every module type: nothing here names a module class.

This lives here, not in a stage module: a stage runs as ``__main__``, and pickle records the
hooks by their module's name; from here every process that loads a checkpoint finds them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

SPLIT_FUNCTIONS = frozenset(
    {
        torch.Tensor.split,
        torch.split,
        torch.Tensor.chunk,
        torch.chunk,
        torch.Tensor.split_with_sizes,
        torch.Tensor.tensor_split,
        torch.tensor_split,
    }
)


def is_channel_split(func: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether a call is one of SPLIT_FUNCTIONS cutting a 4-D tensor along channels (dim 1).

    Each has the signature (tensor, sizes_or_count, dim=0)."""
    if func not in SPLIT_FUNCTIONS or not args or not isinstance(args[0], torch.Tensor):
        return False
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    return args[0].dim() == 4 and dim in (1, -3)


class _PrunedSplits(TorchFunctionMode):
    """Counts the channel splits made while one module's forward runs (its children's
    included, as the trace counted them) and makes the n-th at ``sizes[n]`` where given."""

    def __init__(self, sizes: dict[int, list[int]]) -> None:
        super().__init__()
        self.sizes = sizes
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_channel_split(func, args, kwargs):
            n, self.count = self.count, self.count + 1
            if n in self.sizes:
                return torch.split(args[0], self.sizes[n], 1)
        return func(*args, **kwargs)


_ACTIVE: dict[int, list[_PrunedSplits]] = {}  # id(module) -> its modes entered, innermost last


def _enter_pruned_splits(module: nn.Module, _args: tuple) -> None:
    mode = _PrunedSplits(module.pruned_splits)
    mode.__enter__()
    _ACTIVE.setdefault(id(module), []).append(mode)


def _exit_pruned_splits(module: nn.Module, _args: tuple, _output: object) -> None:
    _ACTIVE[id(module)].pop().__exit__(None, None, None)


def set_pruned_splits(module: nn.Module, sizes: dict[int, list[int]]) -> None:
    """Make ``module`` split its n-th channel split at ``sizes[n]`` from now on (hooks are
    installed once; a second pruning updates the sizes)."""
    if not hasattr(module, "pruned_splits"):
        module.register_forward_pre_hook(_enter_pruned_splits)
        module.register_forward_hook(_exit_pruned_splits, always_call=True)
        module.pruned_splits = {}
    module.pruned_splits = {**module.pruned_splits, **sizes}
