"""Deployment: ONNX export against PyTorch (random and real aerial images), the INT8 agreement
check, TensorRT detection."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from ultralytics.nn.tasks import DetectionModel

from stages.compress import quantize
from stages.deploy.export import export_model_onnx, export_onnx
from stages.pipeline.cli import UserError
from stages.pipeline.images import calibration_batch
from stages.pipeline.params import ParamsError
from stages.trt_build import (
    SCHEMA,
    check_params,
    max_exportable_opset,
    tensorrt_unavailable,
)
from tests.test_params import expect_param_error
from tests.test_prune import _pruned_model

HAS_TENSORRT = torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None
IMGSZ = 320


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DetectionModel, float]:
    """A pruned random-weight model saved as a checkpoint and exported to ONNX by the stage code."""
    model = _pruned_model(seed=3)
    folder = tmp_path_factory.mktemp("deploy")
    checkpoint = folder / "model.pt"
    torch.save({"model": model, "train_args": {"imgsz": IMGSZ}}, checkpoint)
    onnx = folder / "model.onnx"
    diff = export_onnx(checkpoint, onnx, IMGSZ, batch=1, opset=17)
    return onnx, model.float().eval(), diff


def _compare(onnx: Path, model: DetectionModel, x: np.ndarray) -> None:
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        expected = model(torch.from_numpy(x))[0].numpy()
    assert got.shape == expected.shape
    # Boxes are in pixels (up to imgsz) and scores in [0, 1]: tolerance relative to each.
    np.testing.assert_allclose(got[:, :4], expected[:, :4], rtol=0, atol=1e-3 * IMGSZ)
    np.testing.assert_allclose(got[:, 4:], expected[:, 4:], rtol=0, atol=1e-4)


def test_onnx_matches_pytorch_on_random_input(exported) -> None:
    onnx, model, diff = exported
    assert diff < 1e-3 * IMGSZ  # the stage's own check on its random input
    _compare(onnx, model, np.random.default_rng(1).random((1, 3, IMGSZ, IMGSZ), np.float32))


def test_onnx_matches_pytorch_on_real_aerial_images(exported, visdrone_sample: Path) -> None:
    onnx, model, _ = exported
    images = calibration_batch(visdrone_sample / "images", 4, IMGSZ).numpy()
    for image in images:  # 1360x765 and 1920x1080 VisDrone frames, letterboxed
        _compare(onnx, model, image[None])


def test_opset_beyond_the_exporter_is_refused() -> None:
    top = max_exportable_opset()
    cfg = {"opset": top + 1, "precision": "fp16", "calibration_images": 0}
    with pytest.raises(ParamsError, match=f"writes opsets up to {top}"):
        check_params(cfg)
    check_params({**cfg, "opset": top})


def test_int8_without_calibration_images_is_refused() -> None:
    with pytest.raises(ParamsError, match="'int8' needs calibration images"):
        check_params({"opset": 17, "precision": "int8", "calibration_images": 0})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("precision", "int4", "trt_build.precision = 'int4' is invalid: expected one of"),
        ("workspace_gb", 0, "trt_build.workspace_gb = 0 is invalid"),
        ("batch", 0, "trt_build.batch = 0 is invalid"),
    ],
)
def test_bad_params_name_the_key(key: str, value: object, message: str) -> None:
    expect_param_error(SCHEMA, "trt_build", key, value, message)


def test_the_reason_for_no_engine_is_specific() -> None:
    assert tensorrt_unavailable("cpu") == "params.yaml device is 'cpu'"
    reason = tensorrt_unavailable("0")
    if not torch.cuda.is_available():
        assert reason == "no CUDA device is available to torch"
    elif not HAS_TENSORRT:
        assert reason.startswith("tensorrt is not importable")


def test_an_int8_model_that_disagrees_with_fp32_is_not_deployed(
    tmp_path: Path, visdrone_sample: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A random-weight model with class logits around 0 "detects" hundreds of near-tied boxes per
    frame, which INT8 noise (here with every head conv quantized) reorders: the stage refuses it at
    a high threshold and records it at a low one."""
    import stages.trt_build as stage

    model = _pruned_model(seed=3)
    for branch in model.model[-1].cv3:  # class logits around 0: scores spread over (0, 1)
        torch.nn.init.zeros_(branch[-1].bias)
    onnx = tmp_path / "model.onnx"
    export_model_onnx(model, onnx, IMGSZ, batch=1, opset=17)
    monkeypatch.setattr(stage, "TRAIN_IMAGES", visdrone_sample / "images")
    monkeypatch.setattr(stage, "VAL_IMAGES", visdrone_sample / "images")
    cfg = {
        "calibration_images": 8,
        "int8_calibration": "minmax",
        "int8_exclude": ["/{head}/dfl/"],
        "int8_min_agreement": 0.99,
    }
    images = stage.int8_images(cfg, IMGSZ)
    with pytest.raises(UserError, match=r"reproduces only 0\.\d+ \(F1\) of the fp32 model's"):
        stage.quantize_checked(onnx, tmp_path / "q.onnx", cfg, images)
    record = stage.quantize_checked(
        onnx, tmp_path / "q.onnx", {**cfg, "int8_min_agreement": 0.0}, images
    )
    assert record["check_images"] == 8 and record["vs_fp32_f1"] < 0.99
    assert record["vs_fp32_reference_detections"] > 100  # the fp32 model did detect things
    assert record["int8_convs"] > 40 and record["float_convs"] == 1  # the DFL conv


@pytest.mark.skipif(not HAS_TENSORRT, reason="needs a CUDA GPU and the tensorrt package")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_engine_builds_and_matches(
    exported, tmp_path: Path, precision: str, visdrone_sample: Path
) -> None:
    """fp16 from the ONNX model; int8 from the Q/DQ model (explicit quantization)."""
    from ultralytics.nn.autobackend import AutoBackend

    import stages.trt_build as stage

    onnx, model, _ = exported
    source = onnx
    if precision == "int8":
        source = tmp_path / "model.int8.onnx"
        images = calibration_batch(visdrone_sample / "images", 16, IMGSZ).numpy()
        quantize.quantize_int8(onnx, source, images, ["/{head}/dfl/", "/{head}/[^/]+$"])
    engine = tmp_path / "model.engine"
    info = stage.build_engine(source, engine, precision, workspace_gb=2.0)
    assert engine.stat().st_size > 0 and info["tensorrt_version"]
    backend = AutoBackend(str(engine), device=torch.device("cuda:0"))
    x = calibration_batch(visdrone_sample / "images", 1, IMGSZ)
    with torch.no_grad():
        got = backend(x.cuda())
        got = (got[0] if isinstance(got, list | tuple) else got).float().cpu()
        expected = model(x)[0]
    assert (got[:, 4:] - expected[:, 4:]).abs().max() < (0.05 if precision == "int8" else 0.01)
