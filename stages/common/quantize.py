"""INT8 post-training quantization of an exported detector: one Q/DQ ONNX model for TensorRT and
ONNX Runtime.

The model is quantized statically with ``onnxruntime.quantization`` (ModelOpt's ONNX PTQ would
need a CUDA build to install and calibrate; ONNX Runtime's runs on any CPU and writes the same
standard QuantizeLinear/DequantizeLinear nodes). It follows TensorRT's rules for explicit
quantization, so that TensorRT can build an engine from this very file:

- activations and weights are signed INT8, symmetric, zero point 0;
- weights are quantized per output channel (axis 0 of a Conv weight), activations per tensor.

:func:`tensorrt_rule_violations` checks that on the graph itself.

Activation ranges come from calibration images (the caller passes training images): MinMax over
them. Every operator type ONNX Runtime can quantize is quantized (convolutions, SiLU's Sigmoid and
Mul, Add, Concat, pooling, resize), except the nodes named by the exclusion patterns: regular
expressions searched in ONNX node names, where ``{head}`` stands for the Detect module (e.g.
``model.22``). The defaults keep the head's box decoding (DFL, anchors, strides) and its final
concat in float: they turn logits into pixel coordinates, where an INT8 step would be a pixel error.

ONNX Runtime on x86 runs INT8 convolutions fast only with unsigned activations (U8S8; signed
activations take a slow path without VNNI). :func:`onnxruntime_view` rewrites each activation's
INT8 zero point 0 as UINT8 zero point 128 — the same real values, bit for bit — when a session is
created, so the artifact on disk stays the one TensorRT reads.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from stages.common.cli import UserError
from stages.common.runtime import cpu_threads

HEAD = "{head}"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def head_name(model: onnx.ModelProto) -> str:
    """The module that writes the model's first output (the Detect head), e.g. ``model.22``."""
    output = model.graph.output[0].name
    producer = next(n for n in model.graph.node if output in n.output)
    parts = producer.name.strip("/").split("/")
    if len(parts) < 2:
        raise UserError(
            f"cannot tell the Detect head from the output node {producer.name!r}: expected "
            f"ultralytics' export names such as '/model.22/Concat_3'."
        )
    return parts[0]


def excluded_nodes(model: onnx.ModelProto, patterns: Sequence[str], key: str) -> list[str]:
    """Names of the nodes the patterns match; a pattern that matches none is a params error."""
    head = head_name(model)
    names = [n.name for n in model.graph.node]
    chosen: set[str] = set()
    for pattern in patterns:
        regex = re.compile(pattern.replace(HEAD, re.escape(head)))
        hits = {name for name in names if regex.search(name)}
        if not hits:
            raise UserError(
                f"params.yaml: {key} pattern {pattern!r} names no node of the exported model "
                f"(its Detect head is {head!r}; node names look like {names[0]!r}, "
                f"{names[len(names) // 2]!r}, {names[-1]!r}). Fix the pattern or remove it."
            )
        chosen |= hits
    return sorted(chosen)


@contextlib.contextmanager
def _root_logging(level: int) -> Iterator[None]:
    """The root logger (which onnxruntime.quantization logs to) at ``level`` for a while."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(before)


class _Images(CalibrationDataReader):
    """Feeds calibration images to ONNX Runtime's calibrator in the model's static batch."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int) -> None:
        self.batches: Iterator[np.ndarray] = (
            images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)
        )
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: np.ascontiguousarray(batch)}


