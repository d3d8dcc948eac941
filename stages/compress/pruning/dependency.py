"""The channel dependency graph of a network, found by tracing one forward pass.

A forward pass is traced through autograd's graph, and every operation says what it does to
channels (one handler per kind of autograd node, :data:`_HANDLERS`). A convolution starts a new
channel space (and consumes its input's channels), BatchNorm, activations, pooling and upsampling
pass channels through, a concat along channels joins spaces, a split along channels slices them,
and an elementwise add ties channel i of one input to channel i of the other (a residual).
Anything else (a reshape, a slice, attention's matmuls), and every channel that reaches a model
output, is kept as it is. That covers C2f, C3k2, C2PSA, SPPF, the neck's upsample + concat and
YOLO's Detect heads (P2 to P6, one-to-one heads included), at any scale and class count, with no
list of layers.

Which of the forward's outputs are predictions (whose channels must be kept) is the model's to
say: ``trace`` takes it as ``outputs``, a function from the forward's output to its prediction
tensors (by default, every tensor in it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from stages.compress.pruning.replay import is_channel_split
from stages.pipeline.cli import UserError

ChannelId = tuple[str, int]  # (name of the producing nn.Conv2d, output channel index)
Layout = list[ChannelId | None] | str  # the channel each position of a tensor holds, or OPAQUE
OPAQUE = "opaque"  # layout of a tensor whose channels we cannot follow
OutputExtractor = Callable[[object], list[torch.Tensor]]

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


def tensors_in(out: object, skip_keys: Collection[str] = ()) -> list[torch.Tensor]:
    """Every tensor of a forward's (nested) output, leaving out dict entries under
    ``skip_keys``."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k, v in out.items() if k not in skip_keys for t in tensors_in(v, skip_keys)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in tensors_in(v, skip_keys)]
    return []


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
    outputs: OutputExtractor = tensors_in  # how the trace found the prediction tensors

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

    def batchnorm_groups(self, sizes: Mapping[str, int]) -> dict[str, list[int]]:
        """The tied group of every channel of the BatchNorms ``sizes`` names (name -> channels),
        numbered 0, 1, ...; a channel the trace did not reach is a group of its own."""
        conv_of = {bn: conv for conv, bn in self.bn_after.items()}
        number: dict[ChannelId, int] = {}
        out = {}
        for bn, size in sizes.items():
            ids = []
            for i in range(size):
                root = self.find((conv_of[bn], i)) if bn in conv_of else (bn, i)
                ids.append(number.setdefault(root, len(number)))
            out[bn] = ids
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


