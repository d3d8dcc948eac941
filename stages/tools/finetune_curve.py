"""How long must fine-tuning run? The distilled model's AP50 against the distill epoch budget.

    python -m stages.tools.finetune_curve --epochs 2 4 8 12

Each budget is one run of the distill stage as params.yaml sets it (CWD weight, temperature,
teacher, trainer settings) with only ``epochs`` changed, from the pipeline's pruned student (after
`dvc repro prune`); budget 0 is the pruned student itself, before any fine-tuning. Every point is
measured on val and on test, beside the teacher's own AP50. The knee is **decided on val**: the
smallest budget whose val AP50 is within ``--tolerance`` (0.005) of the best budget's. Runs are
cached with distill_ablation's (same key), so a budget measured once is never trained again.

Reads params.yaml (`distill`, `seed`, `imgsz`, `device`), data/yolo, models/pruned.pt and the
teacher. Writes reports/finetune_curve/curve.csv, curve.md and curve.png. Not DVC outputs: run
on demand.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stages import distill
from stages.pipeline import cli
from stages.pipeline.outputs import atomic_path, print_summary, save_figure, write_csv, written
from stages.pipeline.params import load
from stages.pipeline.runtime import PROJECT_ROOT
from stages.tools.distill_ablation import arm_name, run
from stages.tools.teacher_curve import check_budgets
from stages.yolo.models import load_detector
from stages.yolo.validation import split_accuracy

OUT_DIR = PROJECT_ROOT / "reports" / "finetune_curve"


def knee(points: Sequence[dict], tolerance: float) -> int:
    """The smallest budget whose val AP50 is within ``tolerance`` of the best one's."""
    best = max(p["val_ap50"] for p in points)
    return min(p["epochs"] for p in points if p["val_ap50"] >= best - tolerance)


def markdown(points: Sequence[dict], teacher: dict, chosen: int, section: dict) -> str:
    lines = [
        f"Distilled AP50 against the distill stage's epoch budget (CWD weight "
        f"{section['weight']:g}, tau {section['temperature']:g}, teacher {section['teacher']}; "
        f"distill.epochs = {section['epochs']} in params.yaml; 0 = the pruned student before "
        f"fine-tuning). "
        f"Knee, decided on val: **{chosen} epochs**"
        + (
            " (the largest budget measured: val AP50 still rises there, so a longer one may "
            "recover more)"
            if chosen == max(p["epochs"] for p in points)
            else ""
        )
        + f". Teacher: val AP50 {teacher['val_ap50']:.4f}, "
        f"test AP50 {teacher['test_ap50']:.4f}.",
        "",
        "| epochs | val AP50 | test AP50 | test mAP50-95 | test AP50 / teacher's |",
        "|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p['epochs']} | {p['val_ap50']:.4f} | {p['test_ap50']:.4f} | "
            f"{p['test_map50_95']:.4f} | {p['test_ap50'] / teacher['test_ap50']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def plot(points: Sequence[dict], teacher: dict, chosen: int, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["epochs"] for p in points]
    for split, colour in (("val", "C0"), ("test", "C1")):
        ax.plot(xs, [p[f"{split}_ap50"] for p in points], "o-", color=colour, label=f"{split}")
        ax.axhline(teacher[f"{split}_ap50"], color=colour, linestyle=":", label=f"teacher, {split}")
    ax.axvline(chosen, color="grey", linestyle="--", label="knee (val)")
    ax.set_xlabel("distill epochs (one run each; 0 = pruned, not fine-tuned)")
    ax.set_ylabel("AP50")
    ax.set_title("How long must fine-tuning run?")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--epochs", type=int, nargs="+", required=True)
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    check_budgets(parser, args.epochs)
    params = load(distill.SCHEMA)
    section = params["distill"]
    arm = arm_name(section["weight"], section["temperature"])
    student = load_detector(distill.STUDENT)
    teacher = split_accuracy(load_detector(distill.TEACHERS[section["teacher"]]), "teacher", params)
    points = [{"epochs": 0, **split_accuracy(student, "pruned", params)}]
    for epochs in sorted(args.epochs):
        budget = {**section, "epochs": epochs}
        row = run(budget, params, arm, section["weight"], section["temperature"], params["seed"])
        points.append({"epochs": epochs, **{k: row[k] for k in teacher}})
    chosen = knee(points, args.tolerance)
    out = args.out.resolve()
    write_csv(out / "curve.csv", points)
    with atomic_path(out / "curve.md") as tmp:
        tmp.write_text(markdown(points, teacher, chosen, section))
    plot(points, teacher, chosen, out / "curve.png")
    print_summary(
        "fine-tune curve",
        [
            (f"{p['epochs']} epochs", f"val AP50 {p['val_ap50']:.4f}, test {p['test_ap50']:.4f}")
            for p in points
        ]
        + [("knee (val)", f"{chosen} epochs"), ("teacher", f"test AP50 {teacher['test_ap50']:.4f}")]
        + [written(out / "curve.csv", out / "curve.md", out / "curve.png")],
    )


if __name__ == "__main__":
    cli.run(main)
