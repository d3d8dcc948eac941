"""Commands around the pipeline (not DVC stages), run on demand: `python -m stages.tools.<name>`."""

from __future__ import annotations

import subprocess

from stages.pipeline.cli import UserError
from stages.pipeline.runtime import PROJECT_ROOT


def dvc(*args: str) -> str:
    """The output of `dvc <args>` in the project; a UserError with DVC's message if it fails."""
    command = ["dvc", *args]
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"`{' '.join(command)}` failed:\n{done.stderr}")
    return done.stdout
