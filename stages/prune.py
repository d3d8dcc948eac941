"""Stage `prune`: remove the channels with the smallest BatchNorm scales, for real.

The algorithm (the channel trace, the plan and the surgery) is stages/common/pruning.py; this
stage reads the sparse model, chooses the ratio (prune.ratio, or the smallest ratio that meets
prune.budget: params, GFLOPs or a latency measured here, see stages/common/budget.py), folds the
removed channels' means over training images and writes the pruned model and its report.

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

from stages.common import budget, cli, timing, yolo
from stages.common import params as P
from stages.common.export import build_engine, export_model_onnx, tensorrt_unavailable
from stages.common.images import TRAIN_IMAGES, calibration_batch
from stages.common.outputs import (
    atomic_path,
    print_summary,
    save_figure,
    write_csv,
    write_json,
    written,
)
from stages.common.pruning import (
    ChannelGraph,
    ChannelId,
    PrunePlan,
    apply,
    bn_gammas,
    detect_prefix,
    largest_gamma,
    plan,
    trace,
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

# --- the stage ---------------------------------------------------------------------------------


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
    model = detector.model.float().eval()
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
        calibration_batch(TRAIN_IMAGES, cfg["calibration_images"], imgsz),
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


if __name__ == "__main__":
    cli.run(main, __doc__)
