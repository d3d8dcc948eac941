"""Stage `trt_build`: deploy the distilled model — a TensorRT engine where it can run, ONNX and
OpenVINO always.

The baseline is deployed the same way beside it (``baseline_*`` rows), so that evaluate can time
the compressed model against the uncompressed one on each deploy runtime itself: a speedup of
compression, not of the change from PyTorch to another runtime.

1. Each model is exported to ONNX (static input: ``batch`` x 3 x imgsz x imgsz, opset from params,
   simplified with onnxslim). Its raw output is checked against PyTorch's on random input.
2. ``precision: int8`` quantizes that ONNX model to an INT8 Q/DQ model (``*.int8.onnx``, see
   stages/compress/quantize.py): static, symmetric, per-channel weights, calibrated on
   ``calibration_images`` training images, the nodes matched by ``int8_exclude`` kept in float.
   It is checked against TensorRT's rules for explicit quantization, and against the fp32 model
   on ``calibration_images`` val images: if it reproduces less than ``int8_min_agreement`` of
   fp32's detections (F1), the stage fails and nothing is deployed. The fp32 models are deployed
   beside them (``*_fp32`` rows), for evaluate's int8-vs-fp32 comparison.
3. Where a CUDA GPU and the ``tensorrt`` package are present (and ``device`` names a GPU), a
   TensorRT engine is built with TensorRT's own Python API: from the ONNX model at fp32 or fp16,
   or from the Q/DQ model for int8 (explicit quantization: the scales come from the model, no
   calibrator), workspace limit from params.
4. Otherwise the ONNX (or INT8 Q/DQ ONNX) model is deployed on ONNX Runtime (CPU); fp16 there
   means fp32, and the record says exactly why no engine was built (no CUDA device, or the import
   error of tensorrt).
5. On any machine, each ONNX model (fp32, and the same Q/DQ file for int8) is also converted to
   an OpenVINO IR folder for the CPU (``*_openvino_model/``, see stages/deploy/openvino.py) and
   compiled once: a model OpenVINO cannot compile fails the stage with the node and the reason,
   before anything is deployed. fp32 is compared with ONNX Runtime, INT8 passes the same
   agreement check. (NNCF's own post-training quantization was measured against this Q/DQ file:
   no more accurate at the same speed; `python -m stages.tools.openvino_int8`.)

Reads: models/distilled.pt and models/baseline.pt; for int8, training images (calibration) and
val images (the agreement check). Writes: models/deploy/ (model.onnx and baseline.onnx, their
``*.int8.onnx`` for int8, ``*.engine`` where TensorRT runs, their ``*_openvino_model/``
folders, deploy.json) and
reports/trt_build/deploy.json (the same record, for `dvc metrics`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from stages.compress import quantize
from stages.compress.pruning import replay  # noqa: F401  (the pruned model runs its hooks)
from stages.deploy import openvino
from stages.deploy.agreement import divergence
from stages.deploy.export import build_engine, export_onnx, tensorrt_unavailable
from stages.deploy.onnxrt import onnx_session, raw_outputs
from stages.pipeline import cli
from stages.pipeline.images import TRAIN_IMAGES, VAL_IMAGES, calibration_batch
from stages.pipeline.outputs import atomic_path, print_summary, write_json, written
from stages.pipeline.params import COMMON, Choice, Float, Int, ParamsError, Regexes, Section, load
from stages.pipeline.runtime import PROJECT_ROOT
from stages.yolo.models import load_detector

DISTILLED = PROJECT_ROOT / "models" / "distilled.pt"
BASELINE = PROJECT_ROOT / "models" / "baseline.pt"  # deployed the same way, as the reference
DEPLOY_DIR = PROJECT_ROOT / "models" / "deploy"
RECORD_OUT = PROJECT_ROOT / "reports" / "trt_build" / "deploy.json"

# The trt_build params section (the benchmark tool reads it too).
TRT_BUILD = Section(
    {
        "batch": Int(1, 256),
        "opset": Int(9, 100),
        "precision": Choice("fp32", "fp16", "int8"),
        "workspace_gb": Float(0, 1024, open_lo=True),
        "calibration_images": Int(0, 100_000),
        "int8_calibration": Choice("minmax", "percentile", "entropy"),
        "int8_exclude": Regexes(),
        "int8_min_agreement": Float(0, 1),
    }
)
SCHEMA = {"imgsz": COMMON["imgsz"], "device": COMMON["device"], "trt_build": TRT_BUILD}


def max_exportable_opset() -> int:
    """The highest opset the installed torch (TorchScript) ONNX exporter can write."""
    constants = importlib.import_module("torch.onnx._constants")
    return int(getattr(constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", constants.ONNX_MAX_OPSET))


def check_params(section: dict) -> None:
    """The checks a schema cannot make: opset support and int8's calibration data."""
    top = max_exportable_opset()
    if section["opset"] > top:
        raise ParamsError(
            f"params.yaml: trt_build.opset = {section['opset']} cannot be written by the installed "
            f"exporter (torch {torch.__version__} writes opsets up to {top}); use {top} or lower."
        )
    if section["precision"] == "int8" and section["calibration_images"] < 1:
        raise ParamsError(
            "params.yaml: trt_build.precision = 'int8' needs calibration images: set "
            "trt_build.calibration_images to a positive number (e.g. 64)."
        )


