"""Loading and validating params.yaml.

Every stage declares the schema of the params it reads (the same top-level keys its dvc.yaml entry
lists under ``params:``) and calls :func:`load` before doing any work. A missing key, an unknown
key, a wrong type or an out-of-range value fails at once with a :class:`ParamsError` that names the
key, the value and what is allowed. params.yaml is the single source of values: the schemas hold
no defaults.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.pipeline.cli import UserError
from stages.pipeline.runtime import PROJECT_ROOT

PARAMS_FILE = PROJECT_ROOT / "params.yaml"


class ParamsError(UserError):
    """A value in params.yaml that a stage cannot use."""


def _fail(key: str, value: Any, allowed: str) -> ParamsError:
    return ParamsError(
        f"params.yaml: {key} = {value!r} is invalid: expected {allowed}. "
        f"Fix it in params.yaml or override it with `dvc exp run -S {key}=...`."
    )


@dataclass(frozen=True)
class Int:
    """An integer in [lo, hi] (either bound optional), optionally a multiple of ``multiple``."""

    lo: int | None = None
    hi: int | None = None
    multiple: int = 1

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"an integer in [{self.lo}, {self.hi}]"
        elif self.lo is not None:
            text = f"an integer >= {self.lo}"
        elif self.hi is not None:
            text = f"an integer <= {self.hi}"
        else:
            text = "an integer"
        return text + (f" that is a multiple of {self.multiple}" if self.multiple > 1 else "")

    def check(self, key: str, value: Any) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok and (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)
        if not ok or value % self.multiple:
            raise _fail(key, value, self.describe())
        return value


@dataclass(frozen=True)
class Float:
    """A real number between lo and hi; ``open_lo``/``open_hi`` exclude the bound itself."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False

    def describe(self) -> str:
        left = "-inf" if self.lo is None else f"{self.lo:g}"
        right = "inf" if self.hi is None else f"{self.hi:g}"
        lb = "(" if self.open_lo or self.lo is None else "["
        rb = ")" if self.open_hi or self.hi is None else "]"
        return f"a number in {lb}{left}, {right}{rb}"

    def check(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(key, value, self.describe())
        x = float(value)
        too_low = self.lo is not None and (x <= self.lo if self.open_lo else x < self.lo)
        too_high = self.hi is not None and (x >= self.hi if self.open_hi else x > self.hi)
        if too_low or too_high or x != x:  # x != x: NaN
            raise _fail(key, value, self.describe())
        return x


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of strings."""

    options: tuple[str, ...]

    def __init__(self, *options: str) -> None:
        object.__setattr__(self, "options", options)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)

    def check(self, key: str, value: Any) -> str:
        if value not in self.options:
            raise _fail(key, value, self.describe())
        return value


@dataclass(frozen=True)
class Str:
    """A non-empty string (a path, a model name, ...)."""

    def describe(self) -> str:
        return "a non-empty string"

    def check(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _fail(key, value, self.describe())
        return value


@dataclass(frozen=True)
class Pattern:
    """A string matching a regular expression."""

    regex: str
    description: str

    def describe(self) -> str:
        return self.description

    def check(self, key: str, value: Any) -> str:
        value = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(value, str) or not re.fullmatch(self.regex, value):
            raise _fail(key, value, self.describe())
        return value


# 'cpu' or CUDA device indices; a bare 0 in YAML is an int and is accepted as '0'.
DEVICE = Pattern(r"cpu|\d+(,\d+)*", "'cpu' or CUDA device indices such as '0' or '0,1'")


def cuda_devices() -> int:
    """How many CUDA devices torch sees here (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class Device:
    """'cpu', or indices of CUDA devices this machine has."""

    def describe(self) -> str:
        return DEVICE.describe()

    def check(self, key: str, value: Any) -> str:
        value = DEVICE.check(key, value)
        if value == "cpu":
            return value
        count = cuda_devices()
        missing = [i for i in value.split(",") if int(i) >= count]
        if missing:
            seen = f"{count} CUDA device(s), 0 to {count - 1}" if count else "no CUDA device"
            raise ParamsError(
                f"params.yaml: {key} = {value!r} names CUDA device {missing[0]}, but torch sees "
                f"{seen} on this machine. Set {key}: cpu (or `dvc exp run -S {key}=cpu`)."
            )
        return value


@dataclass(frozen=True)
class StrList:
    """A list of strings (possibly empty)."""

    def describe(self) -> str:
        return "a list of strings, e.g. [] or ['model.22']"

    def check(self, key: str, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise _fail(key, value, self.describe())
        return value


@dataclass(frozen=True)
class Regexes:
    """A list of regular expressions (possibly empty), each of which compiles."""

    def describe(self) -> str:
        return "a list of regular expressions, e.g. [] or ['/model.22/dfl/']"

    def check(self, key: str, value: Any) -> list[str]:
        StrList().check(key, value)
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as err:
                raise _fail(key, value, f"{self.describe()}; {pattern!r}: {err}") from None
        return value


@dataclass(frozen=True)
class PerLevel:
    """Numbers >= 0, one per detection level: a list in stride order, or a mapping stride ->
    number. How many levels there are is the model's to say (see the stage that reads it)."""

    def describe(self) -> str:
        return "a non-empty list of numbers >= 0, or a mapping stride -> number >= 0"

    def check(self, key: str, value: Any) -> list[float] | dict[int, float]:
        def number(v: Any) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and v >= 0

        if isinstance(value, list) and value and all(number(v) for v in value):
            return [float(v) for v in value]
        if (
            isinstance(value, Mapping)
            and value
            and all(number(v) for v in value.values())
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in value)
        ):
            return {s: float(v) for s, v in value.items()}
        raise _fail(key, value, self.describe())


@dataclass(frozen=True)
class Optional:
    """null, or a value the inner rule accepts."""

    inner: Any

    def describe(self) -> str:
        return f"null or {self.inner.describe()}"

    def check(self, key: str, value: Any) -> Any:
        if value is None:
            return None
        try:
            return self.inner.check(key, value)
        except ParamsError:
            raise _fail(key, value, self.describe()) from None


@dataclass(frozen=True)
class Bool:
    """true or false."""

    def describe(self) -> str:
        return "true or false"

    def check(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise _fail(key, value, self.describe())
        return value


@dataclass(frozen=True)
class Section:
    """A mapping with exactly the given keys, each checked by its own rule."""

    fields: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return "a mapping with keys " + ", ".join(self.fields)

    def check(self, key: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise _fail(key, value, self.describe())
        unknown = sorted(set(value) - set(self.fields))
        if unknown:
            raise ParamsError(
                f"params.yaml: unknown key {key}.{unknown[0]}; the keys allowed under {key} are: "
                f"{', '.join(self.fields)}. Check its spelling."
            )
        return {
            name: rule.check(f"{key}.{name}", _require(value, name, key))
            for name, rule in self.fields.items()
        }


def _require(mapping: Mapping[str, Any], name: str, parent: str) -> Any:
    if name not in mapping:
        where = f"{parent}.{name}" if parent else name
        raise ParamsError(
            f"params.yaml: missing key {where}; add it (the project's params.yaml has every key, "
            f"with a comment on its meaning)."
        )
    return mapping[name]


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a mapping with the same key twice (PyYAML keeps the last one
    silently; DVC refuses the file)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """The raw params mapping, with a clear error for a missing or malformed file."""
    if not path.exists():
        raise ParamsError(
            f"{path} not found: run the stage from the project root, next to dvc.yaml."
        )
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader
    except _DuplicateKey as err:
        raise ParamsError(
            f"{path}:{err.line}: the key {err.key!r} is given twice in one section; keep one."
        ) from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must hold a mapping of sections, not {type(data).__name__}.")
    return data


def validate(schema: Mapping[str, Any], raw: Mapping[str, Any]) -> dict[str, Any]:
    """Check the top-level keys named in ``schema`` (other stages' sections are left alone)."""
    return {name: rule.check(name, _require(raw, name, "")) for name, rule in schema.items()}


def load(schema: Mapping[str, Any], path: Path = PARAMS_FILE) -> dict[str, Any]:
    """Read params.yaml and return the validated values of the keys in ``schema``."""
    return validate(schema, read_yaml(path))


# Top-level settings shared by the stages that train or measure models.
COMMON = {"seed": Int(0), "imgsz": Int(32, 4096, multiple=32), "device": Device()}
