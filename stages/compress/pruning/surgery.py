"""Cutting planned channels out of a model for real, and checking that it still runs.

A removed channel still emitted a constant (act(beta) when gamma is 0): its mean value at every
consumer convolution is folded into that convolution's bias, or its BatchNorm's running mean, so
the network's output does not change. This is exact for 1x1 consumers and for the interior of
larger kernels; at the one-pixel border of a zero-padded kxk convolution the constant met padding
zeros, so a channel with gamma = 0 and act(beta) != 0 changes border outputs slightly.

A split's sizes are computed by its module's own code, from the widths before pruning: the
surgery gives every module whose channel splits lost channels the sizes to split at now
(:func:`replay.set_pruned_splits`). Then it runs the pruned model and checks that the outputs
keep their shapes; a model left inconsistent is refused, naming the module.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from copy import deepcopy

import torch
from torch import nn

from stages.compress.pruning.dependency import (
    ChannelGraph,
    ChannelId,
    InconsistentModule,
    UnprunableError,
    running_modules,
)
from stages.compress.pruning.importance import plan
from stages.compress.pruning.replay import set_pruned_splits


def input_means(
    model: nn.Module, convs: Iterable[str], images: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Mean of each input channel of the named convs over a batch (model in eval mode)."""
    modules = dict(model.named_modules())
    means: dict[str, torch.Tensor] = {}
    hooks = [
        modules[name].register_forward_pre_hook(
            lambda _m, args, name=name: means.__setitem__(name, args[0].detach().mean((0, 2, 3)))
        )
        for name in convs
    ]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return means


def _shrink_bn(bn: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    bn.weight = nn.Parameter(bn.weight.data[keep].clone())
    bn.bias = nn.Parameter(bn.bias.data[keep].clone())
    bn.running_mean = bn.running_mean[keep].clone()
    bn.running_var = bn.running_var[keep].clone()
    bn.num_features = len(keep)


def _fold_removed_inputs(
    conv: nn.Conv2d, bn: nn.BatchNorm2d | None, gone: torch.Tensor, mean: torch.Tensor
) -> None:
    """Add the constant the removed inputs ``gone`` contributed (their ``mean``) to the conv's
    bias, or subtract it from the running mean of the BatchNorm after it."""
    shift = (conv.weight[:, gone].sum((2, 3)) * mean[gone]).sum(1)
    if conv.bias is not None:
        conv.bias += shift
    elif bn is not None:
        bn.running_mean -= shift
    else:
        conv.bias = nn.Parameter(shift.clone())


def _cut_conv(
    conv: nn.Conv2d, bn: nn.BatchNorm2d | None, keep_out: torch.Tensor, keep_in: torch.Tensor
) -> None:
    """Keep output channels ``keep_out`` and input channels ``keep_in`` (a depthwise conv keeps
    its inputs with its outputs)."""
    depthwise = conv.groups > 1
    weight = conv.weight.data[keep_out]
    conv.weight = nn.Parameter((weight if depthwise else weight[:, keep_in]).clone())
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.data[keep_out].clone())
    conv.out_channels = len(keep_out)
    conv.in_channels = len(keep_out) if depthwise else len(keep_in)
    if depthwise:
        conv.groups = len(keep_out)
    if bn is not None:
        _shrink_bn(bn, keep_out)


