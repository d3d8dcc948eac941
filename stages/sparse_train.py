"""Stage `sparse_train`: continue training the baseline with an L1 penalty on BatchNorm scales.

The penalty and its schedule are stages/compress/sparsity.py; the trainer that applies them is
stages/yolo/sparse_trainer.py (``SparseTrainer``). ``sparse_train.schedule`` picks constant,
linear_decay or dynamic; ``dynamic`` aims at ``target_sparsity`` near-zero channels (|gamma| <
``near_zero``) by the last epoch while val AP50 stays above ``ap50_floor`` x its start.

Reads: models/baseline.pt, data/yolo. Writes: models/sparse.pt, reports/sparse_train/results.csv
(ultralytics' per-epoch losses and val metrics plus the coefficient, the total |gamma| and the
near-zero fraction), reports/sparse_train/sparsity.json (metrics), gamma_hist.csv (|gamma|
histogram before/after, a DVC plot) and gamma_hist.png.
"""

from __future__ import annotations

from pathlib import Path

from stages.compress import sparsity
from stages.pipeline import cli
from stages.pipeline.outputs import print_summary, save_figure, write_csv, write_json, written
from stages.pipeline.params import COMMON, Choice, Float, ParamsError, Section, StrList, load
from stages.pipeline.runtime import PROJECT_ROOT
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


def sparse_trainer(section: dict, ap50_start: float) -> type[SparseTrainer]:
    """The trainer for a validated ``sparse_train`` section, starting from AP50 ``ap50_start``."""
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
        beta_coefficient=section["beta_coefficient"],
        near_zero=section["near_zero"],
        exclude=tuple(section["exclude"]),
        ap50_start=ap50_start,
    )


def plot_histogram(rows: list[dict], near_zero: float, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    centers = [r["gamma"] for r in rows]
    width = centers[1] - centers[0] if len(centers) > 1 else 1.0
    for key, label in (("baseline", "baseline"), ("sparse", "after sparse training")):
        ax.bar(centers, [r[key] for r in rows], width, alpha=0.6, label=label)
    ax.axvline(
        near_zero, color="k", linestyle="--", linewidth=1, label=f"near zero ({near_zero:g})"
    )
    ax.set_yscale("log")
    ax.set_xlabel("|gamma| of BatchNorm channels")
    ax.set_ylabel("channels")
    ax.legend()
    save_figure(fig, path)


def sparsity_metrics(
    before: dict, after: dict, ap50_before: float, ap50_after: float, channels: int
) -> dict:
    """sparsity.json: near-zero fraction, total |gamma| and val AP50, before and after."""
    return {
        "near_zero_before": round(before["near_zero"], 4),
        "near_zero_after": round(after["near_zero"], 4),
        "gamma_l1_before": round(before["gamma_l1"], 2),
        "gamma_l1_after": round(after["gamma_l1"], 2),
        "ap50_before": round(ap50_before, 4),
        "ap50_after": round(ap50_after, 4),
        "ap50_retained": round(ap50_after / max(ap50_before, 1e-9), 4),
        "channels": channels,
    }


def main() -> None:
    params = load(SCHEMA)
    section = params["sparse_train"]
    args = training_args(params, section)
    model = load_detector(BASELINE)
    bns_before = sparsity.penalized_batchnorms(model.model, section["exclude"])
    if not bns_before:
        raise ParamsError(
            f"params.yaml: sparse_train.exclude = {section['exclude']!r} excludes every BatchNorm."
        )
    gammas_before = sparsity.gamma_magnitudes(bns_before)  # a copy: training changes the modules
    ap50_before = val_ap50(model, "sparse-start", params)

    sparse = train(
        model,
        "sparse_train",
        MODEL_OUT,
        REPORT_DIR / "results.csv",
        trainer=sparse_trainer(section, ap50_before),
        **args,
    )
    gammas_after = sparsity.gamma_magnitudes(
        sparsity.penalized_batchnorms(sparse.model, section["exclude"])
    )
    ap50_after = val_ap50(sparse, "sparse-end", params)
    near = section["near_zero"]
    before = sparsity.sparsity_stats(gammas_before, near)
    after = sparsity.sparsity_stats(gammas_after, near)
    metrics = sparsity_metrics(before, after, ap50_before, ap50_after, int(gammas_after.size))
    write_json(REPORT_DIR / "sparsity.json", metrics)
    histogram = sparsity.gamma_histogram(gammas_before, gammas_after)
    write_csv(REPORT_DIR / "gamma_hist.csv", histogram)
    plot_histogram(histogram, near, REPORT_DIR / "gamma_hist.png")
    print_summary(
        f"sparse_train ({section['schedule']}, s={section['coefficient']:g})",
        [
            (
                f"channels with |gamma| < {near:g}",
                f"{metrics['near_zero_before']:.1%} -> {metrics['near_zero_after']:.1%}",
            ),
            ("sum |gamma|", f"{metrics['gamma_l1_before']:.1f} -> {metrics['gamma_l1_after']:.1f}"),
            (
                "val AP50",
                f"{ap50_before:.3f} -> {ap50_after:.3f} ({metrics['ap50_retained']:.1%} retained)",
            ),
            written(MODEL_OUT, REPORT_DIR),
        ],
    )


if __name__ == "__main__":
    cli.run(main, __doc__)
