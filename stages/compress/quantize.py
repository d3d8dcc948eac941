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

How ONNX Runtime runs this file fast on x86 is stages/deploy/onnxrt.py's business.
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
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from stages.pipeline.cli import UserError

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


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def tensorrt_rule_violations(model: onnx.ModelProto) -> list[str]:
    """What in a Q/DQ model breaks TensorRT's explicit-quantization rules (empty: none).

    Every Q/DQ node must have an INT8 zero point of 0 and positive scales; a DequantizeLinear of a
    constant (a weight) feeding a Conv must be per output channel (axis 0, one scale per filter);
    an activation's must be per tensor (one scale).
    """
    constants = initializers(model)
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
