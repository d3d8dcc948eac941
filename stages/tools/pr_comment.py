"""Build the Markdown comment a pull request gets: what changed in params and metrics, the new
summary table and the key plots.

    python -m stages.tools.pr_comment --base origin/main > comment.md

Run after `dvc repro` in the PR's checkout. Params come from `dvc params diff --md`; metrics from
`dvc metrics diff --json` against ``--base``, whose committed metrics files are what the PR is
compared with.

A metric moves for one of two reasons: the PR changed something its stage depends on, or its
stage merely re-ran on another machine (other CPU, other timing). Without a DVC remote every
stage re-runs in CI, so the second kind is everywhere. The comment tells them apart from the two
dvc.lock files: a stage is *changed by the PR* when its command, its params or a dependency that
no stage produces (code, raw data) differs from the base's lock, or when a stage upstream of it
is changed. Metrics of changed stages are listed as the PR's; all others are listed apart as
noise. With a remote (`dvc repro --pull --allow-missing`) the unchanged stages do not re-run at
all, and the noise section holds only what evaluate re-measured of their models (latency). The
environment each side ran in is compared too.

Reads dvc.lock, dvc.yaml, reports/evaluate/environment.json and reports/summary.md at HEAD and at
`--base` (through git and `dvc metrics/params diff`). Writes the comment (Markdown) to stdout.
Images are referenced by their paths in the repo; `cml comment create --publish`
(.github/workflows/pr-report.yml) uploads them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from stages.pipeline import cli
from stages.pipeline.runtime import PROJECT_ROOT
from stages.tools import dvc

SUMMARY = PROJECT_ROOT / "reports" / "summary.md"
ENVIRONMENT = "reports/evaluate/environment.json"
EVALUATE_METRICS = "reports/metrics.json"
# reports/metrics.json holds every model's metrics under its name: the stage that made it (every
# other row is one of trt_build's deployed models).
CHECKPOINT_STAGES = {
    "baseline": "baseline",
    "sparse": "sparse_train",
    "pruned": "prune",
    "distilled": "distill",
}
# The plots a reviewer looks at first, with their titles.
KEY_PLOTS = {
    "Accuracy vs latency and params": "reports/evaluate/accuracy.png",
    "AP50 per class": "reports/evaluate/per_class_ap50.png",
    "Channels kept per layer": "reports/prune/channels.png",
    "BatchNorm |gamma| before and after sparse training": "reports/sparse_train/gamma_hist.png",
}


def _has_rows(table: str) -> bool:
    """Whether a `dvc ... diff --md` table has rows below its header (no change: header only)."""
    return sum(line.startswith("|") for line in table.splitlines()) > 2


def _produced_by(path: str, outs: Mapping[str, set[str]]) -> str | None:
    """The stage whose output is ``path`` or a folder holding it, if any."""
    for stage, paths in outs.items():
        if any(path == out or path.startswith(out.rstrip("/") + "/") for out in paths):
            return stage
    return None


def _own_inputs(entry: Mapping[str, Any], outs: Mapping[str, set[str]]) -> dict[str, Any]:
    """A lock entry's command, params and the hashes of its deps that no stage produces."""
    deps = {
        d["path"]: d.get("md5") or d.get("hash")
        for d in entry.get("deps", [])
        if _produced_by(d["path"], outs) is None
    }
    return {"cmd": entry.get("cmd"), "params": entry.get("params", {}), "deps": deps}


def changed_stages(base_lock: Mapping, head_lock: Mapping) -> tuple[set[str], set[str]]:
    """(stages whose own inputs differ from the base's lock, those plus everything downstream).

    Both arguments are parsed dvc.lock files. A stage missing from the base's lock is changed.
    """
    base, head = base_lock.get("stages", {}), head_lock.get("stages", {})
    outs = {name: {o["path"] for o in e.get("outs", [])} for name, e in head.items()}
    own = {
        name
        for name, entry in head.items()
        if name not in base or _own_inputs(entry, outs) != _own_inputs(base[name], outs)
    }
    upstream = {
        name: {s for d in e.get("deps", []) if (s := _produced_by(d["path"], outs))}
        for name, e in head.items()
    }
    changed = set(own)
    while True:  # propagate downstream until nothing new is reached
        more = {name for name, ups in upstream.items() if ups & changed} - changed
        if not more:
            return own, changed
        changed |= more


def metric_stages(dvc_yaml: Mapping) -> dict[str, str]:
    """Metrics file -> the stage that writes it, from dvc.yaml."""
    found = {}
    for name, stage in dvc_yaml.get("stages", {}).items():
        for entry in stage.get("metrics", []):
            found[next(iter(entry)) if isinstance(entry, dict) else entry] = name
    return found


