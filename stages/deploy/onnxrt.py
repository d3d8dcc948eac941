"""ONNX Runtime sessions on the CPU, and the view of a Q/DQ model that runs fast there.

ONNX Runtime on x86 runs INT8 convolutions fast only with unsigned activations (U8S8; signed
activations take a slow path without VNNI). :func:`onnxruntime_view` rewrites each activation's
INT8 zero point 0 as UINT8 zero point 128 — the same real values, bit for bit — when a session is
created, so the artifact on disk stays the one TensorRT reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from stages.compress.quantize import QDQ_OPS, initializers, is_quantized
from stages.pipeline.runtime import cpu_threads


def onnxruntime_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with activations as UINT8, zero point 128 (x86's fast INT8 path).

    int8 q with zero point 0 and uint8 q + 128 with zero point 128 stand for the same real value
    (q * scale), and quantizing rounds and clips to the same grid, so outputs are unchanged.
    Weights (constants into a DequantizeLinear) stay INT8.
    """
    view = onnx.ModelProto()
    view.CopyFrom(model)
    constants = initializers(view)
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
    it runs what :func:`onnx_session` runs. Any other file (an engine, an IR folder) is itself."""
    if path.suffix != ".onnx":
        return path
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
