"""params.yaml validation: every bad value fails early and names the key, value and rule."""

from __future__ import annotations

import ast
import copy
import hashlib
import importlib
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.pipeline.cli import UserError
from stages.pipeline.params import DEVICE, Device, Int, ParamsError, load, read_yaml, validate
from stages.yolo.models import check_model_source
from tests.conftest import PROJECT_ROOT, STAGES


def _schema(stage: str) -> dict:
    return importlib.import_module(f"stages.{stage}").SCHEMA


def _raw() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


def expect_param_error(schema: dict, section: str, key: str, value: object, message: str) -> None:
    """params.yaml with ``section.key = value`` must fail validation with ``message``."""
    raw = _raw()
    raw[section][key] = value
    with pytest.raises(ParamsError) as err:
        validate(schema, raw)
    assert message in str(err.value)


@pytest.mark.parametrize("stage", STAGES)
def test_params_yaml_is_valid_for_every_stage(stage: str) -> None:
    validate(_schema(stage), _raw())


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_declares_exactly_the_params_each_stage_reads(stage: str) -> None:
    """A param read but not declared goes stale silently; one declared but unread re-runs."""
    dvc = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    assert sorted(dvc["stages"][stage]["params"]) == sorted(_schema(stage))


_IMPORTED_FILES = """
import sys, stages.{stage}
print(' '.join(sorted({{m.__file__ for n, m in list(sys.modules.items())
                        if n.startswith('stages.') and getattr(m, '__file__', None)}})))
"""


