"""Stage `sparse_train`: continue training the baseline with an L1 penalty on BatchNorm scales.

The penalty and its schedule are stages/compress/sparsity.py; the trainer that applies them is
stages/yolo/sparse_trainer.py (``SparseTrainer``). ``penalty`` picks the proximal step per
channel (``proximal``), per tied group of channels (``group``, the groups come from the channel
trace pruning uses) or the gradient subgradient; ``schedule`` picks constant, linear_decay or
dynamic, which aims at ``target_sparsity`` near-zero channels (|gamma| < ``near_zero``) while val
AP50 stays above ``ap50_floor`` x its start.

Reads: models/baseline.pt, data/yolo. Writes: models/sparse.pt, reports/sparse_train/results.csv
(ultralytics' per-epoch losses and val metrics plus the coefficient, the total |gamma| and the
near-zero fraction), reports/sparse_train/sparsity.json (metrics), gamma_hist.csv (|gamma|
histogram before/after on log-spaced bins, a DVC plot) and gamma_hist.png.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from ultralytics import YOLO

from stages.compress import sparsity
from stages.compress.pruning import budget
from stages.compress.pruning.dependency import ChannelGraph, trace
from stages.pipeline import cli
from stages.pipeline.outputs import print_summary, save_figure, write_csv, write_json, written
from stages.pipeline.params import COMMON, Choice, Float, ParamsError, Section, StrList, load
from stages.pipeline.runtime import PROJECT_ROOT
from stages.yolo.heads import prediction_tensors
from stages.yolo.models import load_detector
from stages.yolo.sparse_trainer import SparseTrainer
from stages.yolo.training import TRAINING, configured_trainer, train, training_args
from stages.yolo.validation import val_ap50

BASELINE = PROJECT_ROOT / "models" / "baseline.pt"
MODEL_OUT = PROJECT_ROOT / "models" / "sparse.pt"
REPORT_DIR = PROJECT_ROOT / "reports" / "sparse_train"

SCHEMA = {
    **COMMON,
    "sparse_train": Section(
        {
            **TRAINING,
            "warmup_bias_lr": Float(0, 1),
            "bn_lr0": Float(0, 1, open_lo=True),
            "penalty": Choice(*sparsity.FORMS),
            "weighting": Choice("uniform", "flops"),
            "schedule": Choice(*sparsity.SCHEDULES),
            "coefficient": Float(0, 1),
            "beta_coefficient": Float(0, 1),
            "near_zero": Float(0, 1, open_lo=True),
            "target_sparsity": Float(0, 1, open_lo=True, open_hi=True),
            "ap50_floor": Float(0, 1),
            "gain": Float(1, 100, open_lo=True),
            "exclude": StrList(),
        }
    ),
}


def sparse_trainer(
    section: dict,
    ap50_start: float,
    groups: dict[str, list[int]],
    weights: dict[str, list[float]] | None,
) -> type[SparseTrainer]:
    """The trainer for a validated ``sparse_train`` section, starting from AP50 ``ap50_start``;
    ``groups``: the tied group of every penalised BatchNorm channel; ``weights``: its penalty
    weight (None: uniform)."""
    schedule = sparsity.PenaltySchedule(
        section["schedule"],
        section["coefficient"],
        section["epochs"],
        section["target_sparsity"],
        section["ap50_floor"],
        section["gain"],
    )
    return configured_trainer(
        SparseTrainer,
        schedule=schedule,
        form=section["penalty"],
        bn_lr0=section["bn_lr0"],
        groups=groups,
        weights=weights,
        beta_coefficient=section["beta_coefficient"],
        near_zero=section["near_zero"],
        exclude=tuple(section["exclude"]),
        ap50_start=ap50_start,
    )


def plot_histogram(rows: list[dict], near_zero: float, path: Path) -> None:
    """Before and after, on a log |gamma| axis; the first bin (below 1e-4, exact zeros
    included) is drawn at its upper edge's half."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    centres = [r["gamma"] or sparsity.SMALLEST_EDGE / 2 for r in rows]
    for key, label in (("baseline", "baseline"), ("sparse", "after sparse training")):
        ax.step(centres, [r[key] for r in rows], where="mid", label=label)
    ax.axvline(
        near_zero, color="k", linestyle="--", linewidth=1, label=f"near zero ({near_zero:g})"
    )
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("|gamma| of BatchNorm channels (first bin: below 1e-4, zeros included)")
    ax.set_ylabel("channels")
    ax.legend()
    save_figure(fig, path)


def penalized(model: YOLO, exclude: list[str]) -> dict[str, int]:
    """The penalised BatchNorms (name -> channels); refuses prefixes that name no BatchNorm and
    an exclusion of every one."""
    names = [n for n, _ in sparsity.named_penalized_batchnorms(model.model)]
    for prefix in exclude:
        if not any(n.startswith(prefix) for n in names):
            raise ParamsError(
                f"params.yaml: sparse_train.exclude prefix {prefix!r} names no BatchNorm of the "
                f"model (they look like {names[0]!r}, e.g. 'model.22' for YOLOv8's "
                f"head): fix or remove it."
            )
    kept = {n: m.num_features for n, m in sparsity.named_penalized_batchnorms(model.model, exclude)}
    if not kept:
        raise ParamsError(
            f"params.yaml: sparse_train.exclude = {exclude!r} excludes every BatchNorm."
        )
    return kept


