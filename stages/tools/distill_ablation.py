"""What CWD is worth: the distill stage at several CWD weights, each over several seeds.

    python -m stages.tools.distill_ablation                         # weights 0 and 1, seeds 0 1 2
    python -m stages.tools.distill_ablation --weights 0 0.1 1 --seeds 0 1 2 3 4

Runs on the pipeline's current state (after `dvc repro`): the pruned student, the teacher and
every other `distill` param from params.yaml; only the CWD weight and the training seed vary
(weight 0 is plain fine-tuning with the same budget). The seed changes the augmentation and the
batch order, so the spread over seeds is the noise a single run's difference must beat. Each
weight is compared with weight 0 seed by seed (a paired difference).

Writes reports/distill_ablation/ablation.csv (one row per run) and ablation.md (per weight:
mean and standard deviation of AP50 and mAP50-95, the paired AP50 difference to plain fine-tuning
and on how many seeds CWD won). Not DVC outputs: run on demand. About 2 minutes per run on the
default profile on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path

from stages import distill
from stages.common import params as P
from stages.common import yolo
from stages.common.outputs import atomic_path, print_summary, write_csv, written
from stages.common.runtime import CACHE_DIR, PROJECT_ROOT

OUT_DIR = PROJECT_ROOT / "reports" / "distill_ablation"
WORK_DIR = CACHE_DIR / "distill_ablation"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per weight: mean/std of ap50 and map50_95 over seeds, and the ap50 difference to weight 0
    on the same seed (mean, std, and the number of seeds where the weight beat weight 0)."""
    plain = {r["seed"]: r["ap50"] for r in rows if r["weight"] == 0}
    summary = []
    for weight in sorted({r["weight"] for r in rows}):
        runs = [r for r in rows if r["weight"] == weight]
        ap50, ap50_std = _mean_std([r["ap50"] for r in runs])
        map_, map_std = _mean_std([r["map50_95"] for r in runs])
        entry = {
            "weight": weight,
            "seeds": len(runs),
            "ap50": ap50,
            "ap50_std": ap50_std,
            "map50_95": map_,
            "map50_95_std": map_std,
        }
        diffs = [r["ap50"] - plain[r["seed"]] for r in runs if r["seed"] in plain]
        if weight != 0 and diffs:
            entry["ap50_gain"], entry["ap50_gain_std"] = _mean_std(diffs)
            entry["wins"] = sum(d > 0 for d in diffs)
        summary.append(entry)
    return summary


def markdown(summary: Sequence[dict], cfg: dict) -> str:
    lines = [
        f"distill: teacher {cfg['teacher']}, tau {cfg['temperature']:g}, level weights "
        f"{cfg['level_weights']}, {cfg['epochs']} epochs; mean ± std over seeds; gain = AP50 "
        f"minus plain fine-tuning (weight 0) on the same seed.",
        "",
        "| CWD weight | seeds | AP50 | mAP50-95 | AP50 gain vs plain | CWD better on |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        gain = (
            f"{s['ap50_gain']:+.4f} ± {s['ap50_gain_std']:.4f}"
            if "ap50_gain" in s
            else "(baseline)"
        )
        wins = f"{s['wins']}/{s['seeds']} seeds" if "wins" in s else ""
        lines.append(
            f"| {s['weight']:g} | {s['seeds']} | {s['ap50']:.4f} ± {s['ap50_std']:.4f} | "
            f"{s['map50_95']:.4f} ± {s['map50_95_std']:.4f} | {gain} | {wins} |"
        )
    return "\n".join(lines) + "\n"


def run(cfg: dict, params: dict, weight: float, seed: int) -> dict:
    """One distill run (the stage's trainer and budget) at ``weight`` and ``seed``, validated."""
    cfg = {**cfg, "weight": weight}
    student = yolo.load_detector(distill.STUDENT)
    teacher = yolo.load_detector(distill.TEACHERS[cfg["teacher"]])
    trainer = distill.distill_trainer(cfg, student, teacher, params["imgsz"])
    name = f"ablation-w{weight:g}-s{seed}"
    args = {**yolo.training_args(params, cfg), "seed": seed}
    trained = yolo.train(
        student,
        name,
        WORK_DIR / f"{name}.pt",
        WORK_DIR / f"{name}.csv",
        trainer=trainer,
        **args,
    )
    box = yolo.validate(trained, f"{name}-val", imgsz=params["imgsz"], device=params["device"]).box
    return {
        "weight": weight,
        "seed": seed,
        "ap50": round(float(box.map50), 4),
        "map50_95": round(float(box.map), 4),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    if 0 not in args.weights:
        parser.error(
            "--weights must include 0: plain fine-tuning is what the others are paired with"
        )
    if any(w < 0 for w in args.weights) or len(set(args.seeds)) != len(args.seeds):
        parser.error("--weights must be >= 0 and --seeds distinct")
    params = P.load(distill.SCHEMA)
    cfg = params["distill"]

    rows = [run(cfg, params, w, s) for w in args.weights for s in args.seeds]
    out = args.out.resolve()
    write_csv(out / "ablation.csv", rows)
    summary = summarize(rows)
    with atomic_path(out / "ablation.md") as tmp:
        tmp.write_text(markdown(summary, cfg))
    print_summary(
        "distill ablation",
        [
            (
                f"weight {s['weight']:g}",
                f"AP50 {s['ap50']:.4f} ± {s['ap50_std']:.4f}"
                + (f", gain {s['ap50_gain']:+.4f}" if "ap50_gain" in s else ""),
            )
            for s in summary
        ]
        + [written(out / "ablation.csv", out / "ablation.md")],
    )


if __name__ == "__main__":
    main()
