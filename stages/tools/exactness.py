"""Can this detector be pruned, and exactly? Check a config before training anything.

    python -m stages.tools.exactness yolov8n.yaml yolo11n.yaml my_detector.yaml

For each ultralytics detection config (10 classes, random weights and random BatchNorm scales):
trace it, plan a global prune at ``--ratio``, set gamma and beta of every channel the plan removes
to 0 (so those channels emit exactly 0, as after ideal sparse training), cut them for real, and
compare every prediction on random images. The surgery is exact when the largest difference is
~1e-7 of the outputs' scale (float rounding); a structure the surgery cannot handle is refused
with the module it failed at.

Reads only the configs (ultralytics' own, or .yaml files you name); no data, no checkpoint. Prints
a table (params before -> after, modules whose channel splits were resized, largest difference)
and writes it to --out if given.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from ultralytics.nn.tasks import DetectionModel

from stages.compress.pruning import importance, surgery
from stages.compress.pruning.dependency import ChannelGraph, ChannelId, UnprunableError
from stages.pipeline import cli
from stages.pipeline.outputs import atomic_path, print_summary
from stages.pipeline.params import ParamsError
from stages.yolo.heads import prediction_tensors
from stages.yolo.models import check_detector_config
from stages.yolo.pruning import channel_graph


def random_detector(config: str, seed: int) -> DetectionModel:
    """``config`` with 10 classes, random weights and random BN scales, shifts and statistics (a
    fresh model's scales are all 1: every ranking would be a tie)."""
    torch.manual_seed(seed)
    model = DetectionModel(config, nc=10, verbose=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def silence(model: nn.Module, graph: ChannelGraph, channels: set[ChannelId]) -> None:
    """Set gamma and beta of each channel's BatchNorm to 0: the channel then emits exactly 0."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for conv, i in channels:
            modules[graph.bn_after[conv]].weight[i] = 0.0
            modules[graph.bn_after[conv]].bias[i] = 0.0


def exactness(config: str, ratio: float = 0.5, seed: int = 0) -> dict:
    """Prune ``config`` as the module docstring says; the outputs before and after, and sizes."""
    model = random_detector(config, seed)
    graph = channel_graph(model)
    removed = importance.plan(graph, importance.bn_gammas(model), ratio, "global", 8, 8).removed
    silence(model, graph, removed)
    x = torch.rand(2, 3, 128, 192)  # every stride up to P6's 64 divides both sides
    with torch.no_grad():
        before = prediction_tensors(model(x))
    params_before = sum(p.numel() for p in model.parameters())
    surgery.remove_channels(model, graph, removed, torch.rand(2, 3, 64, 64))
    with torch.no_grad():
        after = prediction_tensors(model.eval()(x))
    return {
        "before": before,
        "after": after,
        "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()),
        "resized_splits": sum(hasattr(m, "pruned_splits") for m in model.modules()),
    }


def relative_difference(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """The largest |after - before| of each output over its largest |before|, over outputs."""
    return max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
        for a, b in zip(after, before, strict=True)
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("configs", nargs="+", help="ultralytics detection configs (.yaml)")
    parser.add_argument("--ratio", type=float, default=0.5, help="global prune ratio (0.5)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    for config in args.configs:
        try:
            check_detector_config("config", config)
        except ParamsError as err:  # a command-line argument here, not a param
            raise cli.UserError(str(err).removeprefix("params.yaml: ")) from None
    rows = [
        "| model | params before (M) | after (M) | resized splits | max difference | s |",
        "|---|---|---|---|---|---|",
    ]
    for config in args.configs:
        start = time.perf_counter()
        try:
            result = exactness(config, args.ratio)
        except UnprunableError as err:
            rows.append(f"| {config} | refused: {err} | | | | |")
            continue
        rows.append(
            f"| {config} | {result['params_before'] / 1e6:.3f} "
            f"| {result['params_after'] / 1e6:.3f} "
            f"| {result['resized_splits']} "
            f"| {relative_difference(result['before'], result['after']):.1e} "
            f"| {time.perf_counter() - start:.1f} |"
        )
    table = "\n".join(rows) + "\n"
    print(table)
    if args.out:
        command = " ".join(["python -m stages.tools.exactness", *args.configs])
        how = (
            f"`{command}`{'' if args.ratio == 0.5 else f' --ratio {args.ratio}'}: random weights "
            f"and BatchNorm scales, 10 classes, a global prune at {args.ratio} with the removed "
            f"channels' gamma = beta = 0, every prediction on random 128x192 images compared. "
            f"Max difference: the largest change of an output over its largest value (~1e-7, "
            f"float rounding, is exact); s: seconds for the model.\n\n"
        )
        with atomic_path(args.out) as tmp:
            tmp.write_text(how + table)
    print_summary(
        "exactness",
        [
            ("how", f"global prune at {args.ratio}, the removed channels' gamma = beta = 0"),
            (
                "max difference",
                "relative to each output's largest value; ~1e-7 (float rounding) is exact",
            ),
        ],
    )


if __name__ == "__main__":
    cli.run(main)
