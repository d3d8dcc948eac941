"""Stage `trt_build`: deploy the distilled model — a TensorRT engine where it can run, ONNX always.

The baseline is deployed the same way beside it (``baseline.onnx``/``baseline.engine``), so that
evaluate can time the compressed model against the uncompressed one on the deploy runtime itself:
a speedup of compression, not of the change from PyTorch to another runtime.

1. The distilled model is exported to ONNX (static input: ``batch`` x 3 x imgsz x imgsz, opset from
   params, simplified with onnxslim). Its raw output is checked against PyTorch's on random input.
2. Where a CUDA GPU and the ``tensorrt`` package are present (and ``device`` names a GPU), a
   TensorRT engine is built from that ONNX model with TensorRT's own Python API: precision fp32,
   fp16 or int8 (entropy calibration on ``calibration_images`` training images, the calibration
   cache saved beside the engine), workspace limit from params.
3. Otherwise the stage still succeeds and deploys the ONNX model on ONNX Runtime (CPU); the record
   says exactly why no engine was built (no CUDA device, or the import error of tensorrt).

Writes models/deploy/ (model.onnx and baseline.onnx; model.engine, baseline.engine and their
``*.calibration.cache`` when built; deploy.json) and reports/trt_build/deploy.json (the same
record, for `dvc metrics`).
"""

from __future__ import annotations

import importlib
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from stages.common import params as P
from stages.common import yolo
from stages.common.images import TRAIN_IMAGES, calibration_batch
from stages.common.outputs import atomic_path, print_summary, write_json, written
from stages.common.runtime import PROJECT_ROOT, TMP_DIR

DISTILLED = PROJECT_ROOT / "models" / "distilled.pt"
BASELINE = PROJECT_ROOT / "models" / "baseline.pt"  # deployed the same way, as the reference
DEPLOY_DIR = PROJECT_ROOT / "models" / "deploy"
RECORD_OUT = PROJECT_ROOT / "reports" / "trt_build" / "deploy.json"

SCHEMA = {
    **{k: P.COMMON[k] for k in ("imgsz", "device")},
    "trt_build": P.Section(
        {
            "batch": P.Int(1, 256),
            "opset": P.Int(9, 100),
            "precision": P.Choice("fp32", "fp16", "int8"),
            "workspace_gb": P.Float(0, 1024, open_lo=True),
            "calibration_images": P.Int(0, 100_000),
        }
    ),
}


