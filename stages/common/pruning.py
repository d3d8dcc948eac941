"""Structured channel pruning of any ultralytics detection model: trace, plan, surgery.

The model's channel dependencies are found by one general mechanism: a forward pass is traced
through autograd's graph, and every operation says what it does to channels. A convolution starts
a new channel space (and consumes its input's channels), BatchNorm, activations, pooling and
upsampling pass channels through, a concat along channels joins spaces, a split along channels
slices them, and an elementwise add ties channel i of one input to channel i of the other (a
residual). Anything else (a reshape, a slice, attention's matmuls), and every channel that reaches
a model output, is kept as it is. That covers C2f, C3k2, C2PSA, SPPF, the neck's upsample +
concat and the Detect heads (P2 to P6, one-to-one heads included), at any scale and class count,
with no list of layers.

A split's sizes are computed by its module's own code, from the widths before pruning: the
surgery gives every module whose channel splits lost channels the sizes to split at now
(layers.set_pruned_splits). Then it runs the pruned model and checks that the outputs keep their
shapes; a model left inconsistent is refused, naming the module, before anything is written.

Channels are removed in tied groups: a group is the set of conv output channels an add ties
together, ranked by the largest |gamma| among its members. ``global`` removes the lowest-ranked
groups over the whole network until ``ratio`` of the prunable conv channels are gone (network
slimming); ``uniform`` removes ``ratio`` of each channel space. Per space, ``min_channels`` keeps
layers alive, ``max_layer_ratio`` caps what it may lose and the kept count is rounded up to a
multiple of ``round_to``. With ``macs_saved`` groups are ranked by |gamma| per MAC saved instead.

A removed channel still emitted a constant (act(beta) when gamma is 0): its mean value at every
consumer convolution is folded into that convolution's bias, or its BatchNorm's running mean, so
the network's output does not change. This is exact for 1x1 consumers and for the interior of
larger kernels; at the one-pixel border of a zero-padded kxk convolution the constant met padding
zeros, so a channel with gamma = 0 and act(beta) != 0 changes border outputs slightly.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from ultralytics.nn.modules import Detect
from ultralytics.nn.tasks import DetectionModel

from stages.common import budget
from stages.common.cli import UserError
from stages.common.layers import is_channel_split, set_pruned_splits

ChannelId = tuple[str, int]  # (name of the producing nn.Conv2d, output channel index)
OPAQUE = "opaque"  # layout of a tensor whose channels we cannot follow

# autograd nodes that keep channel i in channel i (elementwise or spatial-only operations)
_PASS_THROUGH = (
    "Silu",
    "Relu",
    "Sigmoid",
    "Hardswish",
    "Hardsigmoid",
    "Gelu",
    "LeakyRelu",
    "Mish",
    "Tanh",
    "MaxPool2D",
    "AvgPool2D",
    "Upsample",
    "Clone",
    "ToCopy",
)


class UnprunableError(UserError):
    """The model's structure cannot be pruned (or pruning would leave it inconsistent)."""


class InconsistentModule(UnprunableError):
    """A module of the pruned model fails or changes the outputs' shapes."""

    def __init__(self, message: str, module: str) -> None:
        super().__init__(message)
        self.module = module


# --- tracing the channel graph ---------------------------------------------------------------


@dataclass
class Split:
    """A channel split: the ``index``-th that ``module``'s own code makes, and its parts."""

    module: str
    index: int
    segments: list[list[ChannelId | None]]


@dataclass
class ChannelGraph:
    """What the trace found: convs, their inputs' channels, BNs, ties and blocked channels."""

    convs: dict[str, nn.Conv2d] = field(default_factory=dict)
    inputs: dict[str, list[ChannelId | None]] = field(default_factory=dict)
    bn_after: dict[str, str] = field(default_factory=dict)  # conv -> BatchNorm on its output
    blocked: set[ChannelId] = field(default_factory=set)
    parent: dict[ChannelId, ChannelId] = field(default_factory=dict)  # union-find of ties
    splits: list[Split] = field(default_factory=list)
    module_inputs: dict[str, set[ChannelId]] = field(default_factory=dict)  # channels entering
    callees: dict[str, set[str]] = field(default_factory=dict)  # modules a module's code calls

    def find(self, c: ChannelId) -> ChannelId:
        root = c
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while c != root:  # path compression
            self.parent[c], c = root, self.parent.get(c, c)
        return root

    def tie(self, a: ChannelId, b: ChannelId) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb

    def groups(self) -> dict[ChannelId, list[ChannelId]]:
        """Tied channel groups, keyed by their root, over every conv output channel."""
        out: dict[ChannelId, list[ChannelId]] = defaultdict(list)
        for name, conv in self.convs.items():
            for i in range(conv.out_channels):
                out[self.find((name, i))].append((name, i))
        return out


