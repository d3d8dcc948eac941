"""Stage `prune`: remove the channels with the smallest BatchNorm scales, for real.

The model's channel dependencies are found by one general mechanism: a forward pass is traced
through autograd's graph, and every operation says what it does to channels. A convolution starts
a new channel space (and consumes its input's channels), BatchNorm, activations, pooling and
upsampling pass channels through, a concat along channels joins spaces, a split along channels
slices them, and an elementwise add ties channel i of one input to channel i of the other (a
residual). Anything else, and every channel that reaches a model output, is kept as it is. That
covers YOLOv8's C2f bottlenecks (tied residual channels), C2f's split and concat, SPPF, the neck's
upsample + concat and the Detect head, at any scale and class count, with no list of layers.

Channels are removed in tied groups: a group is the set of conv output channels an add ties
together, ranked by the largest |gamma| among its members. ``global`` removes the lowest-ranked
groups over the whole network until ``ratio`` of the prunable conv channels are gone (network
slimming); ``uniform`` removes ``ratio`` of each channel space. Per space, ``min_channels`` keeps
layers alive, ``max_layer_ratio`` caps what it may lose and the kept count is rounded up to a
multiple of ``round_to``. ``importance: gamma_per_flop`` ranks by |gamma| per MAC saved instead.
With a ``budget`` (params, GFLOPs or a latency measured here) the ratio is searched, not read: the
smallest one whose plan meets the target (stages/common/budget.py).

A removed channel still emitted a constant (act(beta) when gamma is 0): its mean value at every
consumer convolution is folded into that convolution's bias, or its BatchNorm's running mean, so
the network's output does not change. This is exact for 1x1 consumers and for the interior of
larger kernels; at the one-pixel border of a zero-padded kxk convolution the constant met padding
zeros, so a channel with gamma = 0 and act(beta) != 0 changes border outputs slightly.

Reads: models/sparse.pt. Writes: models/pruned.pt (an ultralytics checkpoint that loads with
``YOLO(path)``), reports/prune/{prune.json, channels.csv, channels.png}.
"""

from __future__ import annotations

import math
import shutil
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from ultralytics.nn.modules import C2f, Detect
from ultralytics.nn.tasks import DetectionModel

from stages.common import budget, cli, timing, yolo
from stages.common import params as P
from stages.common.export import build_engine, export_model_onnx, tensorrt_unavailable
from stages.common.images import VAL_IMAGES, calibration_batch
from stages.common.layers import C2fSplit
from stages.common.outputs import (
    atomic_path,
    print_summary,
    save_figure,
    write_csv,
    write_json,
    written,
)
from stages.common.runtime import PROJECT_ROOT, TMP_DIR

SPARSE = PROJECT_ROOT / "models" / "sparse.pt"
MODEL_OUT = PROJECT_ROOT / "models" / "pruned.pt"
REPORT_DIR = PROJECT_ROOT / "reports" / "prune"
NOT_SPARSE_GAMMA = 0.1  # pruning a channel with a larger |gamma| removes real signal

# Where a latency budget is measured; TensorRT candidates are fp16 engines on GPU 0.
RUNTIMES = ("onnxruntime-cpu", "torch-cpu", "tensorrt")
LATENCY_WARMUP, LATENCY_REPEATS = 10, 50  # per candidate of a latency search (as evaluate)
LATENCY_STEPS = 8  # bisection steps of a latency search (each builds and times a model)
LATENCY_OPSET = 17  # the ONNX opset of onnxruntime-cpu candidates

