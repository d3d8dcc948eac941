"""Which INT8 model should OpenVINO run: trt_build's Q/DQ file, or NNCF's own quantization?

    python -m stages.tools.openvino_int8   # after `dvc repro trt_build`; needs the nncf extra

For the deployed model and the baseline (models/deploy/), the fp32 OpenVINO model is quantized
with NNCF's post-training quantization as ultralytics' ``format=openvino, int8=True`` does it
(preset MIXED), calibrated on the same training images as trt_build, with trt_build's
``int8_exclude`` nodes kept in float; it is set against the Q/DQ model trt_build deploys, which
OpenVINO reads as it is:

- accuracy on val, the split that decides: AP50 and mAP50-95 (ultralytics validation of each IR
  folder), and the F1 agreement with fp32's detections on the check images trt_build uses;
- speed: the latency of one image, OpenVINO fp32, Q/DQ and NNCF and ONNX Runtime's Q/DQ timed in
  turns (evaluate's settings).

nncf is not a dependency of the pipeline, only the ``nncf`` extra of this tool (trt_build keeps the
Q/DQ file: docs/int8.md says why).
Reads params.yaml (imgsz, trt_build, evaluate) and models/deploy/. Writes
reports/openvino_int8/int8.csv and int8.md (on demand, not DVC outputs).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from ultralytics import YOLO

from stages import evaluate, trt_build
from stages.compress.quantize import HEAD, head_name
from stages.deploy import openvino
from stages.deploy.agreement import divergence
from stages.deploy.onnxrt import as_run_here, onnx_session, raw_outputs
from stages.deploy.timing import latency_ms, onnx_runner, openvino_runner
from stages.pipeline import cli
from stages.pipeline.outputs import atomic_path, print_summary, write_csv, written
from stages.pipeline.params import load
from stages.pipeline.runtime import PROJECT_ROOT, TMP_DIR
from stages.yolo.validation import validate

OUT_DIR = PROJECT_ROOT / "reports" / "openvino_int8"
WORK_DIR = TMP_DIR / "openvino_int8"
SCHEMA = {k: trt_build.SCHEMA[k] for k in ("imgsz", "trt_build")} | {
    "evaluate": evaluate.SCHEMA["evaluate"]
}


def nncf_quantized(fp32: Path, out: Path, calibration: np.ndarray, exclude: Sequence[str]) -> Path:
    """NNCF's INT8 model of the ONNX model ``fp32``, as an IR folder ``out``; ``exclude``: the
    regexes of trt_build.int8_exclude (searched in node names, ``{head}`` the Detect module)."""
    try:
        import nncf
    except ImportError:
        raise cli.UserError(
            'nncf is not installed: `pip install -c constraints.txt -e ".[nncf]"` (only this '
            "tool uses it)."
        ) from None
    head = re.escape(head_name(onnx.load(fp32, load_external_data=False)))
    patterns = [f".*(?:{pattern.replace(HEAD, head)}).*" for pattern in exclude]
    with openvino.kernel_cap_lifted():
        model = nncf.quantize(
            openvino.ov.Core().read_model(fp32),
            nncf.Dataset([image[None] for image in calibration]),
            preset=nncf.QuantizationPreset.MIXED,
            ignored_scope=nncf.IgnoredScope(patterns=patterns, validate=False),
        )
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    openvino.ov.save_model(model, out / f"{out.name.removesuffix(openvino.SUFFIX)}.xml", False)
    shutil.copyfile(openvino.folder_for(fp32) / "metadata.yaml", out / "metadata.yaml")
    return out


def variants(stem: str, calibration: np.ndarray, exclude: Sequence[str]) -> dict[str, Path]:
    """The models compared for ``stem`` (model or baseline): name -> artifact (an ``.onnx`` file
    runs on ONNX Runtime, an IR folder on OpenVINO)."""
    fp32, qdq = (trt_build.DEPLOY_DIR / f"{stem}{suffix}" for suffix in (".onnx", ".int8.onnx"))
    return {
        "OpenVINO fp32": openvino.folder_for(fp32),
        "OpenVINO Q/DQ (trt_build)": openvino.folder_for(qdq),
        "OpenVINO NNCF": nncf_quantized(
            fp32, WORK_DIR / f"{stem}_nncf{openvino.SUFFIX}", calibration, exclude
        ),
        "ONNX Runtime Q/DQ (trt_build)": qdq,
    }


def outputs_and_val(path: Path, check: np.ndarray, params: dict, run: str) -> tuple:
    """Raw outputs on ``check`` and ultralytics' val metrics of one artifact, run as evaluate
    runs it."""
    if path.suffix == ".onnx":
        outputs = raw_outputs(onnx_session(path), check)
        target, compiling = as_run_here(path, WORK_DIR), contextlib.nullcontext()
    else:
        outputs = openvino.raw_outputs(openvino.compiled(path), check)
        target, compiling = path, openvino.as_compiled_here()
    with compiling:
        box = validate(
            YOLO(str(target), task="detect"),
            run,
            "val",
            imgsz=params["imgsz"],
            batch=params["evaluate"]["batch"],
            device="cpu",
        ).box
    return outputs, box


def compare(stem: str, params: dict, images: tuple[np.ndarray, np.ndarray]) -> list[dict]:
    """One row per variant of ``stem``: val accuracy, agreement with fp32, latency."""
    calibration, check = images
    models = variants(stem, calibration, params["trt_build"]["int8_exclude"])
    shape = [1, 3, params["imgsz"], params["imgsz"]]
    runners = {
        name: (onnx_runner if path.suffix == ".onnx" else openvino_runner)(path, shape)
        for name, path in models.items()
    }
    section = params["evaluate"]
    times = latency_ms(runners, section["latency_warmup"], section["latency_repeats"])
    reference = raw_outputs(onnx_session(trt_build.DEPLOY_DIR / f"{stem}.onnx"), check)
    rows = []
    for name, path in models.items():
        outputs, box = outputs_and_val(path, check, params, f"openvino-int8-{stem}")
        rows.append(
            {
                "model": stem,
                "variant": name,
                "val_ap50": round(float(box.map50), 4),
                "val_map50_95": round(float(box.map), 4),
                "f1_vs_fp32": divergence(reference, outputs)["f1"],
                "cpu_latency_ms": round(statistics.median(times[name]), 3),
            }
        )
    return rows


def markdown_table(rows: list[dict], params: dict) -> str:
    section = params["evaluate"]
    lines = [
        f"INT8 on OpenVINO: trt_build's Q/DQ file against NNCF's quantization (preset MIXED, "
        f"trt_build's float nodes), both calibrated on {params['trt_build']['calibration_images']} "
        f"training images. Val split at imgsz {params['imgsz']}; F1: agreement with fp32's "
        f"detections on as many val images; latency: median of {section['latency_repeats']} "
        f"passes after {section['latency_warmup']}, one image, the variants of a model in turns.",
        "",
        "| model | variant | val AP50 | val mAP50-95 | F1 vs fp32 | CPU ms |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['variant']} | {r['val_ap50']:.4f} | {r['val_map50_95']:.4f} | "
        f"{r['f1_vs_fp32']:.3f} | {r['cpu_latency_ms']:.2f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    params = load(SCHEMA)
    evaluate.read_deploy_record()
    images = trt_build.int8_images(params["trt_build"], params["imgsz"])
    rows = [row for stem in ("model", "baseline") for row in compare(stem, params, images)]
    write_csv(OUT_DIR / "int8.csv", rows)
    with atomic_path(OUT_DIR / "int8.md") as tmp:
        tmp.write_text(markdown_table(rows, params))
    print_summary(
        "openvino_int8",
        [
            (
                f"{r['model']}: {r['variant']}",
                f"val AP50 {r['val_ap50']:.4f}  F1 vs fp32 {r['f1_vs_fp32']:.3f}  "
                f"{r['cpu_latency_ms']:.2f} ms",
            )
            for r in rows
        ]
        + [written(OUT_DIR / "int8.csv", OUT_DIR / "int8.md")],
    )


if __name__ == "__main__":
    cli.run(main, __doc__)