def _topological(outputs: Iterable[torch.Tensor]) -> list:
    """autograd nodes from the inputs to the outputs."""
    order, seen = [], set()
    stack = [(t.grad_fn, False) for t in outputs if t.grad_fn is not None]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                stack.append((child, False))
    return order


def prediction_tensors(out: object) -> list[torch.Tensor]:
    """The prediction tensors of a forward's output (ultralytics returns nested dicts; in eval
    mode, the decoded boxes beside them).

    "feats" holds the neck's maps, returned beside the predictions for the loss: they are not
    outputs whose channels must be kept.
    """
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k, v in out.items() if k != "feats" for t in prediction_tensors(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in prediction_tensors(v)]
    return []


@contextmanager
def _running_modules(
    model: nn.Module, on_enter: Callable[[str, tuple], None] | None = None
) -> Iterator[list[str]]:
    """The names of ``model``'s modules whose forward is running, innermost last, kept up to date
    by hooks while the context lasts; ``on_enter(name, args)`` runs as each one starts. A module
    whose forward raises stays on the list, so after an error the last name is where it was."""
    running: list[str] = []

    def enter(name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            if on_enter is not None:
                on_enter(name, args)
            running.append(name)

        return hook

    def leave(_m: nn.Module, _args: tuple, _out: object) -> None:
        running.pop()

    hooks = []
    for name, module in model.named_modules():
        hooks.append(module.register_forward_pre_hook(enter(name)))
        hooks.append(module.register_forward_hook(leave))
    try:
        yield running
    finally:
        for hook in hooks:
            hook.remove()


class _SplitRecorder(TorchFunctionMode):
    """Watches a traced forward: which module's own code made each channel split, and as its
    how-many-th (the count layers._PrunedSplits replays), and
    ``detach`` made a differentiable copy so that the trace sees through it (YOLOv10/26 heads
    detach their one-to-one branch in training). ``running`` is _running_modules' list, and
    ``entered`` its ``on_enter``."""

    def __init__(self) -> None:
        super().__init__()
        self.running: list[str] = []
        self.splits_made: dict[str, int] = {}  # running module -> its own channel splits so far
        self.owner: dict[object, tuple[str, int]] = {}  # split's autograd node -> (module, n)
        self.inputs: dict[str, list[tuple]] = defaultdict(list)  # module -> autograd edges
        self.callees: dict[str, set[str]] = defaultdict(set)  # module -> modules its code calls

    def entered(self, name: str, args: tuple) -> None:
        if self.running:
            self.callees[self.running[-1]].add(name)
        self.splits_made[name] = 0
        self.inputs[name] += [(a.grad_fn, a.output_nr) for a in args if isinstance(a, torch.Tensor)]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.detach:
            return args[0].clone()
        out = func(*args, **kwargs)
        if is_channel_split(func, args, kwargs) and self.running:
            name = self.running[-1]
            self.owner[out[0].grad_fn] = (name, self.splits_made[name])
            self.splits_made[name] += 1
        return out


def trace(model: nn.Module, imgsz: int = 64) -> ChannelGraph:
    """Trace a detection model (any nn.Module with convs) and return its channel graph."""
    traced = deepcopy(model).float().train()  # train mode: Detect returns its raw level maps
    for p in traced.parameters():
        p.requires_grad_(True)
    modules = dict(traced.named_modules())
    owner = {id(p): name for name, m in modules.items() for p in m.parameters(recurse=False)}
    recorder = _SplitRecorder()
    with _running_modules(traced, recorder.entered) as recorder.running, recorder:
        outputs = prediction_tensors(traced(torch.randn(2, 3, imgsz, imgsz)))

    graph = ChannelGraph()
    layouts: dict[tuple, list | str] = {}

    def layout_of(edge: tuple) -> list | str:
        fn, nr = edge
        return OPAQUE if fn is None else layouts.get((fn, nr), OPAQUE)

    def block(layout: list | str) -> None:
        if layout != OPAQUE:
            graph.blocked.update(c for c in layout if c is not None)

    def param_owner(node, index: int) -> str | None:
        edge = node.next_functions[index][0] if len(node.next_functions) > index else None
        return owner.get(id(getattr(edge, "variable", None)))

    for node in _topological(outputs):
        kind = type(node).__name__
        edges = [e for e in node.next_functions if type(e[0]).__name__ != "AccumulateGrad"]
        first = layout_of(edges[0]) if edges else OPAQUE
        out: list | str = OPAQUE
        if kind == "ConvolutionBackward0":
            name = param_owner(node, 1)
            conv = modules[name]
            inputs = [None] * conv.in_channels if first == OPAQUE else list(first)
            graph.convs[name] = conv
            graph.inputs[name] = inputs
            out = [(name, i) for i in range(conv.out_channels)]
            if conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1:
                for i, c in enumerate(inputs):  # depthwise: channel i in -> channel i out
                    graph.tie(out[i], c) if c is not None else graph.blocked.add(out[i])
            elif conv.groups != 1:
                block(inputs)
                block(out)
        elif "BatchNorm" in kind:
            name = param_owner(node, 1)
            source = first[0][0] if first != OPAQUE and first and first[0] else None
            whole = source is not None and first == [(source, i) for i in range(len(first))]
            if whole and len(first) == graph.convs[source].out_channels:
                graph.bn_after[source] = name
            else:
                block(first)
            out = first
        elif any(kind.startswith(p) for p in _PASS_THROUGH):
            out = first
        elif kind == "CatBackward0" and node._saved_dim in (1, -3):
            parts = [layout_of(e) for e in edges]
            out = OPAQUE if OPAQUE in parts else [c for part in parts for c in part]
        elif kind in ("SplitBackward0", "SplitWithSizesBackward0") and node._saved_dim in (1, -3):
            if first != OPAQUE and node not in recorder.owner:  # not made by a module
                block(first)
            elif first != OPAQUE:
                sizes = getattr(node, "_saved_split_sizes", None)
                if sizes is None:
                    step = node._saved_split_size
                    sizes = [min(step, len(first) - s) for s in range(0, len(first), step)]
                start, segments = 0, []
                for k, size in enumerate(sizes):
                    segments.append(first[start : start + size])
                    layouts[(node, k)] = segments[-1]
                    start += size
                graph.splits.append(Split(*recorder.owner[node], segments))
            continue
        elif kind == "AddBackward0" and len(edges) == 2:
            a, b = layout_of(edges[0]), layout_of(edges[1])
            if OPAQUE in (a, b) or len(a) != len(b):
                block(a)
                block(b)
            else:
                for ca, cb in zip(a, b, strict=True):
                    if ca is None or cb is None:
                        block([ca, cb])
                    else:
                        graph.tie(ca, cb)
                out = a
        else:  # an operation we do not follow: keep every channel that enters it
            for e in edges:
                block(layout_of(e))
        layouts[(node, 0)] = out

    for t in outputs:  # the head's output convolutions keep their outputs
        block(layouts.get((t.grad_fn, 0), OPAQUE))
    for name in graph.convs:  # channels with no BatchNorm have no importance score
        if name not in graph.bn_after:
            graph.blocked.update((name, i) for i in range(graph.convs[name].out_channels))
    graph.callees = dict(recorder.callees)
    for name, edges in recorder.inputs.items():
        entering = [layout_of(e) for e in edges]
        graph.module_inputs[name] = {c for lay in entering if lay != OPAQUE for c in lay if c}
    _probe(model, graph, imgsz)
    return graph


def _probe(model: nn.Module, graph: ChannelGraph, imgsz: int) -> None:
    """Cut half of every channel space of a copy of ``model`` and run it. Where a module fails,
    its code used what autograd does not show (attention reads its input's width and reshapes
    to it): keep every channel entering that module, and probe again."""
    while True:
        ones = {
            name: torch.ones(graph.convs[conv].out_channels)
            for conv, name in graph.bn_after.items()
        }
        removed = plan(graph, ones, 0.5, "uniform", 1, 1).removed
        try:
            apply(deepcopy(model), graph, removed, torch.rand(1, 3, imgsz, imgsz))
            return
        except InconsistentModule as err:
            entering = graph.module_inputs.get(err.module, set()) - graph.blocked
            if not entering:
                raise
            graph.blocked |= entering


def detect_prefix(model: nn.Module) -> str:
    """Qualified name of the Detect head."""
    return next(name for name, m in model.named_modules() if isinstance(m, Detect))


# --- choosing what to remove -------------------------------------------------------------------


@dataclass
class Space:
    """Channel groups made and read by the same convs, pruned under one budget."""

    convs: tuple[str, ...]
    groups: list[list[ChannelId]]  # prunable groups, most important first after planning
    fixed: int  # channels of this space that may not be removed
    kept: int = 0
    capped: bool = False  # min_channels, max_layer_ratio or round_to kept more than asked


@dataclass
class PrunePlan:
    removed: set[ChannelId]
    spaces: list[Space]
    prunable: int  # prunable conv output channels before pruning
    removed_prunable: int


def largest_gamma(
    graph: ChannelGraph, bn_gammas: dict[str, torch.Tensor], channels: Iterable[ChannelId]
) -> float:
    """The largest |gamma| among ``channels`` (0 for none).

    It ranks a tied group (a group is only as unimportant as its most important member) and
    reports how far from zero the removed channels were.
    """
    return max((float(bn_gammas[graph.bn_after[c]][i].abs()) for c, i in channels), default=0.0)


def plan(
    graph: ChannelGraph,
    bn_gammas: dict[str, torch.Tensor],
    ratio: float,
    method: str,
    min_channels: int,
    round_to: int,
    skip_prefixes: Iterable[str] = (),
    max_layer_ratio: float = 1.0,
    macs_saved: Mapping[ChannelId, int] | None = None,
) -> PrunePlan:
    """Decide which channel groups to remove (pure: no module is changed).

    No space loses more than ``max_layer_ratio`` of its channels. With ``macs_saved`` (the MACs
    each channel's removal saves, see budget.channel_macs) groups are ranked by |gamma| per MAC
    saved instead of |gamma|: at a FLOPs or latency budget, the expensive channels go first.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    skip = tuple(skip_prefixes)
    consumers: dict[ChannelId, set[str]] = defaultdict(set)
    for name, inputs in graph.inputs.items():
        for c in inputs:
            if c is not None:
                consumers[graph.find(c)].add(name)
    # A space is the set of groups made by the same convs and read by the same convs: the two
    # halves of a C2f split are separate spaces, so neither can be emptied.
    by_space: dict[tuple, Space] = {}
    for root, members in graph.groups().items():
        convs = tuple(sorted({c for c, _ in members}))
        key = (convs, tuple(sorted(consumers[root])))
        space = by_space.setdefault(key, Space(convs, [], 0))
        if any(m in graph.blocked for m in members) or any(c.startswith(skip) for c in convs):
            space.fixed += 1
        else:
            space.groups.append(members)
    all_groups = [g for s in by_space.values() for g in s.groups]
    importance = {id(g): largest_gamma(graph, bn_gammas, g) for g in all_groups}
    if macs_saved is not None:
        importance = budget.cost_aware(importance, all_groups, macs_saved)
    prunable = sum(len(g) for s in by_space.values() for g in s.groups)
    if not prunable:
        raise UnprunableError(
            "no channel of this model can be pruned: every conv output feeds an operation the "
            "channel trace does not follow (a reshape, a slice, attention), an output, or has no "
            "BatchNorm scale to rank it by."
        )

    if method == "global":  # one threshold over all prunable groups, counted in member channels
        ranked = sorted(
            (g for s in by_space.values() for g in s.groups), key=lambda g: importance[id(g)]
        )
        remaining, chosen = ratio * prunable, set()
        for g in ranked:
            if remaining <= 0:
                break
            chosen.add(id(g))
            remaining -= len(g)
        wanted = {k: sum(id(g) in chosen for g in s.groups) for k, s in by_space.items()}
    elif method == "uniform":
        wanted = {k: int(ratio * len(s.groups)) for k, s in by_space.items()}
    else:
        raise ValueError(f"unknown method {method!r}")

    removed: set[ChannelId] = set()
    for key, space in by_space.items():
        space.groups.sort(key=lambda g: importance[id(g)], reverse=True)
        size = space.fixed + len(space.groups)
        floor = max(min(min_channels, size), budget.kept_at_least(size, max_layer_ratio), 1)
        kept = max(size - wanted[key], floor)
        kept = min(size, math.ceil(kept / round_to) * round_to)
        kept = max(kept, space.fixed)
        space.capped = kept > size - wanted[key]  # by min_channels, max_layer_ratio or round_to
        space.kept = kept
        for g in space.groups[kept - space.fixed :]:
            removed.update(g)
    spaces = sorted(by_space.values(), key=lambda s: s.convs)
    return PrunePlan(removed, spaces, prunable, len(removed))


# --- changing the model --------------------------------------------------------------------------


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


def apply(
    model: nn.Module, graph: ChannelGraph, removed: set[ChannelId], images: torch.Tensor
) -> None:
    """Remove the channels in ``removed`` from ``model`` in place, folding their constants into
    their consumers (with means over ``images``); raise UnprunableError, naming the module, if
    the pruned model does not run or its outputs change shape."""
    modules = dict(model.named_modules())
    consumers = {n for n, ins in graph.inputs.items() if any(c in removed for c in ins if c)}
    means = input_means(model, consumers, images)
    probe = torch.rand(2, *images.shape[1:])  # 2: BatchNorm trains on a 1x1 map of a P6 level
    shapes_before = _output_shapes(model, probe)
    with torch.no_grad():
        for name in graph.convs:
            conv: nn.Conv2d = modules[name]
            ins = graph.inputs[name]
            keep_out = torch.tensor(
                [i for i in range(conv.out_channels) if (name, i) not in removed]
            )
            keep_in = torch.tensor([j for j, c in enumerate(ins) if c is None or c not in removed])
            depthwise = conv.groups > 1
            if name in consumers and not depthwise:  # fold the removed inputs' constants
                gone = torch.tensor(
                    [j for j, c in enumerate(ins) if c is not None and c in removed]
                )
                shift = (conv.weight[:, gone].sum((2, 3)) * means[name][gone]).sum(1)
                if conv.bias is not None:
                    conv.bias += shift
                elif name in graph.bn_after:
                    modules[graph.bn_after[name]].running_mean -= shift
                else:
                    conv.bias = nn.Parameter(shift.clone())
            weight = conv.weight.data[keep_out]
            conv.weight = nn.Parameter((weight if depthwise else weight[:, keep_in]).clone())
            if conv.bias is not None:
                conv.bias = nn.Parameter(conv.bias.data[keep_out].clone())
            conv.out_channels = len(keep_out)
            conv.in_channels = len(keep_out) if depthwise else len(keep_in)
            if depthwise:
                conv.groups = len(keep_out)
            if name in graph.bn_after:
                _shrink_bn(modules[graph.bn_after[name]], keep_out)
    resized: dict[str, dict[int, list[int]]] = defaultdict(dict)
    for split in graph.splits:
        sizes = [sum(c is None or c not in removed for c in part) for part in split.segments]
        if sizes != [len(part) for part in split.segments]:
            resized[split.module][split.index] = sizes
    for name, sizes in resized.items():
        set_pruned_splits(modules[name], sizes, [modules[c] for c in graph.callees.get(name, ())])
    _check_consistent(model, probe, shapes_before)


def _output_shapes(model: nn.Module, x: torch.Tensor) -> list[list[tuple[int, ...]]]:
    """Shapes of the prediction tensors in eval and in train mode (of a copy: training
    BatchNorm would move the running statistics); the model keeps its mode."""
    was_training = model.training
    try:
        with torch.no_grad():
            return [
                [tuple(t.shape) for t in prediction_tensors(m(x))]
                for m in (model.eval(), deepcopy(model).train())
            ]
    finally:
        model.train(was_training)


def _check_consistent(
    model: nn.Module, x: torch.Tensor, shapes_before: list[list[tuple[int, ...]]]
) -> None:
    """Run the pruned model in train and eval mode: a module that fails, or predictions of
    other shapes, are refused here rather than in the next stage."""
    with _running_modules(model) as running:
        try:
            shapes_after = _output_shapes(model, x)
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


def bn_gammas(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: m.weight.detach().clone()
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
    }


def uniformly_pruned(cfg: str, ratios: Iterable[float]) -> Iterator[tuple[float, nn.Module]]:
    """A freshly built ``cfg`` (10 classes) as it is (ratio 0.0), then pruned uniformly at each
    ratio; each model is a new copy.

    Uniform pruning of a fresh model: its shapes (and so its size and speed) depend only on the
    ratio, not on weights, which is what a size budget or a speed benchmark needs.
    """
    base = DetectionModel(cfg, nc=10, verbose=False).eval()
    yield 0.0, deepcopy(base)
    graph = trace(base)
    for ratio in ratios:
        model = deepcopy(base)
        chosen = plan(graph, bn_gammas(model), ratio, "uniform", 8, 8)
        apply(model, graph, chosen.removed, torch.rand(1, 3, 64, 64))
        yield ratio, model
