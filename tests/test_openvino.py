"""OpenVINO deployment: the IR computes what ONNX Runtime computes, ultralytics runs its folder the
same way, INT8 really runs in 8 bits, the ISA cap and the telemetry, and a model OpenVINO cannot
compile named in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from ultralytics import YOLO

from stages.compress import quantize
from stages.deploy import openvino
from stages.deploy.agreement import agreement
from stages.deploy.onnxrt import onnx_session, raw_outputs
from stages.pipeline.cli import UserError
from stages.pipeline.images import calibration_batch, image_files
from stages.pipeline.runtime import PROJECT_ROOT, has_avx2
from tests.test_trt_build import IMGSZ, exported  # noqa: F401  (the fixture)


@pytest.fixture
def aerial(visdrone_sample: Path) -> np.ndarray:
    """Four real VisDrone frames, letterboxed."""
    return calibration_batch(visdrone_sample / "images", 4, IMGSZ).numpy()


@pytest.fixture(scope="module")
def ir(exported) -> Path:  # noqa: F811
    return openvino.write_ir(exported[0])


def test_the_ir_computes_what_onnx_runtime_computes_in_fp32(exported, ir, aerial) -> None:  # noqa: F811
    """Another runtime on the same file is the reference: real aerial frames, boxes in pixels."""
    model = openvino.compiled(ir)
    assert str(model.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    got = openvino.raw_outputs(model, aerial)
    expected = raw_outputs(onnx_session(exported[0]), aerial)
    assert got.shape == expected.shape == (4, 4 + 10, 2100)
    np.testing.assert_allclose(got[:, :4], expected[:, :4], rtol=0, atol=1e-3 * IMGSZ)
    np.testing.assert_allclose(got[:, 4:], expected[:, 4:], rtol=0, atol=1e-4)


def test_ultralytics_runs_the_folder_like_the_onnx_model(exported, ir, visdrone_sample) -> None:  # noqa: F811
    """AutoBackend finds the IR and the metadata (names, stride, imgsz) in the folder; under
    as_compiled_here it compiles in f32 and predicts the ONNX model's boxes."""
    image = str(image_files(visdrone_sample / "images")[0])
    with openvino.as_compiled_here():
        on_openvino = YOLO(str(ir), task="detect")
        got = on_openvino.predict(image, imgsz=IMGSZ, conf=0.001, verbose=False)[0]
        compiled = on_openvino.predictor.model.backend.ov_compiled_model
        assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    expected = YOLO(str(exported[0]), task="detect").predict(
        image, imgsz=IMGSZ, conf=0.001, verbose=False
    )[0]
    assert got.names == expected.names and len(expected.boxes) > 10
    # A random-weight model's scores nearly tie, so NMS may keep one box more or less.
    boxes = [np.c_[r.boxes.xyxy, r.boxes.conf, r.boxes.cls] for r in (expected, got)]
    assert agreement([boxes[0]], [boxes[1]])["f1"] > 0.95
    assert os.environ.get(openvino.ISA_CAP) == ("AVX2" if has_avx2() else None)


def test_openvino_runs_in_int8_exactly_the_convs_the_qdq_model_quantized(
    exported,  # noqa: F811
    aerial,
    tmp_path: Path,
) -> None:
    """OpenVINO fuses each Q/DQ-wrapped Conv into an INT8 convolution: its runtime graph has as
    many 8-bit convolutions as the recipe quantized, and the excluded ones stay float."""
    qdq = tmp_path / "model.int8.onnx"
    exclude = ["/{head}/dfl/", r"/{head}/cv[23]\.\d+/cv[23]\.\d+\.2/"]
    quantize.quantize_int8(exported[0], qdq, aerial, exclude, "minmax")
    recipe = quantize.quantization_summary(onnx.load(qdq))
    counted = openvino.convolution_precisions(openvino.compiled(openvino.write_ir(qdq)))
    assert counted == {"int8_convs": recipe["int8_convs"], "float_convs": recipe["float_convs"]}
    assert counted["float_convs"] == 7  # the DFL conv and the six output convs


def test_the_ir_is_the_same_bytes_every_time(exported, tmp_path: Path) -> None:  # noqa: F811
    """DVC hashes models/deploy/: converting the same ONNX model twice must not change it."""
    first = openvino.write_ir(exported[0])
    files = {f.name: f.read_bytes() for f in first.iterdir()}
    copy = tmp_path / exported[0].name
    copy.write_bytes(exported[0].read_bytes())
    again = openvino.write_ir(copy)
    assert {f.name: f.read_bytes() for f in again.iterdir()} == files
    assert sorted(files) == ["metadata.yaml", "model.bin", "model.xml"]


def test_an_unreadable_model_is_named_in_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(UserError, match=r"^OpenVINO [\d.]+ cannot read model\.onnx: [^\n]+\.$"):
        openvino.write_ir(broken)


@pytest.mark.skipif(not has_avx2(), reason="the AVX2 cap only exists on x86 with AVX2")
def test_a_model_openvino_cannot_compile_names_the_node_and_the_reason(ir) -> None:
    """A real incompatibility: with oneDNN capped to AVX2 and OpenVINO's default precision (bf16
    where the CPU has it; fp32 fails too on some CPUs), OpenVINO has no kernel for SPPF's
    MaxPool. Compiled without lifting the cap, in a fresh process (the cap is read once)."""
    script = (
        "import stages\n"
        "from pathlib import Path\n"
        "from stages.deploy import openvino\n"
        "from stages.pipeline.cli import UserError\n"
        f"folder = Path({str(ir)!r})\n"
        "try:\n"
        "    openvino.compile_checked(openvino.ir_file(folder), folder.name, config={})\n"
        "except UserError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, openvino.ISA_CAP: "AVX2"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    message = done.stdout.strip().splitlines()[-1]
    assert message.startswith("OpenVINO ") and "cannot compile model_openvino_model" in message
    assert "MaxPool" in message and "Exception from" not in message, message


def test_the_isa_cap_is_lifted_only_inside_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(openvino.ISA_CAP, "AVX2")
    with openvino.kernel_cap_lifted():
        assert openvino.ISA_CAP not in os.environ
    assert os.environ[openvino.ISA_CAP] == "AVX2"
    with pytest.raises(KeyError), openvino.kernel_cap_lifted():
        raise KeyError("a failure inside")
    assert os.environ[openvino.ISA_CAP] == "AVX2"


def test_openvino_and_nncf_send_no_telemetry_and_write_nothing_home(tmp_path: Path) -> None:
    """Without the block, `import openvino` writes ~/intel/openvino_ga_cid and sends an event."""
    script = (
        "import stages, openvino, openvino.tools.ovc as ovc\n"
        "print(type(ovc.telemetry).__module__)\n"
    )
    env = {**os.environ, "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip().endswith("telemetry_stub")
    assert list(tmp_path.iterdir()) == []