def quantize_int8(
    fp32: Path,
    out: Path,
    images: np.ndarray,
    exclude: Sequence[str],
    method: str = "percentile",
    key: str = "trt_build.int8_exclude",
) -> list[str]:
    """Write the INT8 Q/DQ model of ``fp32`` to ``out``, calibrated on ``images`` (N x 3 x H x W
    in [0, 1]) with ``method`` (minmax, percentile, entropy); returns the names of the nodes kept
    in float. ``key`` names the exclusion list in error messages."""
    model = onnx.load(fp32)
    batch = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value
    if len(images) < batch:
        raise UserError(
            f"{len(images)} calibration images are fewer than the model's static batch {batch}: "
            f"add images or lower trt_build.batch."
        )
    kept_float = excluded_nodes(model, exclude, key)
    # Its progress prints and its advice to pre-process (shape inference, which the exported,
    # simplified model has already had) would fill the stage's log.
    try:
        with contextlib.redirect_stdout(io.StringIO()), _root_logging(logging.ERROR):
            quantize_static(
                str(fp32),
                str(out),
                _Images(model.graph.input[0].name, images, batch),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                # 7-bit weights: x86 CPUs without VNNI add pairs of uint8 x int8 products in int16
                # (VPMADDUBSW), which full-range weights saturate; measured, that cost 0.2 detection
                # agreement with fp32. TensorRT reads them as ordinary INT8 weights.
                reduce_range=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=kept_float,
                calibrate_method={
                    "minmax": CalibrationMethod.MinMax,
                    "percentile": CalibrationMethod.Percentile,
                    "entropy": CalibrationMethod.Entropy,
                }[method],
                extra_options={
                    "ActivationSymmetric": True,
                    "WeightSymmetric": True,
                    "QuantizeBias": False,  # float biases: TensorRT reads no INT32 DequantizeLinear
                },
            )
    except ValueError as err:
        if "Too many bins" not in str(err) or method == "minmax":
            raise
        raise UserError(
            f"INT8 calibration by {method} failed: a tensor's calibration values are nearly "
            f"constant ({_histogram_tensor(err)}), too narrow a range for its 2048-bin histogram; "
            f"a barely trained layer or attention over a tiny map (small imgsz) does it. Set "
            f"trt_build.int8_calibration: minmax, or calibrate at a larger imgsz."
        ) from err
    return kept_float


def _histogram_tensor(err: ValueError) -> str:
    """The tensor ONNX Runtime's histogram calibrator was collecting when ``err`` was raised."""
    tb = err.__traceback__
    while tb is not None:
        tensor = tb.tb_frame.f_locals.get("tensor")
        if isinstance(tensor, str):
            return tensor
        tb = tb.tb_next
    return "unnamed"


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def tensorrt_rule_violations(model: onnx.ModelProto) -> list[str]:
    """What in a Q/DQ model breaks TensorRT's explicit-quantization rules (empty: none).

    Every Q/DQ node must have an INT8 zero point of 0 and positive scales; a DequantizeLinear of a
    constant (a weight) feeding a Conv must be per output channel (axis 0, one scale per filter);
    an activation's must be per tensor (one scale).
    """
    constants = _initializers(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    problems = []
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        scale = constants.get(node.input[1])
        zero = constants.get(node.input[2]) if len(node.input) > 2 else None
        if zero is None or zero.dtype != np.int8 or np.any(zero != 0):
            dtype = None if zero is None else zero.dtype
            problems.append(f"{node.name}: zero point must be int8 0, is {dtype}")
        if scale is None or np.any(scale <= 0):
            problems.append(f"{node.name}: scales must be constant and > 0")
            continue
        weight = constants.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if weight is None:
            if scale.size != 1:
                problems.append(f"{node.name}: an activation must be quantized per tensor")
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        feeds_conv_weight = any(
            user.op_type == "Conv" and user.input[1] == node.output[0]
            for user in consumers.get(node.output[0], [])
        )
        if feeds_conv_weight and (axis != 0 or scale.size != weight.shape[0]):
            problems.append(
                f"{node.name}: a Conv weight must be quantized per output channel "
                f"(axis 0, {weight.shape[0]} scales), is axis {axis} with {scale.size}"
            )
    return problems


def quantization_summary(model: onnx.ModelProto) -> dict[str, int]:
    """How many convolutions run in INT8 (weights through a DequantizeLinear) and in float."""
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    int8 = sum(1 for n in convs if n.input[1] in dequantized)
    return {"int8_convs": int8, "float_convs": len(convs) - int8}


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in QDQ_OPS for n in model.graph.node)


