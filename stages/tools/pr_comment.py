"""Build the Markdown comment a pull request gets: what changed in params and metrics, the new
summary table and the key plots.

    python -m stages.tools.pr_comment --base origin/main > comment.md

Run after `dvc repro` in the PR's checkout. The diffs are `dvc params diff --md` and
`dvc metrics diff --md` of the workspace against ``--base``, whose committed metrics files are
what the PR is compared with (no DVC remote needed). Images are referenced by their paths in the
repo; `cml comment create --publish` (.github/workflows/pr-report.yml) uploads them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from stages.common.runtime import PROJECT_ROOT
from stages.tools import dvc

SUMMARY = PROJECT_ROOT / "reports" / "summary.md"
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


def build_comment(
    base: str, params_diff: str, metrics_diff: str, summary: str, plots: dict[str, str]
) -> str:
    """The comment's Markdown from its parts; empty diffs say so rather than vanish."""
    sections = [
        f"## Compression pipeline: this PR vs `{base}`",
        "### Params changed",
        params_diff.strip() if _has_rows(params_diff) else "No params changed.",
        "### Metrics changed",
        metrics_diff.strip() if _has_rows(metrics_diff) else "No metric changed.",
        "Latency and FPS were measured on this CI machine and on whatever machine produced the "
        "base's committed metrics: compare the speedups in the table below (ratios measured in "
        "one run), not milliseconds across machines.",
        "### All models after this PR",
        summary.strip() or "reports/summary.md is missing: did `dvc repro` run?",
    ]
    if plots:
        sections.append("### Plots")
        sections += [f"**{title}**\n\n![{title}]({path})" for title, path in plots.items()]
    return "\n\n".join(sections) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare with")
    args = parser.parse_args(argv)
    plots = {t: p for t, p in KEY_PLOTS.items() if (PROJECT_ROOT / p).is_file()}
    summary = SUMMARY.read_text() if SUMMARY.is_file() else ""
    comment = build_comment(
        args.base,
        dvc("params", "diff", "--md", args.base),
        dvc("metrics", "diff", "--md", args.base),
        summary,
        plots,
    )
    sys.stdout.write(comment)


if __name__ == "__main__":
    main()
