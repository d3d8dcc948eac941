"""What CWD is worth: CWD against plain fine-tuning and ultralytics' own distillation.

    python -m stages.tools.distill_ablation                                  # 5 seeds
    python -m stages.tools.distill_ablation --weights 0.1 1 --temperatures 1 4 --screen-seeds 2

Runs on the pipeline's current state (after `dvc repro`): the pruned student, the teacher and
every other `distill` param from params.yaml. Three arms, each over the same seeds with the same
student, teacher, trainer settings and budget:

- ``plain``: fine-tuning alone (the distill stage at CWD weight 0);
- ``cwd``: the distill stage with each candidate CWD weight x temperature;
- ``ultralytics``: ultralytics' built-in feature distillation (train arg ``distill_model``: a
  score-weighted L2 loss on the neck features through projectors) at its default weight ``dis``.

Every run is measured on val and on test. The CWD candidate is **chosen on val** (best mean val
AP50 over the first ``--screen-seeds`` seeds, default all: a grid of candidates on every seed
costs more than the comparison it decides); the chosen one and the other two arms then run on
every seed and are **reported on test** only, with 95% t-intervals and paired differences (same
seed: same augmentation and batch order). Reads params.yaml (`distill`, `seed`,
`imgsz`, `device`), data/yolo, models/pruned.pt and the teacher. Writes
reports/distill_ablation/ablation.csv (one row per run) and ablation.md. Not DVC outputs: run on
demand. Each run is cached in .cache/distill_ablation/ under a hash of everything it depends on,
so an interrupted ablation resumes where it stopped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from scipy import stats

from stages import distill
from stages.pipeline import cli
from stages.pipeline.outputs import atomic_path, print_summary, write_csv, write_json, written
from stages.pipeline.params import load
from stages.pipeline.runtime import CACHE_DIR, PROJECT_ROOT
from stages.yolo.models import load_detector, model_size
from stages.yolo.training import ModelKeepingTrainer, train, training_args
from stages.yolo.validation import split_accuracy

OUT_DIR = PROJECT_ROOT / "reports" / "distill_ablation"
WORK_DIR = CACHE_DIR / "distill_ablation"
ULTRALYTICS_DIS = 6.0  # ultralytics 8.4's default weight of its distillation loss


def interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the two-sided t confidence interval of the mean."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    t = stats.t.ppf(0.5 + level / 2, len(values) - 1)
    return mean, float(t * statistics.stdev(values) / len(values) ** 0.5)


def paired(rows: Sequence[dict], arm: str, other: str, key: str = "test_ap50") -> dict:
    """``arm`` minus ``other`` seed by seed: mean, 95% half-width, wins, seeds."""
    by_seed = {r["seed"]: r[key] for r in rows if r["arm"] == other}
    diffs = [r[key] - by_seed[r["seed"]] for r in rows if r["arm"] == arm and r["seed"] in by_seed]
    mean, half = interval(diffs) if diffs else (float("nan"), float("nan"))  # e.g. --no-ultralytics
    return {"mean": mean, "half": half, "wins": sum(d > 0 for d in diffs), "seeds": len(diffs)}


def arm_name(weight: float, tau: float) -> str:
    """ "plain" (fine-tuning alone) or the CWD candidate's name, e.g. "cwd w0.1 tau1"."""
    return f"cwd w{weight:g} tau{tau:g}" if weight else "plain"


def screened(rows: Sequence[dict], seeds: Sequence[int]) -> dict[str, list[float]]:
    """Val AP50 of every CWD candidate on ``seeds``, the seeds all candidates ran on."""
    arms = sorted({r["arm"] for r in rows if r["arm"].startswith("cwd")})
    return {a: [r["val_ap50"] for r in rows if r["arm"] == a and r["seed"] in seeds] for a in arms}


def choose_cwd(rows: Sequence[dict], seeds: Sequence[int]) -> str:
    """The CWD arm with the best mean val AP50 on ``seeds`` (ties: the first)."""
    return max((val := screened(rows, seeds)), key=lambda arm: statistics.fmean(val[arm]))


def markdown(
    rows: Sequence[dict], chosen: str, section: dict, screen: Sequence[int], cut: str = ""
) -> str:
    """The report: the val decision on the ``screen`` seeds, then the three arms and their paired
    differences on test. ``cut`` says how much smaller the student is than the teacher."""
    seeds = len({r["seed"] for r in rows})
    lines = [
        f"Student: the pruned model{cut}; teacher: {section['teacher']}; {section['epochs']} "
        f"epochs each, {seeds} seeds; the same trainer settings for every arm. Mean ± 95% "
        f"t-interval over seeds.",
        "",
        f"**Decided on val**: CWD candidates (mean val AP50 over seeds "
        f"{', '.join(map(str, screen))})",
        "",
        "| CWD arm | val AP50 |",
        "|---|---|",
    ]
    for arm, val in screened(rows, screen).items():
        mean, half = interval(val)
        mark = " (chosen)" if arm == chosen else ""
        lines.append(f"| {arm}{mark} | {mean:.4f} ± {half:.4f} |")
    lines += [
        "",
        "**Reported on test**",
        "",
        "| arm | test AP50 | test mAP50-95 |",
        "|---|---|---|",
    ]
    for arm in ("plain", chosen, "ultralytics"):
        runs = [r for r in rows if r["arm"] == arm]
        if runs:
            a, ah = interval([r["test_ap50"] for r in runs])
            m, mh = interval([r["test_map50_95"] for r in runs])
            lines.append(f"| {arm} | {a:.4f} ± {ah:.4f} | {m:.4f} ± {mh:.4f} |")
    lines += ["", "| paired difference (test AP50) | mean ± 95% CI | better on |", "|---|---|---|"]
    for arm, other in ((chosen, "plain"), (chosen, "ultralytics"), ("ultralytics", "plain")):
        d = paired(rows, arm, other)
        if d["seeds"]:
            lines.append(
                f"| {arm} − {other} | {d['mean']:+.4f} ± {d['half']:.4f} | "
                f"{d['wins']}/{d['seeds']} seeds |"
            )
    return "\n".join(lines) + "\n"


