"""Stage `prune`: remove the channels with the smallest BatchNorm scales, for real.

The algorithm is stages/compress/pruning/ (trace, plan, surgery, budget); this stage reads the
sparse model, chooses the ratio (prune.ratio, or the smallest ratio that meets prune.budget:
params, GFLOPs or a latency measured here), folds the removed channels' means over training
images and writes the pruned model and its report.

Reads: models/sparse.pt. Writes: models/pruned.pt (an ultralytics checkpoint that loads with
``YOLO(path)``), reports/prune/{prune.json, channels.csv, channels.png}.
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import torch
from torch import nn

from stages.compress.pruning import budget, importance, surgery
from stages.compress.pruning.dependency import ChannelGraph, ChannelId
from stages.compress.pruning.importance import PrunePlan
from stages.deploy import openvino, timing
from stages.deploy.export import build_engine, export_model_onnx, tensorrt_unavailable
from stages.pipeline import cli
from stages.pipeline.images import TRAIN_IMAGES, calibration_batch
from stages.pipeline.outputs import (
    atomic_path,
    print_summary,
    save_figure,
    write_csv,
    write_json,
    written,
)
from stages.pipeline.params import (
    COMMON,
    Bool,
    Choice,
    Float,
    Int,
    Optional,
    ParamsError,
    Section,
    load,
)
from stages.pipeline.runtime import PROJECT_ROOT, TMP_DIR
from stages.yolo.heads import detect_prefix
from stages.yolo.models import load_detector, model_size
from stages.yolo.pruning import channel_graph
from stages.yolo.validation import val_ap50

SPARSE = PROJECT_ROOT / "models" / "sparse.pt"
MODEL_OUT = PROJECT_ROOT / "models" / "pruned.pt"
REPORT_DIR = PROJECT_ROOT / "reports" / "prune"
NOT_SPARSE_GAMMA = 0.1  # pruning a channel with a larger |gamma| removes real signal
NEAR_ZERO_GAMMA = 0.01  # a channel below this is near zero: removing it is (nearly) free

# Where a latency budget is measured; TensorRT candidates are fp16 engines on GPU 0.
RUNTIMES = ("onnxruntime-cpu", "openvino-cpu", "torch-cpu", "tensorrt")
LATENCY_WARMUP, LATENCY_REPEATS = 10, 50  # per candidate of a latency search (as evaluate)
LATENCY_STEPS = 8  # bisection steps of a latency search (each builds and times a model)
LATENCY_OPSET = 17  # the ONNX opset of onnxruntime-cpu candidates
BUDGETS = (*budget.COUNTED, "latency_ms")

SCHEMA = {
    "imgsz": COMMON["imgsz"],
    "device": COMMON["device"],
    "prune": Section(
        {
            "ratio": Float(0, 1, open_lo=True, open_hi=True),
            "method": Choice("global", "uniform"),
            "min_channels": Int(1, 4096),
            "round_to": Int(1, 256),
            "max_layer_ratio": Float(0, 1, open_lo=True),
            "importance": Choice("gamma", "gamma_per_flop"),
            "head": Bool(),
            "calibration_images": Int(1, 10_000),
            "budget": Section(
                {
                    "params_m": Optional(Float(0, open_lo=True)),
                    "gflops": Optional(Float(0, open_lo=True)),
                    "latency_ms": Optional(Float(0, open_lo=True)),
                    "runtime": Choice(*RUNTIMES),
                }
            ),
        }
    ),
}


def not_sparse_warning(largest_removed: float) -> str | None:
    """A warning when pruning removed channels whose scale was far from zero."""
    if largest_removed <= NOT_SPARSE_GAMMA:
        return None
    return (
        f"removed channels had |gamma| up to {largest_removed:.3g} (> {NOT_SPARSE_GAMMA}): the "
        f"model's gammas are not sparse (was it sparse-trained?), expect a large accuracy drop"
    )


def active_budget(section: dict) -> tuple[str, float] | None:
    """The one target set under prune.budget, or None: prune by prune.ratio."""
    given = [(key, section["budget"][key]) for key in BUDGETS if section["budget"][key] is not None]
    if len(given) > 1:
        raise ParamsError(
            f"params.yaml: prune.budget sets {' and '.join(k for k, _ in given)}: set one of "
            f"{', '.join(BUDGETS)} (the others null), or all null to prune by prune.ratio."
        )
    return given[0] if given else None


def latency_measure(
    model: nn.Module, graph: ChannelGraph, runtime: str, imgsz: int, device: str, work: Path
) -> Callable[[set[ChannelId]], float]:
    """A function giving the median latency (ms, one image, fp32; fp16 on TensorRT) of ``model``
    with some channels removed, on ``runtime`` on this machine: each call cuts a copy and times
    it, exported to ``work`` for ONNX Runtime, OpenVINO and TensorRT."""
    if runtime == "tensorrt" and (reason := tensorrt_unavailable(device)):
        raise cli.UserError(
            f"params.yaml: prune.budget.runtime = 'tensorrt' cannot be measured here: {reason}. "
            f"Run the search on the GPU box, or use onnxruntime-cpu, openvino-cpu, torch-cpu or a "
            f"gflops budget."
        )
    shapes_only = torch.rand(1, 3, 64, 64)  # folding needs some images; speed needs none

    def measure(removed: set[ChannelId]) -> float:
        candidate = deepcopy(model)
        surgery.remove_channels(candidate, graph, removed, shapes_only)
        if runtime == "torch-cpu":
            run = timing.torch_runner(candidate.fuse(verbose=False), imgsz, "cpu")
        else:
            export_model_onnx(candidate, work / "candidate.onnx", imgsz, 1, LATENCY_OPSET)
            if runtime == "tensorrt":
                build_engine(work / "candidate.onnx", work / "candidate.engine", "fp16", 4.0)
                run = timing.engine_runner(work / "candidate.engine", [1, 3, imgsz, imgsz])
            elif runtime == "openvino-cpu":
                ir = openvino.write_ir(work / "candidate.onnx")
                run = timing.openvino_runner(ir, [1, 3, imgsz, imgsz])
            else:
                run = timing.onnx_runner(work / "candidate.onnx", [1, 3, imgsz, imgsz])
        times = timing.latency_ms({"candidate": run}, LATENCY_WARMUP, LATENCY_REPEATS)
        return statistics.median(times["candidate"])

    return measure


def budget_error(key: str, value: float, section: dict, err: ValueError) -> cli.UserError:
    """The params error for a budget the search could not meet (AlreadyMet or Unreachable)."""
    if isinstance(err, budget.AlreadyMet):
        return cli.UserError(
            f"params.yaml: prune.budget.{key} = {value} is already met by the unpruned model "
            f"({err.unpruned:.4g}): there is nothing to prune for. Set a value below "
            f"{err.unpruned:.4g}, or null to prune by prune.ratio."
        )
    return cli.UserError(
        f"params.yaml: prune.budget.{key} = {value} cannot be met: pruned by "
        f"{section['method']} with min_channels {section['min_channels']}, round_to "
        f"{section['round_to']} and max_layer_ratio {section['max_layer_ratio']}, this model "
        f"reaches {err.smallest:.4g} at the smallest and is {err.largest:.4g} unpruned. Set a "
        f"value in [{err.smallest:.4g}, {err.largest:.4g}), or relax those params."
    )


def search_ratio(
    target: tuple[str, float],
    plan_at: Callable[[float], PrunePlan],
    cost_of: Callable[[set[ChannelId]], float],
    section: dict,
) -> tuple[float, dict]:
    """The smallest ratio whose plan meets ``target`` (``cost_of`` a plan's removed channels),
    and the record of the search for prune.json."""
    key, value = target
    steps = LATENCY_STEPS if key == "latency_ms" else 30
    try:
        unpruned = cost_of(set())
        found = budget.smallest_ratio_within(
            lambda ratio: cost_of(plan_at(ratio).removed), value, unpruned, steps
        )
    except (budget.AlreadyMet, budget.Unreachable) as err:
        raise budget_error(key, value, section, err) from None
    record = {
        "ratio": found.ratio,
        "ratio_from": f"searched for prune.budget.{key}",
        "budget_key": key,
        "budget_target": value,
        "budget_achieved": float(f"{found.achieved:.6g}"),
    }
    if key == "latency_ms":  # measured, so recorded: ratio -> median ms
        record["latency_runtime"] = section["budget"]["runtime"]
        record["latency_measured_ms"] = [
            {"ratio": r, "ms": round(v, 3)} for r, v in sorted([(0.0, unpruned), *found.tried])
        ]
    return found.ratio, record


def choose_plan(
    model: nn.Module,
    graph: ChannelGraph,
    gammas: dict[str, torch.Tensor],
    params: dict,
    skip: tuple[str, ...],
) -> tuple[PrunePlan, dict]:
    """The plan at prune.ratio, or at the smallest ratio that meets prune.budget; and where the
    ratio came from (for prune.json). ``params`` is the validated SCHEMA."""
    section, imgsz = params["prune"], params["imgsz"]
    target = active_budget(section)
    cost_aware = section["importance"] == "gamma_per_flop"
    shapes = budget.conv_shapes(model, imgsz) if target or cost_aware else {}
    macs_saved = budget.channel_macs(shapes, graph.inputs) if cost_aware else None

    def plan_at(ratio: float) -> PrunePlan:
        return importance.plan(
            graph,
            gammas,
            ratio,
            section["method"],
            section["min_channels"],
            section["round_to"],
            skip,
            section["max_layer_ratio"],
            macs_saved,
        )

    if target is None:
        return plan_at(section["ratio"]), {"ratio": section["ratio"], "ratio_from": "prune.ratio"}
    work = TMP_DIR / "prune-latency"
    try:
        if target[0] == "latency_ms":
            work.mkdir(parents=True, exist_ok=True)
            runtime = section["budget"]["runtime"]
            cost_of = latency_measure(model, graph, runtime, imgsz, params["device"], work)
        else:  # exact: counted on the plan, no model is cut
            cost_of = budget.counted_cost(shapes, graph.inputs, target[0])
        ratio, record = search_ratio(target, plan_at, cost_of, section)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return plan_at(ratio), record


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


def live_channels(graph: ChannelGraph, gammas: dict[str, torch.Tensor], channels: set) -> int:
    """How many of ``channels`` have |gamma| of at least NEAR_ZERO_GAMMA."""
    return sum(
        float(gammas[graph.bn_after[c]][i].abs()) >= NEAR_ZERO_GAMMA
        for c, i in channels
        if c in graph.bn_after
    )


def prune_metrics(
    record: dict, chosen: PrunePlan, before: dict, after: dict, ap50: float, gammas: tuple
) -> dict:
    """prune.json: where the ratio came from, what was removed (how many of those channels were
    not near zero), sizes before and after. ``gammas``: (graph, scales) of the sparse model."""
    graph, scales = gammas
    return {
        **record,
        "ratio_achieved": round(chosen.removed_prunable / max(chosen.prunable, 1), 4),
        "params_before_m": round(before["params"] / 1e6, 4),
        "params_after_m": round(after["params"] / 1e6, 4),
        "params_reduction": round(1 - after["params"] / before["params"], 4),
        "gflops_before": round(before["flops_g"], 4),
        "gflops_after": round(after["flops_g"], 4),
        "gmacs_before": round(before["macs_g"], 4),
        "gmacs_after": round(after["macs_g"], 4),
        "ap50_after_prune": round(ap50, 4),
        "largest_removed_gamma": round(importance.largest_gamma(graph, scales, chosen.removed), 6),
        "removed_live_channels": live_channels(graph, scales, chosen.removed),
        "capped_spaces": sum(s.capped for s in chosen.spaces),
    }


def summary_lines(metrics: dict, chosen: PrunePlan, section: dict, imgsz: int) -> list[tuple]:
    """The stage's one-screen summary."""
    lines = []
    if "budget_key" in metrics:
        where = f" on {metrics['latency_runtime']}" if "latency_runtime" in metrics else ""
        lines.append(
            (
                f"budget {metrics['budget_key']}{where}",
                f"target {metrics['budget_target']:g}, achieved {metrics['budget_achieved']:g} "
                f"at the ratio found by bisection",
            )
        )
    lines += [
        (
            f"ratio ({metrics['ratio_from']}) / achieved",
            f"{metrics['ratio']:.4f} / {metrics['ratio_achieved']:.3f} of {chosen.prunable} "
            f"prunable channels ({section['method']}, ranked by {section['importance']})",
        ),
        (
            "params (fused)",
            f"{metrics['params_before_m']:.3f} M -> {metrics['params_after_m']:.3f} M "
            f"(-{metrics['params_reduction']:.1%})",
        ),
        (
            f"GFLOPs / GMACs at {imgsz}",
            f"{metrics['gflops_before']:.3f} -> {metrics['gflops_after']:.3f} / "
            f"{metrics['gmacs_before']:.3f} -> {metrics['gmacs_after']:.3f} (FLOPs = 2 x MACs)",
        ),
        ("val AP50 right after pruning", f"{metrics['ap50_after_prune']:.3f}"),
        ("largest |gamma| removed", f"{metrics['largest_removed_gamma']:.4g}"),
    ]
    capped = [" + ".join(s.convs) for s in chosen.spaces if s.capped]
    if capped:
        lines.append(
            (
                "kept by min_channels/max_layer_ratio/round_to",
                f"{len(capped)} spaces, e.g. {capped[0]}",
            )
        )
    if metrics["removed_live_channels"]:
        lines.append(
            (
                f"removed with |gamma| >= {NEAR_ZERO_GAMMA:g}",
                f"{metrics['removed_live_channels']} of {len(chosen.removed)} channels: more than "
                f"are near zero. Lower prune.ratio, or raise sparse_train.target_sparsity above "
                f"the ratio achieved ({metrics['ratio_achieved']:.3f})",
            )
        )
    warning = not_sparse_warning(metrics["largest_removed_gamma"])
    if warning:
        lines.append(("WARNING", warning))
    return [*lines, written(MODEL_OUT, REPORT_DIR)]


def save_pruned(model: nn.Module, checkpoint: dict) -> None:
    """The pruned model as an ultralytics checkpoint (fp16, like ultralytics' own), atomically."""
    pruned = deepcopy(model).half()
    with atomic_path(MODEL_OUT) as tmp:
        torch.save(
            {**checkpoint, "model": pruned, "ema": None, "optimizer": None, "updates": None}, tmp
        )


def main() -> None:
    params = load(SCHEMA)
    section, imgsz = params["prune"], params["imgsz"]
    active_budget(section)  # two budgets at once: a params error before any work
    detector = load_detector(SPARSE)
    model = detector.model.float().eval()
    graph = channel_graph(model)
    skip = () if section["head"] else (detect_prefix(model),)
    gammas = importance.bn_gammas(model)
    chosen, record = choose_plan(model, graph, gammas, params, skip)
    before_size, before_channels = model_size(model, imgsz), conv_channels(model, graph)

    images = calibration_batch(TRAIN_IMAGES, section["calibration_images"], imgsz)
    surgery.remove_channels(model, graph, chosen.removed, images)
    after_size, after_channels = model_size(model, imgsz), conv_channels(model, graph)
    save_pruned(model, detector.ckpt)
    ap50 = val_ap50(load_detector(MODEL_OUT), "prune", params)

    metrics = prune_metrics(record, chosen, before_size, after_size, ap50, (graph, gammas))
    write_json(REPORT_DIR / "prune.json", metrics)
    rows = [
        {"layer": n.removesuffix(".conv"), "before": before_channels[n], "after": after_channels[n]}
        for n in graph.convs
    ]
    write_csv(REPORT_DIR / "channels.csv", rows)
    plot_channels(rows, REPORT_DIR / "channels.png")
    print_summary("prune", summary_lines(metrics, chosen, section, imgsz))


if __name__ == "__main__":
    cli.run(main, __doc__)