def remove_channels(
    model: nn.Module, graph: ChannelGraph, removed: set[ChannelId], images: torch.Tensor
) -> None:
    """Remove the channels in ``removed`` from ``model`` in place, folding their constants into
    their consumers (with means over ``images``); raise UnprunableError, naming the module, if
    the pruned model does not run or its outputs change shape."""
    modules = dict(model.named_modules())
    consumers = {n for n, ins in graph.inputs.items() if any(c in removed for c in ins if c)}
    means = input_means(model, consumers, images)
    probe = torch.rand(2, *images.shape[1:])  # 2: BatchNorm trains on a 1x1 map of a P6 level
    shapes_before = _output_shapes(model, graph, probe)
    with torch.no_grad():
        for name, conv in ((n, modules[n]) for n in graph.convs):
            ins = graph.inputs[name]
            bn = modules[graph.bn_after[name]] if name in graph.bn_after else None
            if name in consumers and conv.groups == 1:
                gone = torch.tensor(
                    [j for j, c in enumerate(ins) if c is not None and c in removed]
                )
                _fold_removed_inputs(conv, bn, gone, means[name])
            keep_out = torch.tensor(
                [i for i in range(conv.out_channels) if (name, i) not in removed]
            )
            keep_in = torch.tensor([j for j, c in enumerate(ins) if c is None or c not in removed])
            _cut_conv(conv, bn, keep_out, keep_in)
    _replay_resized_splits(modules, graph, removed)
    _check_consistent(model, graph, probe, shapes_before)


def _replay_resized_splits(
    modules: dict[str, nn.Module], graph: ChannelGraph, removed: set[ChannelId]
) -> None:
    resized: dict[str, dict[int, list[int]]] = defaultdict(dict)
    for split in graph.splits:
        sizes = [sum(c is None or c not in removed for c in part) for part in split.segments]
        if sizes != [len(part) for part in split.segments]:
            resized[split.module][split.index] = sizes
    for name, sizes in resized.items():
        set_pruned_splits(modules[name], sizes, [modules[c] for c in graph.callees.get(name, ())])


def _output_shapes(
    model: nn.Module, graph: ChannelGraph, x: torch.Tensor
) -> list[list[tuple[int, ...]]]:
    """Shapes of the prediction tensors in eval and in train mode (of a copy: training
    BatchNorm would move the running statistics); the model keeps its mode."""
    was_training = model.training
    try:
        with torch.no_grad():
            return [
                [tuple(t.shape) for t in graph.outputs(m(x))]
                for m in (model.eval(), deepcopy(model).train())
            ]
    finally:
        model.train(was_training)


def _check_consistent(
    model: nn.Module, graph: ChannelGraph, x: torch.Tensor, shapes_before: list
) -> None:
    """Run the pruned model in train and eval mode: a module that fails, or predictions of
    other shapes, are refused here rather than in the next stage."""
    with running_modules(model) as running:
        try:
            shapes_after = _output_shapes(model, graph, x)
        except (RuntimeError, ValueError, IndexError) as err:  # what torch raises on bad shapes
            name = running[-1] if running else ""
            kind = type(dict(model.named_modules())[name]).__name__
            raise InconsistentModule(
                f"pruning left {name or 'the model'} ({kind}) inconsistent: "
                f"{str(err).splitlines()[0]}. The channel trace missed how it uses its channels; "
                f"nothing was written. Please report the model; prune.head: false keeps the head "
                f"whole if the module is in it.",
                name,
            ) from err
    if shapes_after != shapes_before:
        raise UnprunableError(
            f"pruning changed the model's output shapes {shapes_before} -> {shapes_after}; "
            f"nothing was written."
        )


def keep_width_readers(model: nn.Module, graph: ChannelGraph, imgsz: int = 64) -> None:
    """The step after the trace: cut half of every channel space of a copy of ``model`` and run
    it. Where a module fails, its code used what autograd does not show (attention reads its
    input's width and reshapes to it): keep every channel entering that module, and try again."""
    while True:
        ones = {
            name: torch.ones(graph.convs[conv].out_channels)
            for conv, name in graph.bn_after.items()
        }
        removed = plan(graph, ones, 0.5, "uniform", 1, 1).removed
        try:
            remove_channels(deepcopy(model), graph, removed, torch.rand(1, 3, imgsz, imgsz))
            return
        except InconsistentModule as err:
            entering = graph.module_inputs.get(err.module, set()) - graph.blocked
            if not entering:
                raise
            graph.blocked |= entering