def _docstring_only(path: Path) -> bool:
    return all(
        isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        for node in ast.parse(path.read_text()).body
    )


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_declares_exactly_the_code_each_stage_imports(stage: str) -> None:
    """A stage's code deps are the project files it imports, no more and no fewer (a package's
    __init__ that holds only a docstring can change nothing, and is left out)."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTED_FILES.format(stage=stage)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    files = {Path(f).resolve().relative_to(PROJECT_ROOT) for f in done.stdout.split()}
    imported = {str(f) for f in files if not (f.name == "__init__.py" and _docstring_only(f))}
    dvc = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    declared = {d for d in dvc["stages"][stage]["deps"] if d.startswith("stages/")}
    assert declared == imported


def test_the_teacher_depends_on_no_algorithm() -> None:
    """Changing the method never retrains the baseline (the costliest stage)."""
    dvc = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    assert not [d for d in dvc["stages"]["baseline"]["deps"] if d.startswith("stages/compress")]


def test_every_params_yaml_section_is_read_by_some_stage() -> None:
    read = set().union(*(_schema(s) for s in STAGES))
    assert set(_raw()) == read


@pytest.mark.parametrize(
    ("stage", "path", "value", "message"),
    [
        (
            "baseline",
            ("baseline", "epochs"),
            0,
            "baseline.epochs = 0 is invalid: expected an integer in [1, 10000]",
        ),
        (
            "baseline",
            ("baseline", "lr0"),
            0.0,
            "baseline.lr0 = 0.0 is invalid: expected a number in (0, 1]",
        ),
        ("baseline", ("baseline", "lr0"), "fast", "baseline.lr0 = 'fast' is invalid"),
        ("baseline", ("baseline", "optimizer"), "Lion", "expected one of 'SGD', 'Adam', 'AdamW'"),
        (
            "baseline",
            ("baseline", "mosaic"),
            1.5,
            "baseline.mosaic = 1.5 is invalid: expected a number in [0, 1]",
        ),
        (
            "baseline",
            ("device",),
            "gpu",
            "device = 'gpu' is invalid: expected 'cpu' or CUDA device",
        ),
        ("baseline", ("seed",), True, "seed = True is invalid: expected an integer >= 0"),
        ("dataset", ("dataset", "source"), "coco", "dataset.source = 'coco' is invalid"),
        (
            "dataset",
            ("dataset", "synthetic", "train_images"),
            -3,
            "dataset.synthetic.train_images = -3",
        ),
        (
            "evaluate",
            ("evaluate", "latency_repeats"),
            2.5,
            "evaluate.latency_repeats = 2.5 is invalid",
        ),
    ],
)
def test_bad_values_name_key_value_and_rule(
    stage: str, path: tuple, value: object, message: str
) -> None:
    raw = copy.deepcopy(_raw())
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ParamsError) as err:
        validate(_schema(stage), raw)
    assert message in str(err.value)
    assert "dvc exp run -S" in str(err.value)


def test_unknown_key_is_rejected_with_the_allowed_ones() -> None:
    raw = _raw()
    raw["baseline"]["epoch"] = 3
    with pytest.raises(ParamsError, match=r"unknown key baseline\.epoch; the keys allowed"):
        validate(_schema("baseline"), raw)


def test_missing_key_is_named() -> None:
    raw = _raw()
    del raw["dataset"]["synthetic"]["objects_max"]
    with pytest.raises(ParamsError, match=r"missing key dataset\.synthetic\.objects_max"):
        validate(_schema("dataset"), raw)


def test_device_accepts_cpu_and_indices() -> None:
    for value, expected in (("cpu", "cpu"), (0, "0"), ("0,1", "0,1")):
        assert DEVICE.check("device", value) == expected


def test_any_ultralytics_detector_config_is_a_model_and_the_rest_is_refused() -> None:
    for config in ("yolov8m.yaml", "yolov8n-p2.yaml", "yolo11n.yaml", "yolo26n.yaml"):
        assert check_model_source("baseline.model", config) == config
    with pytest.raises(ParamsError, match=r"'yolov9z\.yaml' does not build a model"):
        check_model_source("baseline.model", "yolov9z.yaml")
    with pytest.raises(ParamsError, match="has a Segment head for segment, not detection"):
        check_model_source("baseline.model", "yolov8n-seg.yaml")
    with pytest.raises(ParamsError, match="ending in RTDETRDecoder, not a YOLO detection"):
        check_model_source("baseline.model", "rtdetr-l.yaml")
    with pytest.raises(ParamsError, match="is not a model: expected an ultralytics detection"):
        check_model_source("baseline.model", "yolov8n")
    with pytest.raises(ParamsError, match="no such file"):
        check_model_source("baseline.model", "weights/missing.pt")


def test_imgsz_must_be_a_multiple_of_32() -> None:
    raw = _raw()
    raw["imgsz"] = 100
    with pytest.raises(ParamsError, match=r"imgsz = 100 is invalid: .* multiple of 32"):
        validate(_schema("evaluate"), raw)


def test_malformed_params_file(tmp_path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load({"seed": Int(0)}, bad)
    with pytest.raises(ParamsError, match="not found"):
        load({"seed": Int(0)}, tmp_path / "nope.yaml")


class _TouchOnUnpickle:
    """Unpickling it creates a file: proof that something loaded the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_weights_are_hashed_before_they_are_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    weights = tmp_path / "pretrained.pt"
    weights.write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    right = hashlib.sha256(weights.read_bytes()).hexdigest()
    with pytest.raises(UserError, match=f"sha256 is {right}, not the expected {'0' * 64}"):
        check_model_source("baseline.model", str(weights), "0" * 64)
    assert not marker.exists()
    assert check_model_source("baseline.model", str(weights), right.upper()) == str(weights)
    assert not marker.exists()  # checking never loads it either


def test_a_sha256_for_a_config_or_a_malformed_one_is_refused() -> None:
    with pytest.raises(ParamsError, match=r"a sha256 is given for baseline\.model"):
        check_model_source("baseline.model", "yolov8n.yaml", "a" * 64)
    expect_param_error(
        _schema("baseline"), "baseline", "weights_sha256", "abc123", "64 hex digits of a sha256"
    )


def test_a_cuda_device_the_machine_lacks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("stages.pipeline.params.cuda_devices", lambda: 0)
    assert Device().check("device", "cpu") == "cpu"
    with pytest.raises(ParamsError, match=r"device = '0' names CUDA device 0, but torch sees no"):
        Device().check("device", 0)
    monkeypatch.setattr("stages.pipeline.params.cuda_devices", lambda: 2)
    assert Device().check("device", "0,1") == "0,1"
    with pytest.raises(ParamsError, match=r"names CUDA device 2, but torch sees 2 CUDA device"):
        Device().check("device", "0,2")


def test_a_key_given_twice_is_refused_with_its_line(tmp_path: Path) -> None:
    doubled = tmp_path / "params.yaml"
    doubled.write_text("seed: 0\nprune:\n  ratio: 0.5\n  ratio: 0.6\n")
    with pytest.raises(ParamsError, match=r"params\.yaml:4: the key 'ratio' is given twice"):
        read_yaml(doubled)
