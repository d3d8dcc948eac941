"""Switch params.yaml between profiles, in place, keeping its comments and order.

    python -m stages.tools.profile visdrone   # the paper's setting (stages/profiles/)
    python -m stages.tools.profile default    # back to the embedded default
    dvc params diff                           # what the switch changed

A profile (stages/profiles/<name>.yaml) lists the keys it sets. default.yaml holds the embedded
default's value of every key another profile sets, so switching back restores params.yaml
exactly. A profile key that params.yaml does not have is an error, not a silent addition.

Reads stages/profiles/<name>.yaml and params.yaml; writes params.yaml (atomically).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.scalarstring import PlainScalarString, SingleQuotedScalarString

from stages.pipeline import cli
from stages.pipeline.outputs import atomic_path, print_summary
from stages.pipeline.runtime import PROJECT_ROOT

PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"
PARAMS = PROJECT_ROOT / "params.yaml"


def profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name: str) -> dict:
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise cli.UserError(f"no profile {name!r}: choose one of {', '.join(profiles())}.")
    return yaml.safe_load(path.read_text()) or {}


def _scalar(value: Any) -> Any:
    """Strings plain where YAML reads them back as the same string, quoted otherwise ('0', '')."""
    if not isinstance(value, str):
        return value
    plain = value != "" and yaml.safe_load(value) == value
    return PlainScalarString(value) if plain else SingleQuotedScalarString(value)


def apply_profile(params_text: str, profile: dict) -> tuple[str, list[tuple[str, Any, Any]]]:
    """params.yaml text with the profile's values set; returns it and (key, old, new) changes."""
    round_trip = YAML()
    round_trip.preserve_quotes = True
    round_trip.representer.add_representer(  # `null` stays `null`, not an empty value
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    params = round_trip.load(params_text)
    changes: list[tuple[str, Any, Any]] = []

    def set_values(target: Any, values: dict, prefix: str) -> None:
        for key, value in values.items():
            if not isinstance(target, dict) or key not in target:
                raise cli.UserError(
                    f"the profile sets {prefix}{key}, which params.yaml does not have: fix the "
                    f"profile or add the key to params.yaml."
                )
            if isinstance(value, dict):
                set_values(target[key], value, f"{prefix}{key}.")
            elif target[key] != value:
                changes.append((f"{prefix}{key}", target[key], value))
                target[key] = _scalar(value)

    set_values(params, profile, "")
    out = io.StringIO()
    round_trip.dump(params, out)
    return out.getvalue(), changes


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("profile", help=f"one of: {', '.join(profiles())}")
    args = parser.parse_args(argv)
    text, changes = apply_profile(PARAMS.read_text(), load_profile(args.profile))
    with atomic_path(PARAMS) as tmp:
        tmp.write_text(text)
    rows = [(key, f"{old!r} -> {new!r}") for key, old, new in changes] or [("", "no change")]
    rows.append(("next", "`dvc params diff` shows it; `dvc repro` runs what it makes stale"))
    print_summary(f"profile {args.profile} -> params.yaml", rows)


if __name__ == "__main__":
    cli.run(main)
