"""INT8 Q/DQ quantization: TensorRT's rules on the graph, the exclusions, ONNX Runtime's view of
the model, the agreement measure, and INT8 against fp32 on real aerial images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from onnx import numpy_helper
from ultralytics.nn.tasks import DetectionModel

from stages.compress import quantize
from stages.deploy import agreement, onnxrt
from stages.deploy.export import export_model_onnx
from stages.pipeline.cli import UserError
from stages.pipeline.images import calibration_batch
from stages.pipeline.runtime import PROJECT_ROOT
from tests.test_prune import _pruned_model

IMGSZ = 128
EXCLUDE = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())["trt_build"]["int8_exclude"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A pruned random-weight yolov8n exported by the stage code, and its INT8 Q/DQ model with the
    default exclusions, calibrated on random images."""
    folder = tmp_path_factory.mktemp("int8")
    fp32 = folder / "model.onnx"
    export_model_onnx(_pruned_model(seed=1), fp32, IMGSZ, batch=1, opset=17)
    images = np.random.default_rng(0).random((4, 3, IMGSZ, IMGSZ), dtype=np.float32)
    quantize.quantize_int8(fp32, folder / "model.int8.onnx", images, EXCLUDE, "minmax")
    return fp32, folder / "model.int8.onnx"


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_the_qdq_graph_follows_tensorrt_rules(quantized) -> None:
    """Read off the graph directly: symmetric signed INT8 with zero point 0 everywhere, weights
    per output channel (axis 0, one scale per filter), activations per tensor."""
    model = onnx.load(quantized[1])
    constants = _constants(model)
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    weights = activations = 0
    for node in model.graph.node:
        if node.op_type not in quantize.QDQ_OPS:
            continue
        zero, scale = constants[node.input[2]], constants[node.input[1]]
        assert zero.dtype == np.int8 and not zero.any(), node.name
        if node.input[0] in constants:  # a weight, dequantized into a Conv
            weight = constants[node.input[0]]
            assert node.output[0] in conv_weights and weight.dtype == np.int8
            axis = next(a.i for a in node.attribute if a.name == "axis")
            assert axis == 0 and scale.shape == (weight.shape[0],), node.name
            assert np.abs(weight).max() <= 64  # 7-bit weights (see quantize_int8)
            weights += 1
        else:
            assert scale.size == 1, node.name
            activations += 1
    assert weights > 40 and activations > 40
    assert quantize.tensorrt_rule_violations(model) == []


def test_the_rule_check_finds_each_kind_of_violation(quantized) -> None:
    model = onnx.load(quantized[1])
    weight_dq = next(
        n for n in model.graph.node if n.op_type == "DequantizeLinear" and "weight" in n.input[0]
    )
    activation_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    next(a for a in weight_dq.attribute if a.name == "axis").i = 1
    for init in model.graph.initializer:
        if init.name == activation_q.input[2]:
            init.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), init.name))
    problems = "\n".join(quantize.tensorrt_rule_violations(model))
    assert f"{weight_dq.name}: a Conv weight must be quantized per output channel" in problems
    assert f"{activation_q.name}: zero point must be int8 0" in problems


def test_the_exclusions_keep_the_box_decoding_and_logits_in_float(quantized) -> None:
    fp32, int8 = (onnx.load(p) for p in quantized)
    head = quantize.head_name(fp32)
    assert head == "model.22"
    kept = quantize.excluded_nodes(fp32, EXCLUDE, "trt_build.int8_exclude")
    assert f"/{head}/dfl/conv/Conv" in kept and f"/{head}/cv3.0/cv3.0.2/Conv" in kept
    assert not any("/cv2.0.0/" in name for name in kept)  # the branches' inner convs: INT8
    # A kept node computes in float: its weights are not dequantized INT8, and its output is
    # not quantized (its input may come from a quantized producer).
    weight_dq = {
        n.output[0]: n.input[0]
        for n in int8.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in _constants(int8)
    }
    quantized_inputs = {n.input[0] for n in int8.graph.node if n.op_type == "QuantizeLinear"}
    for node in int8.graph.node:
        if node.name in kept:
            assert not weight_dq.keys() & set(node.input), node.name
            assert not quantized_inputs & set(node.output), node.name
    summary = quantize.quantization_summary(int8)
    assert summary["float_convs"] == 7 and summary["int8_convs"] > 40


def test_an_exclusion_that_names_no_node_is_a_clear_error(quantized) -> None:
    fp32 = onnx.load(quantized[0])
    with pytest.raises(UserError, match=r"int8_exclude pattern '/model\.99/' names no node"):
        quantize.excluded_nodes(fp32, ["/{head}/dfl/", "/model.99/"], "trt_build.int8_exclude")