def int8_images(section: dict, imgsz: int) -> tuple[np.ndarray, np.ndarray]:
    """``calibration_images`` training images (calibration) and as many val images (the
    agreement check), read once for every model the stage quantizes."""
    count = section["calibration_images"]
    return tuple(calibration_batch(d, count, imgsz).numpy() for d in (TRAIN_IMAGES, VAL_IMAGES))


def agreement_checked(
    reference: np.ndarray, outputs: np.ndarray, name: str, section: dict, check: np.ndarray
) -> dict[str, Any]:
    """How far an INT8 model's raw ``outputs`` on the ``check`` images are from its fp32
    ``reference``; a one-line error (nothing is deployed) below ``int8_min_agreement``."""
    moved = divergence(reference, outputs)
    if moved["f1"] < section["int8_min_agreement"]:
        raise cli.UserError(
            f"the INT8 model {name} reproduces only {moved['f1']:.3f} (F1) of the fp32 "
            f"model's detections on {len(check)} val images, below trt_build.int8_min_agreement = "
            f"{section['int8_min_agreement']} (largest class-score change "
            f"{moved['max_abs_score_diff']:.3f}): nothing was deployed. Keep more of the "
            f"model in float (trt_build.int8_exclude), calibrate on more images or with another "
            f"trt_build.int8_calibration, or deploy with trt_build.precision: fp32."
        )
    return {"check_images": len(check), **{f"vs_fp32_{k}": v for k, v in moved.items()}}


def quantize_checked(
    fp32: Path, out: Path, section: dict, images: tuple[np.ndarray, np.ndarray]
) -> dict[str, Any]:
    """Write the INT8 Q/DQ model of ``fp32`` to ``out``, check it, and describe it; ``images``
    are :func:`int8_images`.

    Fails (nothing is deployed) when the graph breaks TensorRT's rules (a bug) or when it
    reproduces less than ``int8_min_agreement`` of the fp32 model's detections on val images (the
    user must change the exclusions, the calibration or the precision).
    """
    calibration, check = images
    kept_float = quantize.quantize_int8(
        fp32, out, calibration, section["int8_exclude"], section["int8_calibration"]
    )
    model = onnx.load(out)
    problems = quantize.tensorrt_rule_violations(model)
    if problems:
        raise RuntimeError(f"{out} breaks TensorRT's Q/DQ rules: {'; '.join(problems[:5])}")
    reference = raw_outputs(onnx_session(fp32), check)
    moved = agreement_checked(
        reference, raw_outputs(onnx_session(out), check), out.name, section, check
    )
    return {
        "calibration": f"{len(calibration)} training images, {section['int8_calibration']}",
        "kept_float_nodes": len(kept_float),
        **quantize.quantization_summary(model),
        **moved,
    }