def split_metrics(
    diff: Mapping[str, Mapping[str, Mapping[str, Any]]],
    files: Mapping[str, str],
    own: set[str],
    changed: set[str],
) -> tuple[list[tuple], list[tuple]]:
    """`dvc metrics diff --json` rows -> (rows the PR caused, rows of stages it did not change).

    A row of reports/metrics.json belongs to the stage that made its model (its key's first
    part) and to evaluate itself; every other file belongs to the stage that writes it.
    """
    caused, noise = [], []
    for path, metrics in diff.items():
        stage = files.get(path)
        for key, change in metrics.items():
            if path == EVALUATE_METRICS:
                by_pr = (
                    stage in own or CHECKPOINT_STAGES.get(key.split(".")[0], "trt_build") in changed
                )
            else:
                by_pr = stage in changed
            row = (path, key, change.get("old"), change.get("new"), change.get("diff"))
            (caused if by_pr else noise).append(row)
    return caused, noise


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "–" if value is None else str(value)


def metrics_table(rows: Sequence[tuple], base: str) -> str:
    lines = [f"| Path | Metric | {base} | this PR | Change |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def environment_diff(base_env: Mapping | None, head_env: Mapping | None) -> list[str]:
    """Lines naming what differs between two environment records (flattened keys)."""

    def flat(d: Mapping | None, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in (d or {}).items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v}
        return out

    a, b = flat(base_env), flat(head_env)
    return [
        f"`{k}`: {a.get(k)} → {b.get(k)}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]


def build_comment(
    base: str,
    params_diff: str,
    caused: Sequence[tuple],
    noise: Sequence[tuple],
    changed: set[str],
    environment: Sequence[str],
    summary: str,
    plots: dict[str, str],
) -> str:
    """The comment's Markdown from its parts; empty sections say so rather than vanish."""
    stages = ", ".join(f"`{s}`" for s in sorted(changed)) or "none"
    sections = [
        f"## Compression pipeline: this PR vs `{base}`",
        "### Params changed",
        params_diff.strip() if _has_rows(params_diff) else "No params changed.",
        f"### Metrics this PR changed\nStages whose inputs this PR changed: {stages}.",
        metrics_table(caused, base) if caused else "No metric of these stages changed.",
        "### Metrics that moved without a cause in this PR",
        (
            "These stages re-ran here, but nothing they depend on differs from the base: the "
            "differences come from the machine (another CPU, timing noise), not from this PR.\n\n"
            + metrics_table(noise, base)
        )
        if noise
        else "None: every stage this PR did not change kept its metrics.",
        "### Environment",
        "\n".join(f"- {line}" for line in environment)
        if environment
        else "Same environment record as the base.",
        "Latency and FPS are measured on whichever machine ran each side: compare the speedups "
        "in the table below (ratios measured in one run), not milliseconds across machines.",
        "### All models after this PR",
        summary.strip() or "reports/summary.md is missing: did `dvc repro` run?",
    ]
    if plots:
        sections.append("### Plots")
        sections += [f"**{title}**\n\n![{title}]({path})" for title, path in plots.items()]
    return "\n\n".join(sections) + "\n"


def _at_base(base: str, path: str) -> str | None:
    """The text of ``path`` as committed at ``base``, or None where it does not exist."""
    done = subprocess.run(
        ["git", "show", f"{base}:{path}"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    return done.stdout if done.returncode == 0 else None


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--base", default="HEAD", help="git revision to compare with")
    args = parser.parse_args(argv)
    head_lock_file = PROJECT_ROOT / "dvc.lock"
    if not head_lock_file.is_file():
        raise cli.UserError("dvc.lock not found: run `dvc repro` before building the comment.")
    own, changed = changed_stages(
        yaml.safe_load(_at_base(args.base, "dvc.lock") or "{}"),
        yaml.safe_load(head_lock_file.read_text()),
    )
    files = metric_stages(yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text()))
    caused, noise = split_metrics(
        json.loads(dvc("metrics", "diff", "--json", args.base) or "{}"), files, own, changed
    )
    head_env = PROJECT_ROOT / ENVIRONMENT
    base_env = _at_base(args.base, ENVIRONMENT)
    environment = environment_diff(
        json.loads(base_env) if base_env else None,
        json.loads(head_env.read_text()) if head_env.is_file() else None,
    )
    plots = {t: p for t, p in KEY_PLOTS.items() if (PROJECT_ROOT / p).is_file()}
    summary = SUMMARY.read_text() if SUMMARY.is_file() else ""
    comment = build_comment(
        args.base,
        dvc("params", "diff", "--md", args.base),
        caused,
        noise,
        changed,
        environment,
        summary,
        plots,
    )
    sys.stdout.write(comment)


if __name__ == "__main__":
    cli.run(main)