def test_onnxruntime_view_is_the_same_model_bit_for_bit(quantized) -> None:
    """Run both without graph optimizations (plain QuantizeLinear/DequantizeLinear semantics):
    int8 with zero point 0 and uint8 with zero point 128 give identical outputs."""
    model = onnx.load(quantized[1])
    view = onnxrt.onnxruntime_view(model)
    zeros = _constants(view)
    activation_zeros = {
        n.input[2]
        for n in view.graph.node
        if n.op_type in quantize.QDQ_OPS and n.input[0] not in zeros  # activations only
    }
    assert {zeros[z].dtype for z in activation_zeros} == {np.dtype(np.uint8)}
    assert all((zeros[z] == 128).all() for z in activation_zeros)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = np.random.default_rng(5).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    outputs = [
        ort.InferenceSession(m.SerializeToString(), options).run(None, {"images": x})[0]
        for m in (model, view)
    ]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_agreement_by_hand() -> None:
    def boxes(*rows: tuple) -> np.ndarray:
        return np.array(rows, dtype=np.float32).reshape(-1, 6)

    a = boxes((0, 0, 10, 10, 0.9, 1), (20, 20, 30, 30, 0.8, 2))
    # One box moved by 1 px (IoU 81/119 = 0.68, a match), one of another class (no match).
    b = boxes((1, 1, 11, 11, 0.7, 1), (20, 20, 30, 30, 0.8, 3))
    assert agreement.matched(a, b) == 1
    assert agreement.agreement([a], [b])["f1"] == pytest.approx(2 * 1 / 4)
    assert agreement.agreement([a], [a])["f1"] == 1.0
    assert agreement.agreement([a, boxes()], [boxes(), boxes()])["f1"] == 0.0
    assert agreement.agreement([boxes()], [boxes()])["f1"] == 1.0  # nothing found by either
    far = boxes((5, 5, 15, 15, 0.9, 1))  # IoU 25/175 with the first box: no match
    assert agreement.matched(a, far) == 0
    # Each detection is matched once: two copies of one box match one reference box.
    assert agreement.matched(a[:1], boxes((0, 0, 10, 10, 0.9, 1), (0, 0, 10, 10, 0.8, 1))) == 1


DEPLOYED = PROJECT_ROOT / "models" / "deploy" / "model.onnx"


@pytest.mark.skipif(
    not DEPLOYED.is_file(), reason="needs the trained default model: run `dvc repro` first"
)
def test_int8_detections_match_fp32_on_real_aerial_images(visdrone_sample: Path, tmp_path: Path):
    """The pipeline's trained detector, quantized as trt_build does (calibrated on 16 real frames),
    finds the same objects as in fp32 on 32 other real VisDrone frames."""
    imgsz = onnx.load(DEPLOYED).graph.input[0].type.tensor_type.shape.dim[2].dim_value
    images = calibration_batch(visdrone_sample / "images", 48, imgsz).numpy()
    int8 = tmp_path / "model.int8.onnx"
    quantize.quantize_int8(DEPLOYED, int8, images[:16], EXCLUDE, "percentile")
    reference = onnxrt.raw_outputs(onnxrt.onnx_session(DEPLOYED), images[16:])
    divergence = agreement.divergence(
        reference, onnxrt.raw_outputs(onnxrt.onnx_session(int8), images[16:])
    )
    print(divergence)
    assert divergence["reference_detections"] >= 100  # it does detect things on real frames
    assert divergence["f1"] >= 0.85


def test_a_near_constant_tensor_is_a_clear_calibration_error(tmp_path: Path) -> None:
    """An untrained YOLO11 at 64 px has nearly constant tensors (after 1 epoch, its attention's
    softmax over a 2x2 map is 0.25 everywhere), too narrow for the percentile histogram. The
    error names the method, the tensor and the fix, and minmax calibrates the same model."""
    torch.manual_seed(0)
    model = DetectionModel("yolo11n.yaml", nc=10, verbose=False).eval()
    fp32 = tmp_path / "yolo11n.onnx"
    export_model_onnx(model, fp32, 64, 1, 17)
    images = np.random.default_rng(0).random((4, 3, 64, 64), dtype=np.float32)
    with pytest.raises(
        UserError,
        match=r"by percentile failed: .* constant \(/model\.\d+/.*int8_calibration: minmax",
    ):
        quantize.quantize_int8(fp32, tmp_path / "p.onnx", images, [], "percentile")
    assert not (tmp_path / "p.onnx").exists()
    quantize.quantize_int8(fp32, tmp_path / "m.onnx", images, [], "minmax")
    assert quantize.tensorrt_rule_violations(onnx.load(tmp_path / "m.onnx")) == []