def described(artifact: Path, precision: str, record: dict[str, Any]) -> dict[str, Any]:
    """What one deployed file (or IR folder) is: its name, the precision it really has, its size
    and how it was built."""
    files = [f for f in artifact.rglob("*") if f.is_file()] if artifact.is_dir() else [artifact]
    mb = sum(f.stat().st_size for f in files) / 2**20
    return {"artifact": artifact.name, "precision": precision, "mb": round(mb, 3), **record}


def deploy(
    stem: str,
    folder: Path,
    precisions: list[str],
    section: dict,
    images: tuple[np.ndarray, np.ndarray] | None,
    backend: str,
) -> dict[str, dict[str, Any]]:
    """Deploy ``folder/<stem>.onnx`` (already exported) at each precision on ``backend``
    (``images``: :func:`int8_images`, for int8): precision -> :func:`described`."""
    onnx_path = folder / f"{stem}.onnx"
    deployed: dict[str, dict[str, Any]] = {}
    for precision in precisions:
        source, record = onnx_path, {}
        if precision == "int8":
            source = folder / f"{stem}.int8.onnx"
            record["int8"] = quantize_checked(onnx_path, source, section, images)
        if backend == "tensorrt":
            suffix = "" if precision == section["precision"] else f".{precision}"
            artifact = folder / f"{stem}{suffix}.engine"
            record.update(build_engine(source, artifact, precision, section["workspace_gb"]))
        else:  # ONNX Runtime on the CPU: fp32, or the INT8 Q/DQ model
            artifact = source
            precision = "int8" if precision == "int8" else "fp32"
        deployed[precision] = described(artifact, precision, record)
    return deployed


def deploy_openvino(
    stem: str, folder: Path, precisions: list[str], section: dict, check: np.ndarray | None
) -> dict[str, dict[str, Any]]:
    """OpenVINO IR folders of ``folder/<stem>.onnx`` and, for int8, of its Q/DQ model (written by
    :func:`deploy`): precision -> :func:`described`. Each is compiled (a model OpenVINO cannot run
    fails here, naming the node); fp32 is compared with ONNX Runtime's output on random input, and
    INT8 must agree with fp32 as :func:`quantize_checked` asks of ONNX Runtime's INT8 model (its
    record counts the convolutions OpenVINO really runs in INT8)."""
    fp32 = folder / f"{stem}.onnx"
    deployed: dict[str, dict[str, Any]] = {}
    for precision in dict.fromkeys("int8" if p == "int8" else "fp32" for p in precisions):
        source = fp32 if precision == "fp32" else folder / f"{stem}.int8.onnx"
        ir = openvino.write_ir(source)
        model = openvino.compiled(ir)
        if precision == "fp32":
            shape = list(model.input(0).get_shape())
            x = np.random.default_rng(0).random(shape, np.float32)
            diff = openvino.raw_outputs(model, x) - raw_outputs(onnx_session(fp32), x)
            record = {"max_abs_diff_vs_onnx": float(np.abs(diff).max())}
        else:
            reference = raw_outputs(onnx_session(fp32), check)
            outputs = openvino.raw_outputs(model, check)
            moved = agreement_checked(reference, outputs, ir.name, section, check)
            record = {"int8": {**openvino.convolution_precisions(model), **moved}}
        deployed[precision] = described(ir, precision, record)
    return deployed


def row_name(stem: str, runtime: str, precision: str, main_precision: str) -> str:
    """A deployed row's name in metrics.json: ``deployed`` (the model on the deploy runtime at
    ``main_precision``, that runtime's first), ``baseline_`` for the baseline, ``_openvino`` on
    OpenVINO, ``_fp32`` for the fp32 twin of an INT8 deployment."""
    name = "deployed_openvino" if runtime == "openvino" else "deployed"
    name = f"baseline_{name}" if stem == "baseline" else name
    return name + ("_fp32" if precision != main_precision else "")