SCHEMA = {
    "imgsz": P.COMMON["imgsz"],
    "device": P.COMMON["device"],
    "prune": P.Section(
        {
            "ratio": P.Float(0, 1, open_lo=True, open_hi=True),
            "method": P.Choice("global", "uniform"),
            "min_channels": P.Int(1, 4096),
            "round_to": P.Int(1, 256),
            "max_layer_ratio": P.Float(0, 1, open_lo=True),
            "importance": P.Choice("gamma", "gamma_per_flop"),
            "head": P.Bool(),
            "calibration_images": P.Int(1, 10_000),
            "budget": P.Section(
                {
                    "params_m": P.Optional(P.Float(0, open_lo=True)),
                    "gflops": P.Optional(P.Float(0, open_lo=True)),
                    "latency_ms": P.Optional(P.Float(0, open_lo=True)),
                    "runtime": P.Choice(*RUNTIMES),
                }
            ),
        }
    ),
}
BUDGETS = ("params_m", "gflops", "latency_ms")

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


def make_prunable(model: nn.Module) -> nn.Module:
    """Swap every C2f for C2fSplit in place (same weights, same output)."""
    for module in model.modules():
        if type(module) is C2f:
            module.__class__ = C2fSplit
            module.split_sizes = [module.c, module.c]
    return model


# --- tracing the channel graph ---------------------------------------------------------------


@dataclass
class ChannelGraph:
    """What the trace found: convs, their inputs' channels, BNs, ties and blocked channels."""

    convs: dict[str, nn.Conv2d] = field(default_factory=dict)
    inputs: dict[str, list[ChannelId | None]] = field(default_factory=dict)
    bn_after: dict[str, str] = field(default_factory=dict)  # conv -> BatchNorm on its output
    blocked: set[ChannelId] = field(default_factory=set)
    parent: dict[ChannelId, ChannelId] = field(default_factory=dict)  # union-find of ties
    splits: list[list[list[ChannelId | None]]] = field(default_factory=list)  # segments per split

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


def _prediction_tensors(out: object) -> list[torch.Tensor]:
    """The prediction tensors of a training-mode forward (ultralytics returns nested dicts).

    "feats" holds the neck's maps, returned beside the predictions for the loss: they are not
    outputs whose channels must be kept.
    """
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k, v in out.items() if k != "feats" for t in _prediction_tensors(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in _prediction_tensors(v)]
    return []


def trace(model: nn.Module, imgsz: int = 64) -> ChannelGraph:
    """Trace a (C2fSplit-converted) detection model and return its channel graph."""
    traced = deepcopy(model).float().train()  # train mode: Detect returns its raw level maps
    for p in traced.parameters():
        p.requires_grad_(True)
    modules = dict(traced.named_modules())
    owner = {id(p): name for name, m in modules.items() for p in m.parameters(recurse=False)}
    outputs = _prediction_tensors(traced(torch.randn(2, 3, imgsz, imgsz)))

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
            if first != OPAQUE:
                sizes = getattr(node, "_saved_split_sizes", None)
                if sizes is None:
                    step = node._saved_split_size
                    sizes = [min(step, len(first) - s) for s in range(0, len(first), step)]
                start, segments = 0, []
                for k, size in enumerate(sizes):
                    segments.append(first[start : start + size])
                    layouts[(node, k)] = segments[-1]
                    start += size
                graph.splits.append(segments)
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
    return graph


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
    """Remove the channels in ``removed`` from ``model`` in place, folding their constants."""
    modules = dict(model.named_modules())
    consumers = {n for n, ins in graph.inputs.items() if any(c in removed for c in ins if c)}
    means = input_means(model, consumers, images)
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
    for module in model.modules():  # C2fSplit halves follow the kept channels
        if isinstance(module, C2fSplit):
            cv1 = next(n for n, m in modules.items() if m is module.cv1.conv)
            for segments in graph.splits:
                if segments[0] and segments[0][0] is not None and segments[0][0][0] == cv1:
                    module.split_sizes = [sum(c not in removed for c in s) for s in segments]
                    module.c = module.split_sizes[1]


# --- the stage ---------------------------------------------------------------------------------


def bn_gammas(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: m.weight.detach().clone()
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
    }


