"""Export a detection checkpoint the way the pipeline deploys it: to ONNX, and from ONNX to a
TensorRT engine where CUDA and TensorRT exist (trt_build, the benchmark, prune's latency budget)."""

from __future__ import annotations

import importlib
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from stages.pipeline.runtime import TMP_DIR
from stages.yolo.models import load_detector


def _work_checkpoint() -> Path:
    """Where a checkpoint is exported from: an emptied folder (ultralytics writes beside it)."""
    work = TMP_DIR / "export"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work / "model.pt"


def export_onnx(model_path: Path, out: Path, imgsz: int, batch: int, opset: int) -> float:
    """Export the checkpoint ``model_path`` to ONNX at ``out``; returns the max |ONNX - PyTorch|
    raw output on random input."""
    checkpoint = _work_checkpoint()
    shutil.copyfile(model_path, checkpoint)
    return _export(checkpoint, out, imgsz, batch, opset)


def export_model_onnx(model: nn.Module, out: Path, imgsz: int, batch: int, opset: int) -> float:
    """:func:`export_onnx` for a detection model that has no checkpoint of its own (a pruning
    candidate, a freshly built config)."""
    checkpoint = _work_checkpoint()
    torch.save({"model": model, "train_args": {}}, checkpoint)
    return _export(checkpoint, out, imgsz, batch, opset)


def _export(checkpoint: Path, out: Path, imgsz: int, batch: int, opset: int) -> float:
    detector = load_detector(checkpoint)
    onnx_file = detector.export(
        format="onnx",
        imgsz=imgsz,
        batch=batch,
        opset=opset,
        simplify=True,
        dynamic=False,
        half=False,
        device="cpu",
    )
    model = onnx.load(onnx_file)
    stamp = [p for p in model.metadata_props if p.key == "date"]
    for prop in stamp:  # the export time would make every build's bytes (and DVC hash) differ
        model.metadata_props.remove(prop)
    onnx.save(model, out)
    x = np.random.default_rng(0).random((batch, 3, imgsz, imgsz), dtype=np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (onnx_y,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():  # export worked on a copy: detector.model is the checkpoint's model
        torch_y = detector.model.float().eval()(torch.from_numpy(x))[0]
    return float(np.abs(onnx_y - torch_y.numpy()).max())


def tensorrt_unavailable(device: str) -> str | None:
    """Why no TensorRT engine can be built here, or None when it can."""
    if device == "cpu":
        return "params.yaml device is 'cpu'"
    if not torch.cuda.is_available():
        return "no CUDA device is available to torch"
    try:
        importlib.import_module("tensorrt")
    except Exception as err:  # ImportError, or a broken install raising something else
        return f"tensorrt is not importable: {type(err).__name__}: {err}"
    return None


def build_engine(onnx_path: Path, engine_path: Path, precision: str, workspace_gb: float) -> dict:
    """Build a serialized TensorRT engine from the ONNX model with TensorRT's Python API.

    For int8, ``onnx_path`` is the Q/DQ model: TensorRT takes every scale from its Q/DQ nodes
    (explicit quantization), so no calibrator runs; FP16 is allowed too for the layers kept in
    float.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT < 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    return {
        "tensorrt_version": trt.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "build_seconds": round(time.perf_counter() - start, 1),
    }