def max_exportable_opset() -> int:
    """The highest opset the installed torch (TorchScript) ONNX exporter can write."""
    constants = importlib.import_module("torch.onnx._constants")
    return int(getattr(constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", constants.ONNX_MAX_OPSET))


def check_params(cfg: dict) -> None:
    """The checks a schema cannot make: opset support and int8's calibration data."""
    top = max_exportable_opset()
    if cfg["opset"] > top:
        raise P.ParamsError(
            f"params.yaml: trt_build.opset = {cfg['opset']} cannot be written by the installed "
            f"exporter (torch {torch.__version__} writes opsets up to {top}); use {top} or lower."
        )
    if cfg["precision"] == "int8" and cfg["calibration_images"] < 1:
        raise P.ParamsError(
            "params.yaml: trt_build.precision = 'int8' needs calibration images: set "
            "trt_build.calibration_images to a positive number (e.g. 256)."
        )


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


def export_onnx(model_path: Path, out: Path, imgsz: int, batch: int, opset: int) -> float:
    """Export to ONNX at ``out``; returns the max |ONNX - PyTorch| raw output on random input."""
    work = TMP_DIR / "trt_build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copyfile(model_path, work / "model.pt")  # ultralytics writes beside the checkpoint
    detector = yolo.load_detector(work / "model.pt")
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


def entropy_calibrator(images: torch.Tensor, batch: int, cache: Path) -> Any:
    """A TensorRT int8 entropy calibrator over ``images`` in batches of ``batch``.

    The class is defined here because its base class comes from tensorrt, imported only here.
    """
    import tensorrt as trt

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            # the engine's input is static: a short last batch is left out
            self.batches = [b for b in images.split(batch) if len(b) == batch]
            self.device_batch: torch.Tensor | None = None  # kept alive while TensorRT reads it

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if not self.batches:
                return None
            self.device_batch = self.batches.pop(0).cuda().contiguous()
            return [int(self.device_batch.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.exists() else None

        def write_calibration_cache(self, data: bytes) -> None:
            cache.write_bytes(bytes(data))

    return Calibrator()


def build_engine(onnx_path: Path, engine_path: Path, cfg: dict, imgsz: int) -> dict[str, Any]:
    """Build a serialized TensorRT engine from the ONNX model with TensorRT's Python API."""
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
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg["workspace_gb"] * 2**30))
    cache = engine_path.with_name(f"{engine_path.stem}.calibration.cache")
    if cfg["precision"] in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # int8 falls back to fp16, not fp32, where it must
    if cfg["precision"] == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        images = calibration_batch(TRAIN_IMAGES, cfg["calibration_images"], imgsz)
        config.int8_calibrator = entropy_calibrator(images, cfg["batch"], cache)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    return {
        "tensorrt_version": trt.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "build_seconds": round(time.perf_counter() - start, 1),
        "calibration_cache": cache.name if cache.exists() else None,
    }


def deploy(
    source: Path, folder: Path, stem: str, cfg: dict, imgsz: int, reason: str | None
) -> dict[str, Any]:
    """Export ``source`` to ``folder/<stem>.onnx`` and, when ``reason`` is None, build
    ``<stem>.engine`` from it; returns what was deployed."""
    onnx_path = folder / f"{stem}.onnx"
    record: dict[str, Any] = {
        "source": str(source.relative_to(PROJECT_ROOT)),
        "onnx_max_abs_diff_vs_torch": export_onnx(
            source, onnx_path, imgsz, cfg["batch"], cfg["opset"]
        ),
        "onnx_mb": round(onnx_path.stat().st_size / 2**20, 3),
    }
    if reason is None:
        engine = folder / f"{stem}.engine"
        record.update(build_engine(onnx_path, engine, cfg, imgsz))
        record.update(
            artifact=engine.name,
            precision=cfg["precision"],
            engine_mb=round(engine.stat().st_size / 2**20, 3),
        )
    else:
        record.update(artifact=onnx_path.name, precision="fp32")
    return record


def main() -> None:
    params = P.load(SCHEMA)
    cfg = params["trt_build"]
    check_params(cfg)
    imgsz = params["imgsz"]
    for path in (DISTILLED, BASELINE):  # a clear error for a missing or wrong checkpoint, first
        yolo.load_detector(path)

    reason = tensorrt_unavailable(str(params["device"]))
    record: dict[str, Any] = {
        "backend": "onnxruntime" if reason else "tensorrt",
        "input_shape": [cfg["batch"], 3, imgsz, imgsz],
        "opset": cfg["opset"],
    }
    if reason:
        record.update(no_engine_because=reason, requested_precision=cfg["precision"])
    with atomic_path(DEPLOY_DIR) as tmp:
        tmp.mkdir()
        record.update(deploy(DISTILLED, tmp, "model", cfg, imgsz, reason))
        record["reference"] = deploy(BASELINE, tmp, "baseline", cfg, imgsz, reason)
        write_json(tmp / "deploy.json", record)
    write_json(RECORD_OUT, record)

    lines = [
        ("deployed", f"{record['artifact']} on {record['backend']} ({record['precision']})"),
        (
            "ONNX vs PyTorch",
            f"max |diff| {record['onnx_max_abs_diff_vs_torch']:.2e} on random input",
        ),
    ]
    lines.append(
        ("reference", f"{record['reference']['artifact']} (the baseline, deployed the same way)")
    )
    if "no_engine_because" in record:
        lines.append(("no TensorRT engine", record["no_engine_because"]))
    else:
        lines.append(
            (
                "TensorRT",
                f"{record['tensorrt_version']} on {record['gpu']}, built in "
                f"{record['build_seconds']} s",
            )
        )
    lines.append(written(DEPLOY_DIR, RECORD_OUT))
    print_summary("trt_build", lines)


if __name__ == "__main__":
    main()
