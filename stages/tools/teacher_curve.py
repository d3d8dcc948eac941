"""Is the teacher converged? The baseline trained for several epoch budgets, each on test.

    python -m stages.tools.teacher_curve --epochs 10 15 20 25 30
    python -m stages.tools.teacher_curve --epochs 8 16 24 --set baseline.batch=2 baseline.nbs=2 \
        --out reports/teacher_curve/batch2

Each budget is a full baseline run (the baseline stage's params with only ``epochs`` changed, so
the learning-rate schedule and the mosaic switch-off follow the budget as they would in the
stage), validated on val and on test. Retention figures only mean something when more epochs
would not raise the teacher: the default ``baseline.epochs`` should sit where the next budget adds
less than ``--plateau`` (0.01) test AP50. Runs on the pipeline's current dataset (after
`dvc repro dataset`).

``--set section.key=value`` changes params.yaml's values for this tool only (the value is read
as YAML and validated like params.yaml), to see how a candidate setting would converge before it
becomes the default.

The largest budget is also trained under every ``--seeds`` seed (default: params.yaml's seed and
the next one), so the curve shows how much of its last step is seed noise.

Each point is cached in .cache/teacher_curve/ under a hash of the params it depends on, so adding
budgets later re-trains only the new ones. Reads params.yaml (`baseline`, `dataset`, `seed`,
`imgsz`, `device`) and data/yolo. Writes reports/teacher_curve/curve.csv (a DVC plot),
curve.md, curve.png and curve.json: the settings the curve was measured with and the budget it
converges from, which the evaluate stage reads to say whether the pipeline's teacher is
converged. Not DVC outputs: run on demand.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from stages import baseline
from stages.dataset import SCHEMA as DATASET_SCHEMA
from stages.pipeline import cli
from stages.pipeline.cli import UserError
from stages.pipeline.outputs import (
    atomic_path,
    print_summary,
    save_figure,
    write_csv,
    write_json,
    written,
)
from stages.pipeline.params import PARAMS_FILE, read_yaml, validate
from stages.pipeline.runtime import CACHE_DIR, PROJECT_ROOT
from stages.yolo.training import check_dataset
from stages.yolo.validation import split_accuracy

OUT_DIR = PROJECT_ROOT / "reports" / "teacher_curve"
WORK_DIR = CACHE_DIR / "teacher_curve"


def gains(points: Sequence[dict]) -> list[float | None]:
    """Test AP50 gained by each budget over the next smaller one (None for the first)."""
    ordered = sorted(points, key=lambda p: p["epochs"])
    return [None] + [b["test_ap50"] - a["test_ap50"] for a, b in itertools.pairwise(ordered)]


def converged_at(points: Sequence[dict], plateau: float) -> int | None:
    """The smallest budget from which no larger budget adds ``plateau`` or more test AP50."""
    ordered = sorted(points, key=lambda p: p["epochs"])
    for i, point in enumerate(ordered[:-1]):
        if all(p["test_ap50"] - point["test_ap50"] < plateau for p in ordered[i + 1 :]):
            return point["epochs"]
    return None


def check_budgets(parser: argparse.ArgumentParser, epochs: Sequence[int]) -> None:
    """A curve needs at least two distinct budgets of at least one epoch."""
    if len(epochs) < 2 or min(epochs) < 1 or len(set(epochs)) != len(epochs):
        parser.error("--epochs needs at least two distinct budgets >= 1")


def with_settings(raw: dict, settings: Sequence[str]) -> dict:
    """``raw`` params with each ``section.key=value`` of ``settings`` applied (value as YAML)."""
    changed = copy.deepcopy(raw)
    for setting in settings:
        key, sep, value = setting.partition("=")
        *parents, leaf = key.split(".")
        where = changed
        for name in parents:
            where = where.get(name) if isinstance(where, dict) else None
        if not sep or not isinstance(where, dict) or leaf not in where:
            raise UserError(
                f"--set {setting!r}: expected KEY=VALUE with KEY a key of params.yaml such as "
                f"baseline.batch (dotted path)."
            )
        where[leaf] = yaml.safe_load(value)
    return changed


def run_point(params: dict, epochs: int, seed: int | None = None) -> dict:
    """Train the baseline for ``epochs`` (cached by params) and measure val and test AP50;
    ``seed`` replaces params.yaml's seed."""
    params = params if seed is None else {**params, "seed": seed}
    section = {**params["baseline"], "epochs": epochs}
    settings = baseline.teacher_settings(params)
    key_source = settings | {"baseline": settings["baseline"] | {"epochs": epochs}}
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:16]
    cached = WORK_DIR / f"e{epochs}-{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    name = f"teacher-e{epochs}"
    trained = baseline.train_baseline(
        params, section, name, WORK_DIR / f"{name}.pt", WORK_DIR / f"{name}.csv"
    )
    point = {"epochs": epochs, **split_accuracy(trained, name, params)}
    write_json(cached, point)
    return point


