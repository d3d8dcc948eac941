"""Pruning to a budget: what a pruning plan costs, counted without surgery, and the ratio that
meets a target.

A fused YOLO model's params and MACs are those of its convolutions (BatchNorm folds into them; the
rest has no weights and thop counts no MACs for it), so both follow from each conv's kept input
and output channels: params = out x in/groups x k + out (bias), MACs = output pixels x out x
in/groups x k, with k the kernel's area. That is exact (a test compares it with thop on the model
after surgery) and costs nothing, so a params or FLOPs target is met by bisection over the ratio,
planning at each step and never cutting a model. A latency target needs a real model per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import nn

from stages.compress.pruning.dependency import ChannelId

COUNTED = ("params_m", "gflops")  # targets counted on a plan; a latency target is measured


@dataclass(frozen=True)
class ConvShape:
    """What one convolution of the fused model costs, per channel."""

    in_channels: int
    out_channels: int
    groups: int
    kernel: int  # kernel height x width
    out_pixels: int  # output height x width at the measured input size
    bias: bool  # after BatchNorm folding

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels


def conv_shapes(model: nn.Module, imgsz: int) -> dict[str, ConvShape]:
    """Every convolution of ``model`` (by module name) as it is after BatchNorm folding, with its
    output size for one ``imgsz`` x ``imgsz`` image."""
    fused = deepcopy(model).float().eval()
    if hasattr(fused, "fuse"):
        fused = fused.fuse(verbose=False)
    pixels: dict[str, int] = {}
    convs = {n: m for n, m in fused.named_modules() if isinstance(m, nn.Conv2d)}
    hooks = [
        conv.register_forward_hook(
            lambda _m, _i, out, name=name: pixels.__setitem__(name, out.shape[2] * out.shape[3])
        )
        for name, conv in convs.items()
    ]
    try:
        with torch.no_grad():
            fused(torch.zeros(1, 3, imgsz, imgsz))
    finally:
        for hook in hooks:
            hook.remove()
    return {
        name: ConvShape(
            conv.in_channels,
            conv.out_channels,
            conv.groups,
            conv.kernel_size[0] * conv.kernel_size[1],
            pixels[name],
            conv.bias is not None,
        )
        for name, conv in convs.items()
        if name in pixels  # a conv the forward pass does not use costs nothing
    }


def pruned_cost(
    shapes: Mapping[str, ConvShape],
    inputs: Mapping[str, list[ChannelId | None]],
    removed: set[ChannelId],
) -> tuple[int, int]:
    """(params, MACs) of the fused model once ``removed`` channels are cut.

    ``inputs`` holds, for each traced conv, the channel each of its inputs comes from (None: one
    no pruning can remove); a conv not in it keeps all its inputs.
    """
    params = macs = 0
    for name, shape in shapes.items():
        out = shape.out_channels - sum((name, i) in removed for i in range(shape.out_channels))
        if name in inputs:
            kept_in = sum(c is None or c not in removed for c in inputs[name])
        else:
            kept_in = shape.in_channels
        groups = out if shape.depthwise else shape.groups  # a depthwise conv stays depthwise
        per_output = kept_in // groups * shape.kernel
        params += out * per_output + (out if shape.bias else 0)
        macs += shape.out_pixels * out * per_output
    return params, macs


def counted_cost(
    shapes: Mapping[str, ConvShape], inputs: Mapping[str, list[ChannelId | None]], target: str
) -> Callable[[set[ChannelId]], float]:
    """The fused model's params in millions (``target`` 'params_m') or GFLOPs ('gflops') once
    the given channels are cut, as a function of those channels."""
    if target not in COUNTED:
        raise ValueError(f"{target!r} is not counted; expected one of {COUNTED}")

    def value(removed: set[ChannelId]) -> float:
        params, macs = pruned_cost(shapes, inputs, removed)
        return params / 1e6 if target == "params_m" else 2 * macs / 1e9

    return value


def channel_macs(
    shapes: Mapping[str, ConvShape], inputs: Mapping[str, list[ChannelId | None]]
) -> dict[ChannelId, int]:
    """The MACs that removing one output channel saves: its own filter over its output, and its
    slice of every convolution that reads it."""
    saved: dict[ChannelId, int] = {}
    for name, shape in shapes.items():
        own = shape.out_pixels * shape.in_channels // shape.groups * shape.kernel
        for i in range(shape.out_channels):
            saved[(name, i)] = own
    for name, channels in inputs.items():
        shape = shapes.get(name)
        if shape is None or shape.depthwise:  # a depthwise consumer is tied, counted as its own
            continue
        read = shape.out_pixels * shape.out_channels // shape.groups * shape.kernel
        for channel in channels:
            if channel is not None and channel in saved:
                saved[channel] += read
    return saved


@dataclass(frozen=True)
class Search:
    """A ratio found for a target: the value it reaches, and every ratio tried."""

    ratio: float
    achieved: float
    tried: list[tuple[float, float]]  # (ratio, value), in the order evaluated


class Unreachable(ValueError):
    """A target below the smallest reachable value (the most pruned model is still above it)."""

    def __init__(self, target: float, smallest: float, largest: float) -> None:
        super().__init__(f"{target} is outside [{smallest}, {largest})")
        self.target, self.smallest, self.largest = target, smallest, largest


class AlreadyMet(ValueError):
    """A target the unpruned model already meets: there is nothing to prune for."""

    def __init__(self, target: float, unpruned: float) -> None:
        super().__init__(f"{target} is met unpruned ({unpruned})")
        self.target, self.unpruned = target, unpruned


RESOLUTION = 10**6  # ratios are searched on this grid, so that the one recorded is the one used


def smallest_ratio_within(
    value_at: Callable[[float], float], target: float, unpruned: float, steps: int = 30
) -> Search:
    """The smallest ratio in (0, 1), to 1e-6, whose value is <= ``target``, by bisection.

    ``unpruned`` is the value with nothing removed. ``value_at`` must not increase with the ratio
    (true of params and FLOPs; roughly true of a measured latency, for which ``steps`` is small:
    the ratio found is then one within the target, not provably the smallest). Raises
    :class:`AlreadyMet` when the unpruned model is within the target, :class:`Unreachable` when
    even the largest ratio stays above it.
    """
    tried: list[tuple[float, float]] = []

    def at(micro: int) -> float:
        value = value_at(micro / RESOLUTION)
        tried.append((micro / RESOLUTION, value))
        return value

    if unpruned <= target:
        raise AlreadyMet(target, unpruned)
    lo, hi = 0, RESOLUTION - 1  # value(lo) = unpruned > target; is value(hi) within it?
    achieved = at(hi)
    if achieved > target:
        raise Unreachable(target, achieved, unpruned)
    for _ in range(steps):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        value = at(mid)
        if value <= target:
            hi, achieved = mid, value
        else:
            lo = mid
    return Search(hi / RESOLUTION, achieved, tried)


def cost_aware(
    importance: Mapping[int, float],
    groups: Iterable[list[ChannelId]],
    saved: Mapping[ChannelId, int],
) -> dict[int, float]:
    """Importance per MAC saved: |gamma| / MACs of the group (by id), so that among channels
    of similar scale the expensive ones go first."""
    return {id(g): importance[id(g)] / max(sum(saved.get(c, 0) for c in g), 1) for g in groups}


def kept_at_least(size: int, max_layer_ratio: float) -> int:
    """Channels a space of ``size`` keeps when it may lose at most ``max_layer_ratio`` of them."""
    return math.ceil(size * (1 - max_layer_ratio) - 1e-9)
