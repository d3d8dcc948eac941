"""Writing stage outputs so that a failed or interrupted stage never leaves a half-written one.

Every file or folder is built under a temporary name beside its target and renamed onto it only
when complete: DVC (or the next stage) sees either the old output, nothing, or the whole new one.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stages.pipeline.runtime import PROJECT_ROOT


@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success move it onto ``target``.

    Works for files and folders. On an exception the temporary path is removed and ``target`` is
    left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {target}")
        if tmp.is_dir():
            _remove(target)  # a folder cannot be renamed onto an existing one
        os.replace(tmp, target)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: Path | str, data: Mapping[str, Any]) -> None:
    """Write a small, stably ordered JSON file (metrics, records) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv(path: Path | str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write rows of equal keys as CSV atomically (a DVC plot source)."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def save_figure(fig: Any, path: Path | str) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def print_summary(title: str, rows: Sequence[tuple[str, Any]]) -> None:
    """The one-screen summary a stage prints when it is done."""
    width = max(len(k) for k, _ in rows)
    print(f"\n== {title} ==")
    for key, value in rows:
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"  {key:<{width}}  {shown}")


def written(*paths: Path) -> tuple[str, str]:
    """The summary row that names a stage's outputs, relative to the project (folders end in /)."""
    shown = (
        f"{p.relative_to(PROJECT_ROOT) if p.is_relative_to(PROJECT_ROOT) else p}"
        f"{'/' if p.is_dir() else ''}"
        for p in paths
    )
    return ("written", ", ".join(shown))
