"""Write the pinned environment: every distribution the project installs, at its installed version.

    python -m stages.tools.constraints > constraints.txt

The README's two commands install with ``-c constraints.txt``, so a fresh machine gets exactly the
versions the committed metrics were produced with: a newer ultralytics, opencv or numpy changes
augmentation and training, and so the metrics (see docs/reproducibility.md). Run this after a
deliberate upgrade, then re-run the pipeline and commit both. The pins are the closure of the
project's requirements with its ``test`` extra, read from the installed metadata;
the project itself is left out.

Reads pyproject.toml and the installed packages' metadata; writes the pins to stdout.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
from collections.abc import Iterable, Sequence

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from stages.pipeline import cli

PROJECT = "yolo-aerial-compress"
EXTRAS = ("test",)


def closure(root: str, extras: Iterable[str]) -> dict[str, str]:
    """Canonical name -> installed version of every distribution ``root[extras]`` pulls in."""
    found: dict[str, str] = {}
    todo = [(root, frozenset(extras))]
    while todo:
        name, active = todo.pop()
        dist = metadata.distribution(name)
        for line in dist.requires or []:
            req = Requirement(line)
            env = [{"extra": e} for e in active] or [{"extra": ""}]
            if req.marker and not any(req.marker.evaluate(e) for e in env):
                continue
            key = canonicalize_name(req.name)
            try:
                version = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                continue  # an optional dependency that is not installed (e.g. a platform's own)
            if key not in found:
                found[key] = version
                todo.append((req.name, frozenset(req.extras)))
    found.pop(canonicalize_name(root), None)
    return found


def render(pins: dict[str, str]) -> str:
    header = (
        "# The environment the committed metrics were produced with (python -m "
        "stages.tools.constraints).\n# Used as `pip install -c constraints.txt ...`; see "
        "docs/reproducibility.md.\n"
    )
    # A local version label (2.14.1+cu130) is dropped: `==2.14.1` then matches every build of it.
    return header + "".join(
        f"{name}=={re.sub(r'[+].*', '', version)}\n" for name, version in sorted(pins.items())
    )


def main(argv: Sequence[str] | None = None) -> None:
    cli.parser(__doc__).parse_args(argv)
    sys.stdout.write(render(closure(PROJECT, EXTRAS)))


if __name__ == "__main__":
    cli.run(main)