def macs_weights(
    model: YOLO, graph: ChannelGraph, sizes: dict[str, int], imgsz: int
) -> dict[str, list[float]]:
    """Each penalised channel's weight: the MACs its removal saves at ``imgsz``, normalised to
    mean 1 (a channel the trace did not reach gets the mean)."""
    saved = budget.channel_macs(budget.conv_shapes(model.model, imgsz), graph.inputs)
    conv_of = {bn: conv for conv, bn in graph.bn_after.items()}
    macs = [
        saved.get((conv_of[bn], i), np.nan) if bn in conv_of else np.nan
        for bn, size in sizes.items()
        for i in range(size)
    ]
    macs = np.nan_to_num(macs, nan=np.nanmean(macs))
    flat = sparsity.flops_weights(macs).tolist()
    out, start = {}, 0
    for bn, size in sizes.items():
        out[bn], start = flat[start : start + size], start + size
    return out


def penalty_layout(
    model: YOLO, section: dict, imgsz: int
) -> tuple[dict[str, int], dict[str, list[int]], dict[str, list[float]] | None]:
    """The penalised BatchNorms (name -> channels), the tied group of each of their channels
    (from the channel trace pruning uses) and, for ``weighting: flops``, each channel's weight."""
    sizes = penalized(model, section["exclude"])
    graph = trace(model.model, outputs=prediction_tensors)
    weights = macs_weights(model, graph, sizes, imgsz) if section["weighting"] == "flops" else None
    return sizes, graph.batchnorm_groups(sizes), weights


def epoch_ap50(results: Path) -> list[float]:
    """Val AP50 after each epoch, from the run's results.csv."""
    with results.open() as f:
        return [float(row["metrics/mAP50(B)"]) for row in csv.DictReader(f, skipinitialspace=True)]


def sparsity_metrics(
    gammas: tuple[np.ndarray, np.ndarray],
    groups: np.ndarray,
    near_zero: float,
    ap50: tuple[float, float],
    per_epoch: list[float],
) -> dict:
    """sparsity.json: near-zero fractions per channel and per tied group, total |gamma| and val
    AP50, before and after, and the worst epoch's AP50 against the start."""
    stats = [sparsity.sparsity_stats(g, near_zero) for g in gammas]
    grouped = [sparsity.group_near_zero(g, groups, near_zero) for g in gammas]
    return {
        "near_zero_before": round(stats[0]["near_zero"], 4),
        "near_zero_after": round(stats[1]["near_zero"], 4),
        "group_near_zero_before": round(grouped[0], 4),
        "group_near_zero_after": round(grouped[1], 4),
        "gamma_l1_before": round(stats[0]["gamma_l1"], 2),
        "gamma_l1_after": round(stats[1]["gamma_l1"], 2),
        "ap50_before": round(ap50[0], 4),
        "ap50_after": round(ap50[1], 4),
        "ap50_retained": round(ap50[1] / max(ap50[0], 1e-9), 4),
        "worst_epoch_ap50_retained": round(min(per_epoch) / max(ap50[0], 1e-9), 4),
        "channels": int(gammas[1].size),
        "groups": int(groups.max()) + 1,
    }


def main() -> None:
    params = load(SCHEMA)
    section = params["sparse_train"]
    args = {**training_args(params, section), "warmup_bias_lr": section["warmup_bias_lr"]}
    model = load_detector(BASELINE)
    sizes, groups, weights = penalty_layout(model, section, params["imgsz"])
    group_of = np.array([g for name in sizes for g in groups[name]])
    bns = sparsity.penalized_batchnorms(model.model, section["exclude"])
    gammas_before = sparsity.gamma_magnitudes(bns)  # a copy: training changes the modules
    ap50_before = val_ap50(model, "sparse-start", params)

    sparse = train(
        model,
        "sparse_train",
        MODEL_OUT,
        REPORT_DIR / "results.csv",
        trainer=sparse_trainer(section, ap50_before, groups, weights),
        **args,
    )
    gammas_after = sparsity.gamma_magnitudes(
        sparsity.penalized_batchnorms(sparse.model, section["exclude"])
    )
    ap50_after = val_ap50(sparse, "sparse-end", params)
    near = section["near_zero"]
    metrics = sparsity_metrics(
        (gammas_before, gammas_after),
        group_of,
        near,
        (ap50_before, ap50_after),
        epoch_ap50(REPORT_DIR / "results.csv"),
    )
    write_json(REPORT_DIR / "sparsity.json", metrics)
    histogram = sparsity.gamma_histogram(gammas_before, gammas_after)
    write_csv(REPORT_DIR / "gamma_hist.csv", histogram)
    plot_histogram(histogram, near, REPORT_DIR / "gamma_hist.png")
    print_summary(
        f"sparse_train ({section['penalty']}, {section['weighting']}, {section['schedule']}, "
        f"lambda={section['coefficient']:g})",
        [
            (
                f"channels with |gamma| < {near:g}",
                f"{metrics['near_zero_before']:.1%} -> {metrics['near_zero_after']:.1%} "
                f"(tied groups: {metrics['group_near_zero_before']:.1%} -> "
                f"{metrics['group_near_zero_after']:.1%} of {metrics['groups']})",
            ),
            ("sum |gamma|", f"{metrics['gamma_l1_before']:.1f} -> {metrics['gamma_l1_after']:.1f}"),
            (
                "val AP50",
                f"{ap50_before:.3f} -> {ap50_after:.3f} ({metrics['ap50_retained']:.1%} retained; "
                f"worst epoch {metrics['worst_epoch_ap50_retained']:.1%})",
            ),
            written(MODEL_OUT, REPORT_DIR),
        ],
    )


if __name__ == "__main__":
    cli.run(main, __doc__)