def onnxruntime_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with activations as UINT8, zero point 128 (x86's fast INT8 path).

    int8 q with zero point 0 and uint8 q + 128 with zero point 128 stand for the same real value
    (q * scale), and quantizing rounds and clips to the same grid, so outputs are unchanged.
    Weights (constants into a DequantizeLinear) stay INT8.
    """
    view = onnx.ModelProto()
    view.CopyFrom(model)
    constants = _initializers(view)
    shifted: dict[str, str] = {}
    for node in view.graph.node:
        if node.op_type not in QDQ_OPS or len(node.input) < 3:
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in constants:
            continue  # a weight
        zero = node.input[2]
        if constants[zero].dtype != np.int8:
            continue
        if zero not in shifted:
            shifted[zero] = f"{zero}_uint8"
            values = (constants[zero].astype(np.int16) + 128).astype(np.uint8)
            view.graph.initializer.append(numpy_helper.from_array(values, shifted[zero]))
        node.input[2] = shifted[zero]
    used = {name for node in view.graph.node for name in node.input}
    stale = [
        init for init in view.graph.initializer if init.name in shifted and init.name not in used
    ]
    for init in stale:
        view.graph.initializer.remove(init)
    return view


def as_run_here(path: Path, folder: Path) -> Path:
    """``path``, or for a Q/DQ model its :func:`onnxruntime_view` written into ``folder``: the
    file to give a tool that opens its own ONNX Runtime session (ultralytics' validation), so that
    it runs what :func:`onnx_session` runs."""
    model = onnx.load(path)
    if not is_quantized(model):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    view = folder / path.name
    onnx.save(onnxruntime_view(model), view)
    return view


def onnx_session(path: Path) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of ``path`` (a Q/DQ model through :func:`onnxruntime_view`).

    Idle threads do not spin: they would slow the other models timed in turn with this one.
    """
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = cpu_threads()
    model = onnx.load(path)
    source = onnxruntime_view(model).SerializeToString() if is_quantized(model) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def raw_outputs(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    """The model's raw output (N x (4 + classes) x anchors: boxes in pixels, class scores) for
    ``images``, run in the model's static batch (a short last batch is left out)."""
    name = session.get_inputs()[0].name
    batch = session.get_inputs()[0].shape[0]
    runs = [
        session.run(None, {name: np.ascontiguousarray(images[i : i + batch])})[0]
        for i in range(0, len(images) - batch + 1, batch)
    ]
    return np.concatenate(runs)


def detections(raw: np.ndarray, conf: float = 0.25) -> list[np.ndarray]:
    """Per image, detections after ultralytics' NMS: rows of x1, y1, x2, y2, score, class."""
    import torch
    from ultralytics.utils.nms import non_max_suppression

    kept = non_max_suppression(torch.from_numpy(raw), conf_thres=conf, iou_thres=0.7)
    return [k[:, :6].numpy() for k in kept]


def divergence(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """How far ``other``'s raw outputs are from ``reference``'s: detection agreement (see
    :func:`agreement`) and the largest differences of class scores and of box coordinates."""
    return {
        **agreement(detections(reference), detections(other)),
        "max_abs_score_diff": round(float(np.abs(other[:, 4:] - reference[:, 4:]).max()), 4),
        "max_abs_box_diff_px": round(float(np.abs(other[:, :4] - reference[:, :4]).max()), 2),
    }


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (n x 4, x1 y1 x2 y2) with every box of ``b`` (m x 4)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(axis=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def matched(reference: np.ndarray, other: np.ndarray, iou: float = 0.5) -> int:
    """How many detections of ``other`` match one of ``reference`` (same class, IoU >= iou), each
    used once; pairs are taken greedily from the highest IoU down."""
    if not len(reference) or not len(other):
        return 0
    overlap = _iou(reference[:, :4], other[:, :4])
    overlap[reference[:, 5][:, None] != other[:, 5][None, :]] = 0
    pairs = 0
    while True:
        r, o = np.unravel_index(np.argmax(overlap), overlap.shape)
        if overlap[r, o] < iou:
            return pairs
        pairs += 1
        overlap[r, :] = 0
        overlap[:, o] = 0


def agreement(reference: list[np.ndarray], other: list[np.ndarray]) -> dict[str, float]:
    """How well ``other``'s detections reproduce ``reference``'s over a set of images: the F1 of
    matched detections (1: the same detections; 0: none in common; 1 when both find nothing)."""
    pairs = sum(matched(r, o) for r, o in zip(reference, other, strict=True))
    n_reference = sum(len(r) for r in reference)
    n_other = sum(len(o) for o in other)
    total = n_reference + n_other
    return {
        "f1": round(2 * pairs / total, 4) if total else 1.0,
        "reference_detections": n_reference,
        "detections": n_other,
        "matched": pairs,
    }