@contextmanager
def running_modules(
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
    how-many-th (the count replay._PrunedSplits replays), and
    ``detach`` made a differentiable copy so that the trace sees through it (YOLOv10/26 heads
    detach their one-to-one branch in training). ``running`` is running_modules' list, and
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


@dataclass
class _Trace:
    """The state a walk over the autograd graph builds up: the graph, and each tensor's layout."""

    graph: ChannelGraph
    modules: dict[str, nn.Module]
    param_names: dict[int, str]  # id of a parameter -> the module that owns it
    split_owner: dict[object, tuple[str, int]]  # split node -> (module, n), from the recorder
    layouts: dict[tuple, Layout] = field(default_factory=dict)  # (node, output_nr) -> layout

    def layout_of(self, edge: tuple) -> Layout:
        fn, nr = edge
        return OPAQUE if fn is None else self.layouts.get((fn, nr), OPAQUE)

    def block(self, layout: Layout) -> None:
        if layout != OPAQUE:
            self.graph.blocked.update(c for c in layout if c is not None)

    def param_owner(self, node, index: int) -> str | None:
        edge = node.next_functions[index][0] if len(node.next_functions) > index else None
        return self.param_names.get(id(getattr(edge, "variable", None)))


# Each handler gets the trace, the autograd node, its non-parameter input edges and the layout of
# the first of them, and returns the layout of the node's output 0.


def _conv(t: _Trace, node, _edges: list, first: Layout) -> Layout:
    name = t.param_owner(node, 1)
    conv = t.modules[name]
    inputs = [None] * conv.in_channels if first == OPAQUE else list(first)
    t.graph.convs[name] = conv
    t.graph.inputs[name] = inputs
    out = [(name, i) for i in range(conv.out_channels)]
    if conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1:
        for i, c in enumerate(inputs):  # depthwise: channel i in -> channel i out
            t.graph.tie(out[i], c) if c is not None else t.graph.blocked.add(out[i])
    elif conv.groups != 1:
        t.block(inputs)
        t.block(out)
    return out


def _batchnorm(t: _Trace, node, _edges: list, first: Layout) -> Layout:
    name = t.param_owner(node, 1)
    source = first[0][0] if first != OPAQUE and first and first[0] else None
    whole = source is not None and first == [(source, i) for i in range(len(first))]
    if whole and len(first) == t.graph.convs[source].out_channels:
        t.graph.bn_after[source] = name
    else:
        t.block(first)
    return first


def _pass_through(_t: _Trace, _node, _edges: list, first: Layout) -> Layout:
    return first


def _unfollowed(t: _Trace, _node, edges: list, _first: Layout) -> Layout:
    """An operation we do not follow: keep every channel that enters it."""
    for e in edges:
        t.block(t.layout_of(e))
    return OPAQUE


def _along_channels(node) -> bool:
    return node._saved_dim in (1, -3)


def _cat(t: _Trace, node, edges: list, first: Layout) -> Layout:
    if not _along_channels(node):
        return _unfollowed(t, node, edges, first)
    parts = [t.layout_of(e) for e in edges]
    return OPAQUE if OPAQUE in parts else [c for part in parts for c in part]


def _split(t: _Trace, node, edges: list, first: Layout) -> Layout:
    """A split a module's own code makes is recorded (its sizes are replayed after pruning); one
    made elsewhere is not followed."""
    if not _along_channels(node):
        return _unfollowed(t, node, edges, first)
    if first == OPAQUE:
        return OPAQUE
    if node not in t.split_owner:
        t.block(first)
        return OPAQUE
    sizes = getattr(node, "_saved_split_sizes", None)
    if sizes is None:
        step = node._saved_split_size
        sizes = [min(step, len(first) - s) for s in range(0, len(first), step)]
    start, segments = 0, []
    for k, size in enumerate(sizes):
        segments.append(first[start : start + size])
        t.layouts[(node, k)] = segments[-1]
        start += size
    t.graph.splits.append(Split(*t.split_owner[node], segments))
    return segments[0]


def _add(t: _Trace, node, edges: list, first: Layout) -> Layout:
    """A residual add ties channel i of both inputs."""
    if len(edges) != 2:
        return _unfollowed(t, node, edges, first)
    a, b = t.layout_of(edges[0]), t.layout_of(edges[1])
    if OPAQUE in (a, b) or len(a) != len(b):
        t.block(a)
        t.block(b)
        return OPAQUE
    for ca, cb in zip(a, b, strict=True):
        if ca is None or cb is None:
            t.block([ca, cb])
        else:
            t.graph.tie(ca, cb)
    return a


_HANDLERS = {
    "ConvolutionBackward0": _conv,
    "CatBackward0": _cat,
    "SplitBackward0": _split,
    "SplitWithSizesBackward0": _split,
    "AddBackward0": _add,
}


def _handler(kind: str) -> Callable:
    if kind in _HANDLERS:
        return _HANDLERS[kind]
    if "BatchNorm" in kind:
        return _batchnorm
    if kind.startswith(_PASS_THROUGH):
        return _pass_through
    return _unfollowed


def trace(model: nn.Module, imgsz: int = 64, outputs: OutputExtractor = tensors_in) -> ChannelGraph:
    """Trace a network on random ``imgsz`` images and return its channel graph.

    ``outputs`` gives the prediction tensors of the forward's output: their channels are kept.
    A module whose code reads its input's width, which autograd does not show, is found by
    :func:`stages.compress.pruning.surgery.keep_width_readers`, the step after this one.
    """
    traced = deepcopy(model).float().train()  # train mode: detection heads return raw level maps
    for p in traced.parameters():
        p.requires_grad_(True)
    modules = dict(traced.named_modules())
    param_names = {id(p): n for n, m in modules.items() for p in m.parameters(recurse=False)}
    recorder = _SplitRecorder()
    with running_modules(traced, recorder.entered) as recorder.running, recorder:
        predictions = outputs(traced(torch.randn(2, 3, imgsz, imgsz)))

    t = _Trace(ChannelGraph(outputs=outputs), modules, param_names, recorder.owner)
    for node in _topological(predictions):
        edges = [e for e in node.next_functions if type(e[0]).__name__ != "AccumulateGrad"]
        first = t.layout_of(edges[0]) if edges else OPAQUE
        t.layouts[(node, 0)] = _handler(type(node).__name__)(t, node, edges, first)

    graph = t.graph
    for p in predictions:  # the prediction convolutions keep their outputs
        t.block(t.layouts.get((p.grad_fn, 0), OPAQUE))
    for name in graph.convs:  # channels with no BatchNorm have no importance score
        if name not in graph.bn_after:
            graph.blocked.update((name, i) for i in range(graph.convs[name].out_channels))
    graph.callees = dict(recorder.callees)
    for name, edges in recorder.inputs.items():
        entering = [t.layout_of(e) for e in edges]
        graph.module_inputs[name] = {c for lay in entering if lay != OPAQUE for c in lay if c}
    return graph