@functools.cache
def _file_digest(path: Path) -> str:
    """sha256 of a checkpoint, read once per process (every run keys its cache with it)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest(section: dict, *parts: object) -> str:
    """Cache key of a run: its settings and the student and teacher it trains with."""
    files = (distill.STUDENT, distill.TEACHERS[section["teacher"]])
    key = [section, *parts, *(_file_digest(f) for f in files)]
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def size_cut(section: dict, imgsz: int) -> str:
    """ ", N% fewer params and M% fewer FLOPs than the teacher" for the pipeline's student."""
    student, teacher = (
        model_size(load_detector(path).model, imgsz)
        for path in (distill.STUDENT, distill.TEACHERS[section["teacher"]])
    )
    return (
        f" ({1 - student['params'] / teacher['params']:.1%} fewer params and "
        f"{1 - student['flops_g'] / teacher['flops_g']:.1%} fewer FLOPs than the teacher at "
        f"imgsz {imgsz})"
    )


def run(section: dict, params: dict, arm: str, weight: float, tau: float, seed: int) -> dict:
    """One fine-tuning run of ``arm`` (cached), measured on val and test."""
    section = {**section, "weight": weight, "temperature": tau}
    name = f"ablation-{arm}-s{seed}"
    cached = WORK_DIR / f"{name}-{_digest(section, params['imgsz'], seed, ULTRALYTICS_DIS)}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    student = load_detector(distill.STUDENT)
    teacher_path = distill.TEACHERS[section["teacher"]]
    args = {**training_args(params, section), "seed": seed}
    if arm == "ultralytics":
        args |= {"distill_model": str(teacher_path), "dis": ULTRALYTICS_DIS}
        trainer = ModelKeepingTrainer
    else:
        trainer = distill.trainer_for(
            section, student, load_detector(teacher_path), params["imgsz"]
        )
    trained = train(
        student, name, WORK_DIR / f"{name}.pt", WORK_DIR / f"{name}.csv", trainer=trainer, **args
    )
    row = {"arm": arm, "seed": seed, "weight": weight, "temperature": tau}
    row |= split_accuracy(trained, name, params)
    write_json(cached, row)
    return row


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--weights", type=float, nargs="+", help="CWD weights (default: params)")
    parser.add_argument("--temperatures", type=float, nargs="+", help="CWD tau (default: params)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--screen-seeds", type=int, help="choose CWD on the first N seeds (default: all)"
    )
    parser.add_argument("--no-ultralytics", action="store_true", help="skip the built-in arm")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    params = load(distill.SCHEMA)
    section = params["distill"]
    weights = args.weights or [section["weight"]]
    taus = args.temperatures or [section["temperature"]]
    if any(w <= 0 for w in weights) or any(t <= 0 for t in taus):
        parser.error("--weights and --temperatures must be > 0 (plain fine-tuning always runs)")
    if len(set(args.seeds)) != len(args.seeds) or len(args.seeds) < 2:
        parser.error("--seeds must be at least two distinct seeds")
    screening = len(args.seeds) if args.screen_seeds is None else args.screen_seeds
    if not 2 <= screening <= len(args.seeds):
        parser.error("--screen-seeds must be at least 2 and at most the number of --seeds")

    screen = args.seeds[:screening]
    candidates = [(arm_name(w, t), w, t) for w in weights for t in taus]
    rows = [run(section, params, *arm, seed) for arm in candidates for seed in screen]
    chosen = choose_cwd(rows, screen)
    arms = [("plain", 0.0, section["temperature"]), *(a for a in candidates if a[0] == chosen)]
    if not args.no_ultralytics:
        arms.append(("ultralytics", 0.0, section["temperature"]))
    done = {(r["arm"], r["seed"]) for r in rows}
    rows += [
        run(section, params, *arm, seed)
        for arm in arms
        for seed in args.seeds
        if (arm[0], seed) not in done
    ]
    out = args.out.resolve()
    write_csv(out / "ablation.csv", rows)
    with atomic_path(out / "ablation.md") as tmp:
        tmp.write_text(markdown(rows, chosen, section, screen, size_cut(section, params["imgsz"])))
    summary = [
        (f"{arm} − {other}", f"{d['mean']:+.4f} ± {d['half']:.4f} test AP50, {d['wins']} wins")
        for arm, other in ((chosen, "plain"), (chosen, "ultralytics"))
        if (d := paired(rows, arm, other))["seeds"]
    ]
    print_summary(
        "distill ablation",
        [("chosen on val", chosen), *summary, written(out / "ablation.csv", out / "ablation.md")],
    )


if __name__ == "__main__":
    cli.run(main)