def seed_noise(runs: dict[int, dict]) -> str:
    """One sentence on the last budget's spread over seeds ("" for one seed)."""
    if len(runs) < 2:
        return ""
    epochs = next(iter(runs.values()))["epochs"]
    values = ", ".join(f"{p['test_ap50']:.4f} (seed {s})" for s, p in runs.items())
    ap50 = [p["test_ap50"] for p in runs.values()]
    return (
        f"Seed noise of the last point ({epochs} epochs): test AP50 {values}; "
        f"spread {max(ap50) - min(ap50):.4f}."
    )


def markdown(
    points: Sequence[dict],
    plateau: float,
    current: int,
    settings: Sequence[str] = (),
    noise: str = "",
    matched: int | None = None,
) -> str:
    ordered = sorted(points, key=lambda p: p["epochs"])
    at = converged_at(ordered, plateau)
    measured = matched in {p["epochs"] for p in ordered}
    lines = [
        f"Baseline test AP50 against its epoch budget (each budget a full run; "
        f"baseline.epochs = {current} in params.yaml). Converged: "
        + (f"from {at} epochs on, no larger budget adds {plateau:g} or more." if at else "no.")
        + (f" Settings changed from params.yaml: {', '.join(settings)}." if settings else "")
        + (
            ""
            if matched is None
            else f" The distilled model sees {matched} epochs in all (baseline, sparse_train and "
            f"distill epochs): the teacher at that budget is the budget-matched control"
            + ("." if measured else ", not measured here.")
        ),
        "",
        "| epochs | val AP50 | test AP50 | test mAP50-95 | test AP50 gain |",
        "|---|---|---|---|---|",
    ]
    for point, gain in zip(ordered, gains(ordered), strict=True):
        mark = " (budget-matched)" if point["epochs"] == matched else ""
        lines.append(
            f"| {point['epochs']}{mark} | {point['val_ap50']:.4f} | {point['test_ap50']:.4f} | "
            f"{point['test_map50_95']:.4f} | " + ("" if gain is None else f"{gain:+.4f}") + " |"
        )
    return "\n".join(lines + ([] if not noise else ["", noise])) + "\n"


def plot(points: Sequence[dict], current: int, matched: int, path: Path) -> None:
    import matplotlib.pyplot as plt

    ordered = sorted(points, key=lambda p: p["epochs"])
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["epochs"] for p in ordered]
    for split in ("val", "test"):
        ax.plot(xs, [p[f"{split}_ap50"] for p in ordered], marker="o", label=f"{split} AP50")
    ax.axvline(current, color="grey", linestyle="--", label="baseline.epochs")
    ax.axvline(matched, color="grey", linestyle=":", label="budget-matched control")
    ax.set_xlabel("baseline epochs (one full run each)")
    ax.set_ylabel("AP50")
    ax.set_title("Is the teacher converged?")
    ax.legend()
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--epochs", type=int, nargs="+", required=True)
    parser.add_argument("--plateau", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of the largest budget")
    args = parser.parse_args(argv)
    check_budgets(parser, args.epochs)
    schema = {**baseline.SCHEMA, "dataset": DATASET_SCHEMA["dataset"]}
    raw = with_settings(read_yaml(PARAMS_FILE), args.set)
    params = validate(schema, raw)
    # What the distilled model trains in all; the stages validate these epochs themselves.
    matched = params["baseline"]["epochs"] + sum(
        raw[s]["epochs"] for s in ("sparse_train", "distill")
    )
    seeds = args.seeds or [params["seed"], params["seed"] + 1]
    if params["seed"] not in seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds must be distinct and include params.yaml's seed {params['seed']}")
    check_dataset()
    points = [run_point(params, e) for e in sorted(args.epochs)]
    last = points[-1]["epochs"]
    noise = {s: run_point(params, last, s) for s in seeds}
    out = args.out.resolve()
    current = params["baseline"]["epochs"]
    at = converged_at(points, args.plateau)
    write_csv(out / "curve.csv", points)
    with atomic_path(out / "curve.md") as tmp:
        tmp.write_text(
            markdown(points, args.plateau, current, args.set, seed_noise(noise), matched)
        )
    plot(points, current, matched, out / "curve.png")
    record = {
        "settings": baseline.teacher_settings(params),
        "plateau": args.plateau,
        "converged_at": at,
        "budget_matched": matched,
        "points": points,
        "last_point_seeds": {str(s): p["test_ap50"] for s, p in noise.items()},
    }
    write_json(out / "curve.json", record)
    print_summary(
        "teacher curve",
        [(f"{p['epochs']} epochs", f"test AP50 {p['test_ap50']:.4f}") for p in points]
        + [("converged from", f"{at} epochs" if at else "not within these budgets")]
        + [("seed noise", seed_noise(noise) or "one seed")]
        + [written(out / "curve.csv", out / "curve.md", out / "curve.png", out / "curve.json")],
    )


if __name__ == "__main__":
    cli.run(main)
