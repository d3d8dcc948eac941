"""Collect DVC experiments into accuracy-vs-latency, -GFLOPs and -params Pareto charts.

A sweep, then the chart::

    dvc exp run --queue -S prune.ratio=0.3,0.5,0.7
    dvc queue start -j 1          # -j N runs N at once (each needs its own cores)
    python -m stages.tools.pareto  # experiments based on HEAD; --all-commits for every commit

Each experiment (and its base commit) is one point: the chosen model's test AP50 (``--model``,
default the deployed one) against its latency, GFLOPs and params. Reads each experiment's
reports/metrics.json and the distilled model's val AP50 (reports/distill/distill.json) through
`dvc exp show`. A point is on the Pareto front when no other point is at least as cheap and at
least as accurate, and strictly better in one of the two.

The decision is made on val: with ``--reference`` (a val AP50, e.g. the budget-matched control's
in reports/teacher_curve/curve.md), the chosen point is the fastest whose distilled val AP50
keeps ``1 - --within`` (0.97) of it. Fastest by the speedup over the baseline built the same way
and timed in the same run (latencies of different runs drift with the machine's load). A queued,
running or failed experiment is left out. Writes reports/sweep/pareto.csv, pareto.md and
pareto.png (not DVC outputs: a view over experiments).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from stages.pipeline import cli
from stages.pipeline.outputs import atomic_path, print_summary, write_csv, written
from stages.pipeline.plots import plot_accuracy_vs_cost
from stages.pipeline.runtime import PROJECT_ROOT
from stages.tools import dvc

METRICS_FILE = "reports/metrics.json"
DECISION_FILE = "reports/distill/distill.json"  # the distilled model's val AP50
# cost column -> its Pareto-front flag column
FRONTS = {"latency_ms": "front_latency", "gflops": "front_gflops", "params_m": "front_params"}
OUT_DIR = PROJECT_ROOT / "reports" / "sweep"


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def experiments(exp_show: list[dict]) -> list[dict]:
    """Flatten ``dvc exp show --json`` into one entry per commit and experiment.

    Each entry: ``name`` (the experiment's name, else the commit's branch or short hash),
    ``params`` (params.yaml, dotted keys) and ``metrics`` (reports/metrics.json), or ``error``.
    The workspace entry is left out: after `dvc exp run` it repeats the last experiment.
    """

    def entry(rev: dict, state: str | None = None) -> dict:
        data = rev.get("data") or {}
        params = data.get("params", {}).get("params.yaml", {}).get("data")
        metrics = data.get("metrics", {}).get(METRICS_FILE, {}).get("data")
        decision = data.get("metrics", {}).get(DECISION_FILE, {}).get("data") or {}
        error = rev.get("error") or (None if params and metrics else "no params or metrics")
        if state not in (None, "success"):  # a running one shows its base's metrics until done
            error = error or f"experiment {state}"
        return {
            "name": rev.get("name") or rev["rev"][:7],
            "params": _flatten(params or {}),
            "metrics": metrics or {},
            "val_ap50": decision.get("ap50"),
            "error": error,
        }

    found = []
    for commit in exp_show:
        if commit["rev"] == "workspace":
            continue
        found.append(entry(commit))
        for experiment in commit.get("experiments") or []:
            state = (experiment.get("executor") or {}).get("state")
            found.extend(entry(rev, state) for rev in experiment.get("revs") or [])
    return found


def pareto_front(costs: Sequence[float], accuracies: Sequence[float]) -> list[bool]:
    """For each point, whether no other point dominates it (cheaper-or-equal and
    at-least-as-accurate, strictly better in one)."""
    points = list(zip(costs, accuracies, strict=True))
    return [
        not any(
            c2 <= c and a2 >= a and (c2 < c or a2 > a)
            for j, (c2, a2) in enumerate(points)
            if j != i
        )
        for i, (c, a) in enumerate(points)
    ]


def _usable(experiment: dict, model: str) -> bool:
    return not experiment["error"] and model in experiment["metrics"]


def sweep_rows(found: list[dict], model: str) -> list[dict]:
    """One row per usable experiment: the params that differ between them and the model's
    accuracy and cost, with Pareto flags for latency, GFLOPs and params."""
    usable = [e for e in found if _usable(e, model)]
    varying = sorted(
        {
            k
            for e in usable
            for k in e["params"]
            if len({str(u["params"].get(k)) for u in usable}) > 1
        }
    )
    rows = []
    for e in usable:
        m = e["metrics"][model]
        device = "cpu" if "cpu_latency_ms" in m else "gpu"
        unpruned = e["metrics"].get("baseline", {}).get("gflops")
        # The baseline built like the model (trt_build's `baseline_<name>`; the PyTorch baseline
        # for PyTorch rows) and timed in the same run: a ratio within one run, unlike latencies
        # of different experiments, which drift with the machine's load.
        twin = e["metrics"].get(f"baseline_{model}", e["metrics"].get("baseline", {}))
        twin_ms = twin.get(f"{device}_latency_ms")
        rows.append(
            {
                "experiment": e["name"],
                **{k: e["params"].get(k) for k in varying},
                "val_ap50": e["val_ap50"],
                "flops_cut": round(1 - m["gflops"] / unpruned, 4) if unpruned else None,
                "ap50": m["ap50"],
                "map50_95": m["map50_95"],
                "params_m": m["params_m"],
                "gflops": m["gflops"],
                "latency_ms": m[f"{device}_latency_ms"],
                "latency_device": device,
                "speedup": round(twin_ms / m[f"{device}_latency_ms"], 3) if twin_ms else None,
            }
        )
    for cost, flag_column in FRONTS.items():
        flags = pareto_front([r[cost] for r in rows], [r["ap50"] for r in rows])
        for row, flag in zip(rows, flags, strict=True):
            row[flag_column] = flag
    return rows


def fastest_within(rows: Sequence[dict], reference: float, within: float) -> dict | None:
    """The fastest row whose val AP50 is at least (1 - within) x reference, or None.

    Fastest by the speedup over the baseline timed in the same run where every kept row has
    one, else by latency."""
    kept = [
        r for r in rows if r["val_ap50"] is not None and r["val_ap50"] >= (1 - within) * reference
    ]
    if kept and all(r["speedup"] for r in kept):
        return max(kept, key=lambda r: r["speedup"])
    return min(kept, key=lambda r: r["latency_ms"], default=None)


def decision(rows: Sequence[dict], reference: float | None, within: float) -> str:
    """The sentence that names the fastest experiment within ``within`` of ``reference`` on val."""
    if reference is None:
        return "No choice: pass --reference (a val AP50) to pick the fastest point near it."
    best = fastest_within(rows, reference, within)
    if best is None:
        return f"No experiment keeps {1 - within:.0%} of val AP50 {reference:.4f}."
    speed = f"{best['latency_ms']:.2f} ms"
    if best["speedup"]:
        speed += f", {best['speedup']:.2f}x its run's baseline"
    return (
        f"Decided on val: **{best['experiment']}** is the fastest ({speed}) "
        f"whose distilled val AP50 ({best['val_ap50']:.4f}) keeps {1 - within:.0%} of "
        f"{reference:.4f}."
    )


def markdown(rows: Sequence[dict], model: str, choice: str) -> str:
    """The sweep as a table by FLOPs cut, and the decision."""
    varying = [k for k in rows[0] if "." in k]
    head = ["experiment", *varying, "FLOPs cut", "val AP50 (distilled)", f"test AP50 ({model})"]
    lines = [
        choice,
        "",
        "| " + " | ".join([*head, f"{rows[0]['latency_device'].upper()} ms", "speedup"]) + " |",
        "|" + "---|" * (len(head) + 2),
    ]
    for r in sorted(rows, key=lambda r: (r["flops_cut"] is None, r["flops_cut"])):
        cells = [r["experiment"], *(str(r[k]) for k in varying)]
        cells += [
            f"{r['flops_cut']:.1%}" if r["flops_cut"] is not None else "",
            f"{r['val_ap50']:.4f}" if r["val_ap50"] is not None else "",
            f"{r['ap50']:.4f}",
            f"{r['latency_ms']:.2f}",
            f"{r['speedup']:.2f}x" if r["speedup"] else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--model", default="deployed", help="model of reports/metrics.json")
    parser.add_argument("--all-commits", action="store_true", help="experiments of every commit")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder for the reports")
    parser.add_argument("--reference", type=float, help="val AP50 the choice must stay near")
    parser.add_argument("--within", type=float, default=0.03, help="fraction of --reference")
    args = parser.parse_args(argv)

    shown = dvc("exp", "show", "--json", *(["--all-commits"] if args.all_commits else []))
    found = experiments(json.loads(shown))
    rows = sweep_rows(found, args.model)
    if not rows:
        raise cli.UserError(
            f"no experiment has {METRICS_FILE} metrics for {args.model!r}: run some first, e.g. "
            f"`dvc exp run --queue -S prune.ratio=0.3,0.5,0.7 && dvc queue start`."
        )
    out = args.out.resolve()
    write_csv(out / "pareto.csv", rows)
    choice = decision(rows, args.reference, args.within)
    with atomic_path(out / "pareto.md") as tmp:
        tmp.write_text(markdown(rows, args.model, choice))
    device = rows[0]["latency_device"].upper()
    plot_accuracy_vs_cost(
        rows,
        "experiment",
        {
            "latency_ms": f"{device} latency per image (ms)",
            "gflops": "GFLOPs",
            "params_m": "params (M)",
        },
        out / "pareto.png",
        ylabel=f"AP50 ({args.model})",
        fronts=FRONTS,
    )
    summary = [
        (
            r["experiment"],
            f"AP50 {r['ap50']:.3f}  {r['latency_ms']:.2f} ms  {r['params_m']:.3f} M params"
            + ("  [front: latency]" if r["front_latency"] else "")
            + ("  [front: GFLOPs]" if r["front_gflops"] else "")
            + ("  [front: params]" if r["front_params"] else ""),
        )
        for r in rows
    ]
    skipped = [e["name"] for e in found if not _usable(e, args.model)]
    if skipped:
        summary.append(("skipped (failed or no metrics)", ", ".join(skipped)))
    summary += [
        ("decision", choice),
        written(out / "pareto.csv", out / "pareto.md", out / "pareto.png"),
    ]
    print_summary(f"pareto ({len(rows)} experiments, model {args.model})", summary)


if __name__ == "__main__":
    cli.run(main)