def main() -> None:
    params = load(SCHEMA)
    section = params["trt_build"]
    check_params(section)
    imgsz = params["imgsz"]
    sources = {"model": DISTILLED, "baseline": BASELINE}
    for path in sources.values():  # a clear error for a missing or wrong checkpoint, first
        load_detector(path)

    reason = tensorrt_unavailable(str(params["device"]))
    backend = "onnxruntime" if reason else "tensorrt"
    # int8 is compared with fp32 of the same model on the same runtime (the *_fp32 rows).
    precisions = (
        [section["precision"], "fp32"] if section["precision"] == "int8" else [section["precision"]]
    )
    record: dict[str, Any] = {
        "backend": backend,
        "requested_precision": section["precision"],
        "input_shape": [section["batch"], 3, imgsz, imgsz],
        "opset": section["opset"],
        "openvino": {"version": openvino.version(), **openvino.cpu_config()},
    }
    if reason:
        record["no_engine_because"] = reason
    images = int8_images(section, imgsz) if section["precision"] == "int8" else None
    with atomic_path(DEPLOY_DIR) as tmp:
        tmp.mkdir()
        record["onnx"], deployed = {}, {}
        # The model first: a bad int8 exclusion fails on its graph before the baseline's work.
        for stem, source in sources.items():
            onnx_path = tmp / f"{stem}.onnx"
            diff = export_onnx(source, onnx_path, imgsz, section["batch"], section["opset"])
            record["onnx"][stem] = {
                "source": str(source.relative_to(PROJECT_ROOT)),
                "max_abs_diff_vs_torch": diff,
                "mb": round(onnx_path.stat().st_size / 2**20, 3),
            }
            deployed[stem, backend] = deploy(stem, tmp, precisions, section, images, backend)
            check = images[1] if images else None
            deployed[stem, "openvino"] = deploy_openvino(stem, tmp, precisions, section, check)
        record["artifacts"] = {
            row_name(stem, runtime, precision, next(iter(deployed["model", runtime]))): {
                "source": stem,
                "runtime": runtime,
                **deployed[stem, runtime][precision],
            }
            for runtime in (backend, "openvino")
            for precision in deployed["model", runtime]
            for stem in ("baseline", "model")
        }
        write_json(tmp / "deploy.json", record)
    write_json(RECORD_OUT, record)
    print_summary("trt_build", summary_lines(record))


def summary_lines(record: dict[str, Any]) -> list[tuple[str, str]]:
    """The stage's one-screen summary of a deploy record."""
    lines = [
        (
            row,
            f"{a['artifact']} on {a['runtime']} ({a['precision']}, {a['mb']:.2f} MB)",
        )
        for row, a in record["artifacts"].items()
    ]
    lines += [
        (
            f"ONNX vs PyTorch ({stem})",
            f"max |diff| {o['max_abs_diff_vs_torch']:.2e} on random input",
        )
        for stem, o in record["onnx"].items()
    ]
    for row, a in record["artifacts"].items():
        if "max_abs_diff_vs_onnx" in a:
            lines.append(
                (f"OpenVINO vs ONNX ({row})", f"max |diff| {a['max_abs_diff_vs_onnx']:.2e}")
            )
        if "int8" in a:
            q = a["int8"]
            lines.append(
                (
                    f"int8 ({row})",
                    f"{q['int8_convs']} convs in INT8, {q['float_convs']} in float; agrees with "
                    f"fp32 on {q['vs_fp32_f1']:.3f} (F1) of "
                    f"{q['vs_fp32_reference_detections']} detections on {q['check_images']} val "
                    f"images",
                )
            )
    settings = record["openvino"]
    lines.append(
        (
            "OpenVINO",
            f"{settings['version']}, CPU, {settings['INFERENCE_PRECISION_HINT']} inference, "
            f"{settings['INFERENCE_NUM_THREADS']} threads",
        )
    )
    if "no_engine_because" in record:
        lines.append(("no TensorRT engine", record["no_engine_because"]))
    else:
        first = record["artifacts"]["deployed"]
        lines.append(("TensorRT", f"{first['tensorrt_version']} on {first['gpu']}"))
    lines.append(written(DEPLOY_DIR, RECORD_OUT))
    return lines


if __name__ == "__main__":
    cli.run(main, __doc__)