def not_sparse_warning(largest_removed: float) -> str | None:
    """A warning when pruning removed channels whose scale was far from zero."""
    if largest_removed <= NOT_SPARSE_GAMMA:
        return None
    return (
        f"removed channels had |gamma| up to {largest_removed:.3g} (> {NOT_SPARSE_GAMMA}): the "
        f"model's gammas are not sparse (was it sparse-trained?), expect a large accuracy drop"
    )


def conv_channels(model: nn.Module, graph: ChannelGraph) -> dict[str, int]:
    modules = dict(model.named_modules())
    return {name: modules[name].out_channels for name in graph.convs}


def plot_channels(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.22), 4))
    xs = range(len(rows))
    ax.bar(xs, [r["before"] for r in rows], color="lightgray", label="before")
    ax.bar(xs, [r["after"] for r in rows], color="tab:blue", label="kept")
    ax.set_xticks(list(xs), [r["layer"] for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("output channels")
    ax.legend()
    save_figure(fig, path)


def active_budget(cfg: dict) -> tuple[str, float] | None:
    """The one target set under prune.budget, or None: prune by prune.ratio."""
    given = [(key, cfg["budget"][key]) for key in BUDGETS if cfg["budget"][key] is not None]
    if len(given) > 1:
        raise P.ParamsError(
            f"params.yaml: prune.budget sets {' and '.join(k for k, _ in given)}: set one of "
            f"{', '.join(BUDGETS)} (the others null), or all null to prune by prune.ratio."
        )
    return given[0] if given else None


def latency_measure(
    model: nn.Module, graph: ChannelGraph, runtime: str, imgsz: int, device: str, work: Path
) -> Callable[[set[ChannelId]], float]:
    """A function giving the median latency (ms, one image, fp32; fp16 on TensorRT) of ``model``
    with some channels removed, on ``runtime`` on this machine: each call cuts a copy and times
    it, exported to ``work`` for ONNX Runtime and TensorRT."""
    if runtime == "tensorrt" and (reason := tensorrt_unavailable(device)):
        raise cli.UserError(
            f"params.yaml: prune.budget.runtime = 'tensorrt' cannot be measured here: {reason}. "
            f"Run the search on the GPU box, or use onnxruntime-cpu, torch-cpu or a gflops budget."
        )
    shapes_only = torch.rand(1, 3, 64, 64)  # folding needs some images; speed needs none

    def measure(removed: set[ChannelId]) -> float:
        candidate = deepcopy(model)
        apply(candidate, graph, removed, shapes_only)
        if runtime == "torch-cpu":
            run = timing.torch_runner(candidate.fuse(verbose=False), imgsz, "cpu")
        else:
            export_model_onnx(candidate, work / "candidate.onnx", imgsz, 1, LATENCY_OPSET)
            if runtime == "tensorrt":
                build_engine(work / "candidate.onnx", work / "candidate.engine", "fp16", 4.0)
                run = timing.engine_runner(work / "candidate.engine", [1, 3, imgsz, imgsz])
            else:
                run = timing.onnx_runner(work / "candidate.onnx", [1, 3, imgsz, imgsz])
        times = timing.latency_ms({"candidate": run}, LATENCY_WARMUP, LATENCY_REPEATS)
        return statistics.median(times["candidate"])

    return measure


def choose_plan(
    model: nn.Module,
    graph: ChannelGraph,
    gammas: dict[str, torch.Tensor],
    params: dict,
    skip: tuple[str, ...],
) -> tuple[PrunePlan, dict]:
    """The plan at prune.ratio, or at the smallest ratio that meets prune.budget; and how the
    ratio was chosen (for prune.json). ``params`` is the validated SCHEMA."""
    cfg, imgsz = params["prune"], params["imgsz"]
    target = active_budget(cfg)
    cost_aware = cfg["importance"] == "gamma_per_flop"
    shapes = budget.conv_shapes(model, imgsz) if target or cost_aware else {}
    macs_saved = budget.channel_macs(shapes, graph.inputs) if cost_aware else None

    def plan_at(ratio: float) -> PrunePlan:
        return plan(
            graph,
            gammas,
            ratio,
            cfg["method"],
            cfg["min_channels"],
            cfg["round_to"],
            skip,
            cfg["max_layer_ratio"],
            macs_saved,
        )

    if target is None:
        return plan_at(cfg["ratio"]), {"ratio": cfg["ratio"], "ratio_from": "prune.ratio"}
    key, value = target
    work = TMP_DIR / "prune-latency"
    try:
        if key == "latency_ms":
            work.mkdir(parents=True, exist_ok=True)
            runtime = cfg["budget"]["runtime"]
            measure = latency_measure(model, graph, runtime, imgsz, params["device"], work)
            unpruned_ms = measure(set())
            found = budget.smallest_ratio_within(
                lambda ratio: measure(plan_at(ratio).removed), value, unpruned_ms, LATENCY_STEPS
            )
        else:  # exact: counted on the plan, no model is cut

            def value_at(removed: set[ChannelId]) -> float:
                params_count, macs = budget.pruned_cost(shapes, graph.inputs, removed)
                return params_count / 1e6 if key == "params_m" else 2 * macs / 1e9

            found = budget.smallest_ratio_within(
                lambda ratio: value_at(plan_at(ratio).removed), value, value_at(set())
            )
    except budget.AlreadyMet as err:
        raise cli.UserError(
            f"params.yaml: prune.budget.{key} = {value} is already met by the unpruned model "
            f"({err.unpruned:.4g}): there is nothing to prune for. Set a value below "
            f"{err.unpruned:.4g}, or null to prune by prune.ratio."
        ) from None
    except budget.Unreachable as err:
        raise cli.UserError(
            f"params.yaml: prune.budget.{key} = {value} cannot be met: pruned by "
            f"{cfg['method']} with min_channels {cfg['min_channels']}, round_to "
            f"{cfg['round_to']} and max_layer_ratio {cfg['max_layer_ratio']}, this model reaches "
            f"{err.smallest:.4g} at the smallest and is {err.largest:.4g} unpruned. Set a value "
            f"in [{err.smallest:.4g}, {err.largest:.4g}), or relax those params."
        ) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    how = {
        "ratio": found.ratio,
        "ratio_from": f"searched for prune.budget.{key}",
        "budget_key": key,
        "budget_target": value,
        "budget_achieved": float(f"{found.achieved:.6g}"),
    }
    if key == "latency_ms":  # measured, so recorded: ratio -> median ms
        how["latency_runtime"] = cfg["budget"]["runtime"]
        how["latency_measured_ms"] = [
            {"ratio": r, "ms": round(v, 3)} for r, v in sorted([(0.0, unpruned_ms), *found.tried])
        ]
    return plan_at(found.ratio), how


def main() -> None:
    params = P.load(SCHEMA)
    cfg = params["prune"]
    imgsz = params["imgsz"]
    active_budget(cfg)  # two budgets at once: a params error before any work
    detector = yolo.load_detector(SPARSE)
    model = make_prunable(detector.model.float().eval())
    graph = trace(model)
    skip = () if cfg["head"] else (detect_prefix(model),)
    gammas = bn_gammas(model)
    chosen, how = choose_plan(model, graph, gammas, params, skip)
    before_size = yolo.model_size(model, imgsz)
    before_channels = conv_channels(model, graph)
    largest_removed = largest_gamma(graph, gammas, chosen.removed)

    apply(
        model,
        graph,
        chosen.removed,
        calibration_batch(VAL_IMAGES, cfg["calibration_images"], imgsz),
    )
    after_size = yolo.model_size(model, imgsz)
    after_channels = conv_channels(model, graph)

    checkpoint = {
        **detector.ckpt,
        "model": deepcopy(model).half(),
        "ema": None,
        "optimizer": None,
        "updates": None,
    }
    with atomic_path(MODEL_OUT) as tmp:
        torch.save(checkpoint, tmp)
    pruned = yolo.load_detector(MODEL_OUT)
    ap50 = yolo.val_ap50(pruned, "prune", params)

    capped = [" + ".join(s.convs) for s in chosen.spaces if s.capped]
    metrics = {
        **how,
        "ratio_achieved": round(chosen.removed_prunable / max(chosen.prunable, 1), 4),
        "params_before_m": round(before_size["params"] / 1e6, 4),
        "params_after_m": round(after_size["params"] / 1e6, 4),
        "params_reduction": round(1 - after_size["params"] / before_size["params"], 4),
        "gflops_before": round(before_size["flops_g"], 4),
        "gflops_after": round(after_size["flops_g"], 4),
        "gmacs_before": round(before_size["macs_g"], 4),
        "gmacs_after": round(after_size["macs_g"], 4),
        "ap50_after_prune": round(ap50, 4),
        "largest_removed_gamma": round(largest_removed, 6),
        "capped_spaces": len(capped),
    }
    write_json(REPORT_DIR / "prune.json", metrics)
    rows = [
        {
            "layer": name.removesuffix(".conv"),
            "before": before_channels[name],
            "after": after_channels[name],
        }
        for name in graph.convs
    ]
    write_csv(REPORT_DIR / "channels.csv", rows)
    plot_channels(rows, REPORT_DIR / "channels.png")

    lines = []
    if "budget_key" in how:
        where = f" on {how['latency_runtime']}" if "latency_runtime" in how else ""
        lines.append(
            (
                f"budget {how['budget_key']}{where}",
                f"target {how['budget_target']:g}, achieved {how['budget_achieved']:g} at the "
                f"ratio found by bisection",
            )
        )
    lines += [
        (
            f"ratio ({how['ratio_from']}) / achieved",
            f"{how['ratio']:.4f} / {metrics['ratio_achieved']:.3f} of {chosen.prunable} "
            f"prunable channels ({cfg['method']}, ranked by {cfg['importance']})",
        ),
        (
            "params (fused)",
            f"{metrics['params_before_m']:.3f} M -> {metrics['params_after_m']:.3f} M "
            f"(-{metrics['params_reduction']:.1%})",
        ),
        (
            f"GFLOPs / GMACs at {imgsz}",
            f"{metrics['gflops_before']:.3f} -> "
            f"{metrics['gflops_after']:.3f} / {metrics['gmacs_before']:.3f}"
            f" -> {metrics['gmacs_after']:.3f} (FLOPs = 2 x MACs)",
        ),
        ("val AP50 right after pruning", f"{ap50:.3f}"),
        ("largest |gamma| removed", f"{largest_removed:.4g}"),
    ]
    if capped:
        lines.append(
            (
                "kept by min_channels/max_layer_ratio/round_to",
                f"{len(capped)} spaces, e.g. {capped[0]}",
            )
        )
    warning = not_sparse_warning(largest_removed)
    if warning:
        lines.append(("WARNING", warning))
    lines.append(written(MODEL_OUT, REPORT_DIR))
    print_summary("prune", lines)


def uniformly_pruned(cfg: str, ratios: Iterable[float]) -> Iterator[tuple[float, nn.Module]]:
    """A freshly built ``cfg`` (10 classes) as it is (ratio 0.0), then pruned uniformly at each
    ratio; each model is a new copy.

    Uniform pruning of a fresh model: its shapes (and so its size and speed) depend only on the
    ratio, not on weights, which is what a size budget or a speed benchmark needs.
    """
    base = make_prunable(DetectionModel(cfg, nc=10, verbose=False).eval())
    yield 0.0, deepcopy(base)
    graph = trace(base)
    for ratio in ratios:
        model = deepcopy(base)
        chosen = plan(graph, bn_gammas(model), ratio, "uniform", 8, 8)
        apply(model, graph, chosen.removed, torch.rand(1, 3, 64, 64))
        yield ratio, model


if __name__ == "__main__":
    cli.run(main, __doc__)
