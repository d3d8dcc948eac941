"""Split replay: what pruned checkpoints carry besides ultralytics' own modules.

A module whose forward splits a tensor along channels computes the sizes in its own code from
its widths before pruning (C2f and C3k2 ``chunk(2, 1)`` cv1's output, C2PSA splits it at
``self.c``, ...). Pruning may keep parts of unequal width, so such a module carries
``pruned_splits`` (the n-th channel split its own code makes -> the sizes to split at now), and
forward hooks run its code under a mode that replays those splits at those sizes. While one of
the modules its code calls runs, the mode steps aside: their operations then cost nothing extra,
and the splits counted are the module's own. One mechanism for every module type: nothing here
names a module class.

pickle records the two hooks by this module's name, so a process that loads a pruned checkpoint
imports it; checkpoints of earlier versions name it ``stages.common.layers``, a name it answers
to as well.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

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
    """Counts the channel splits a module's own code makes and makes the n-th at ``sizes[n]``
    where given."""

    def __init__(self, sizes: dict[int, list[int]]) -> None:
        super().__init__()
        self.sizes = sizes
        self.count = 0
        self.active = False  # entered and not paused

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_channel_split(func, args, kwargs):
            n, self.count = self.count, self.count + 1
            if n in self.sizes:
                return torch.split(args[0], self.sizes[n], 1)
        return func(*args, **kwargs)


_MODES: list[_PrunedSplits] = []  # of the resized modules whose forward is running, innermost last
_FRAMES: list[tuple[_PrunedSplits | None, bool]] = []  # per hooked call: its mode, parent paused


def _switch(mode: _PrunedSplits, on: bool) -> None:
    if on:
        mode.__enter__()
    else:
        mode.__exit__(None, None, None)
    mode.active = on


def _before_forward(module: nn.Module, _args: tuple) -> None:
    # a module the resized module's own code calls: the caller's mode steps aside meanwhile
    paused = bool(getattr(module, "pauses_caller_splits", False) and _MODES and _MODES[-1].active)
    if paused:
        _switch(_MODES[-1], False)
    mode = None
    if getattr(module, "pruned_splits", None):
        mode = _PrunedSplits(module.pruned_splits)
        _switch(mode, True)
        _MODES.append(mode)
    _FRAMES.append((mode, paused))


def _after_forward(module: nn.Module, _args: tuple, _output: object) -> None:
    mode, paused = _FRAMES.pop()
    if mode is not None:
        _switch(_MODES.pop(), False)
    if paused:
        _switch(_MODES[-1], True)


def _hook(module: nn.Module) -> None:
    """Install the two hooks on ``module`` once (they do nothing for a module with neither
    role)."""
    if not getattr(module, "has_split_hooks", False):
        module.register_forward_pre_hook(_before_forward)
        module.register_forward_hook(_after_forward, always_call=True)
        module.has_split_hooks = True


def set_pruned_splits(
    module: nn.Module, sizes: dict[int, list[int]], callees: Iterable[nn.Module] = ()
) -> None:
    """Make ``module`` split its own n-th channel split at ``sizes[n]`` from now on (a second
    pruning updates the sizes); ``callees`` are the modules its own code calls (the trace knows
    them), during which its replay steps aside."""
    module.pruned_splits = {**getattr(module, "pruned_splits", {}), **sizes}
    _hook(module)
    for callee in callees:
        callee.pauses_caller_splits = True
        _hook(callee)


# Checkpoints written before the move of this module unpickle their hooks from its former name.
sys.modules.setdefault("stages.common.layers", sys.modules[__name__])
