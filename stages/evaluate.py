"""Stage `evaluate`: measure every model of the pipeline on the test split.

Test is the split no stage decides anything on (val drives per-epoch validation, the sparsity
schedule and every choice from a sweep), so these numbers are measurements, not tuned values.
For each checkpoint (baseline, sparse, pruned, distilled) and for every artifact trt_build
deployed: the model on the deploy runtime (``deployed``: ONNX or INT8 Q/DQ ONNX on ONNX Runtime,
or a TensorRT engine) and on OpenVINO (``deployed_openvino``, CPU), when INT8 the same model in
fp32 on each (``*_fp32``), and the baseline deployed the same way beside each (``baseline_*``,
the reference for its runtime):

- accuracy: AP50, mAP50-95, precision, recall and per-class AP50 from ultralytics validation (the
  same pre- and post-processing for every backend), and COCO AP (IoU 0.5:0.95) of small, medium
  and large objects from pycocotools on the same predictions, against ground truth read from our
  converted label files;
- size: params, MACs and FLOPs of the fused model at imgsz, file size;
- speed: the latency of one image (batch 1, fp32, after warm-up; median over repeats) with
  FPS = 1000 / median ms, on the CPU for every PyTorch model and the ONNX Runtime artifact, and on
  the GPU (PyTorch models and the TensorRT engine) when params.yaml names a CUDA device and one is
  present; the OpenVINO models on the CPU. Models on one device are timed in turns, pass by pass,
  before any validation runs.
  Speedups compare like with like: a PyTorch model with the PyTorch baseline, a deployed model
  with the deployed baseline on the same runtime and precision; the deployed model against the
  PyTorch baseline is reported apart, as the end-to-end speedup, and INT8 against fp32 of the
  same model in the headline, which also names the fastest CPU runtime measured for the deployed
  model (against the baseline on that runtime, and on the baseline's own fastest). Every artifact
  is validated as it is timed: an INT8 model in the session that stages/deploy/onnxrt.py prepares
  for this CPU, an OpenVINO folder compiled as stages/deploy/openvino.py compiles it.

Writes reports/metrics.json (DVC metrics, keys like ``distilled.ap50``), reports/summary.md (the
paper's table), and under reports/evaluate/: models.csv and per_class_ap50.csv (DVC plots) with
PNG charts for people, and environment.json (package versions, torch build, CPU, threads,
device), so that a metrics diff can be told apart from a machine diff.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
from copy import deepcopy
from pathlib import Path

import onnx
import torch
from PIL import Image
from ultralytics import YOLO

from stages import baseline
from stages.compress.pruning import replay  # noqa: F401  (pruned models run its hooks)
from stages.dataset import SCHEMA as DATASET_SCHEMA
from stages.deploy import openvino
from stages.deploy.onnxrt import as_run_here
from stages.deploy.timing import (
    engine_runner,
    latency_ms,
    onnx_runner,
    openvino_runner,
    torch_runner,
)
from stages.pipeline import cli
from stages.pipeline.environment import describe_environment
from stages.pipeline.images import TEST_IMAGES, image_files
from stages.pipeline.outputs import (
    atomic_path,
    print_summary,
    save_figure,
    write_csv,
    write_json,
    written,
)
from stages.pipeline.params import Int, Section, load
from stages.pipeline.plots import plot_accuracy_vs_cost
from stages.pipeline.runtime import PROJECT_ROOT, TMP_DIR
from stages.yolo import RUNS_DIR
from stages.yolo.models import load_detector, model_size
from stages.yolo.validation import validate

# The checkpoints of the pipeline, in DAG order: name -> file written by its stage.
MODELS = {
    "baseline": PROJECT_ROOT / "models" / "baseline.pt",
    "sparse": PROJECT_ROOT / "models" / "sparse.pt",
    "pruned": PROJECT_ROOT / "models" / "pruned.pt",
    "distilled": PROJECT_ROOT / "models" / "distilled.pt",
}
DEPLOY_RECORD = PROJECT_ROOT / "models" / "deploy" / "deploy.json"  # written by trt_build
TEACHER_CURVE = PROJECT_ROOT / "reports" / "teacher_curve" / "curve.json"  # teacher_curve tool
CURVE_KEYS = {"settings", "converged_at", "plateau", "points"}  # what teacher_verdict reads
DEPLOYED_FROM = "distilled"  # the checkpoint trt_build deploys
# trt_build's exported models (deploy.json "source") and the checkpoints they come from.
EXPORTED_FROM = {"model": DEPLOYED_FROM, "baseline": "baseline"}
METRICS_OUT = PROJECT_ROOT / "reports" / "metrics.json"
SUMMARY_OUT = PROJECT_ROOT / "reports" / "summary.md"
REPORT_DIR = PROJECT_ROOT / "reports" / "evaluate"
ENVIRONMENT_OUT = REPORT_DIR / "environment.json"
TEST_LABELS = TEST_IMAGES.parents[1] / "labels" / "test"
SIZES = ("small", "medium", "large")  # COCO area buckets: < 32², < 96², the rest
TABLE_COLUMNS = (
    "params_m",
    "gflops",
    "gmacs",
    "ap50",
    "map50_95",
    "ap_small",
    "ap_medium",
    "ap_large",
)
MAX_DETECTIONS = 300  # per image, as ultralytics validation keeps (VisDrone frames hold > 100)
# Columns of reports/evaluate/models.csv, the source of the accuracy-vs-cost DVC plots.
MODEL_COLUMNS = (
    "ap50",
    "map50_95",
    "ap_small",
    "params_m",
    "gflops",
    "cpu_latency_ms",
    "gpu_latency_ms",
)

SCHEMA = {
    **baseline.SCHEMA,  # the teacher's settings, matched against the teacher curve's
    "dataset": DATASET_SCHEMA["dataset"],
    "evaluate": Section(
        {
            "batch": Int(1, 1024),
            "latency_warmup": Int(0, 10_000),
            "latency_repeats": Int(1, 100_000),
        }
    ),
}


def coco_ground_truth(images_dir: Path, labels_dir: Path, nc: int) -> dict:
    """COCO-format ground truth from YOLO label files, boxes in pixels of the original images.

    Image ids are positions in name order; category ids are class + 1, as ultralytics writes them
    in predictions.json for a non-COCO dataset.
    """
    images, annotations = [], []
    for image_id, image in enumerate(image_files(images_dir)):
        with Image.open(image) as im:
            width, height = im.size
        images.append({"id": image_id, "file_name": image.name, "width": width, "height": height})
        label = labels_dir / f"{image.stem}.txt"
        for line in label.read_text().splitlines() if label.is_file() else []:
            cls, xc, yc, w, h = line.split()
            box = [
                (float(xc) - float(w) / 2) * width,
                (float(yc) - float(h) / 2) * height,
                float(w) * width,
                float(h) * height,
            ]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cls) + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": c + 1} for c in range(nc)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_size_ap(
    ground_truth: dict, predictions: list[dict], max_detections: int = MAX_DETECTIONS
) -> dict[str, float | None]:
    """COCO AP (mean over IoU 0.5:0.95, 101 recall points and categories) per object size.

    ``predictions`` are COCO results (``file_name`` or ``image_id``, ``category_id``, ``bbox`` as
    left, top, width, height, ``score``). A size with no ground-truth object gets None, as COCO's
    -1 would be misread as a score.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = {image["file_name"]: image["id"] for image in ground_truth["images"]}
    results = [
        {
            "image_id": ids[p["file_name"]] if "file_name" in p else p["image_id"],
            "category_id": p["category_id"],
            "bbox": list(p["bbox"]),
            "score": p["score"],
        }
        for p in predictions
    ]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO()
        truth.dataset = deepcopy(ground_truth)
        truth.createIndex()
        if not results:  # loadRes cannot take an empty list: nothing detected, AP 0
            results = [{"image_id": 0, "category_id": 1, "bbox": [0, 0, 0, 0], "score": 0.0}]
        detected = truth.loadRes(results)
        evaluation = COCOeval(truth, detected, "bbox")
        evaluation.params.maxDets = [max_detections]
        evaluation.evaluate()
        evaluation.accumulate()
    # precision[iou, recall, category, area, max_dets]; -1 where a category has no object of a size
    precision = evaluation.eval["precision"]
    out: dict[str, float | None] = {}
    for index, label in enumerate(evaluation.params.areaRngLbl):
        if label in SIZES:
            valid = precision[:, :, :, index, -1]
            valid = valid[valid > -1]
            out[f"ap_{label}"] = round(float(valid.mean()), 4) if valid.size else None
    return out


def accuracy(
    detector: YOLO, run_name: str, params: dict, ground_truth: dict
) -> tuple[dict[str, float | None], dict[str, float]]:
    """Headline accuracy (metrics.json) and per-class AP50 of one model on the test split."""
    predictions_file = RUNS_DIR / run_name / "predictions.json"
    predictions_file.unlink(missing_ok=True)  # ultralytics writes none when nothing is detected
    results = validate(
        detector,
        run_name,
        "test",
        imgsz=params["imgsz"],
        batch=params["evaluate"]["batch"],
        device=params["device"],
        max_det=MAX_DETECTIONS,
        save_json=True,
    )
    predictions = json.loads(predictions_file.read_text()) if predictions_file.is_file() else []
    headline = {
        "ap50": round(float(results.box.map50), 4),
        "map50_95": round(float(results.box.map), 4),
        **coco_size_ap(ground_truth, predictions),
        "precision": round(float(results.box.mp), 4),
        "recall": round(float(results.box.mr), 4),
    }
    per_class = {
        detector.names[int(c)]: round(float(ap), 4)
        for c, ap in zip(results.ap_class_index, results.box.ap50, strict=True)
    }
    return headline, per_class


def size_metrics(size: dict[str, float], mb: float) -> dict[str, float]:
    """Rounded params/FLOPs/MACs (from ``model_size``) and the size on disk (``mb``)."""
    return {
        "params_m": round(size["params"] / 1e6, 4),
        "gflops": round(size["flops_g"], 4),
        "gmacs": round(size["macs_g"], 4),
        "file_mb": round(mb, 3),
    }


def speed_metrics(times: list[float], images_per_pass: int, where: str) -> dict[str, float]:
    per_image = statistics.median(times) / images_per_pass
    return {f"{where}_latency_ms": round(per_image, 3), f"{where}_fps": round(1000 / per_image, 2)}


def _shown(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _speedup(reference: dict, model: dict, device: str) -> str:
    ref, ms = reference.get(f"{device}_latency_ms"), model.get(f"{device}_latency_ms")
    return "–" if ref is None or ms is None else f"{ref / ms:.2f}x"


def _kept(model: dict, base: dict) -> str:
    """AP50 as a share of the baseline's ("–" when the baseline detects nothing)."""
    return f"{model['ap50'] / base['ap50']:.1%}" if base["ap50"] else "–"


def same_runtime_reference(name: str, runtimes: dict[str, str], sources: dict[str, str]) -> str:
    """The row a row's "same runtime" speedup is against: the baseline's row on the same runtime
    (and precision); "" when there is none."""
    return next(
        (r for r in runtimes if sources[r] == "baseline" and runtimes[r] == runtimes[name]), ""
    )


def trained_epochs(detectors: dict[str, YOLO]) -> int:
    """Epochs the distilled model saw in all: baseline, sparse training and distillation, as
    each checkpoint records its own run."""
    return sum(int(detectors[n].ckpt["train_args"]["epochs"]) for n in MODELS if n != "pruned")


def seed_spread(curve: dict, seen: int, distilled_ap50: float) -> str:
    """How much of a retention against the control is seed noise, where the curve trained its
    last point (the control) under several seeds."""
    seeds = curve.get("last_point_seeds") or {}
    if len(seeds) < 2 or curve["points"][-1]["epochs"] != seen:
        return ""
    scores = ", ".join(f"{ap:.3f} (seed {seed})" for seed, ap in seeds.items())
    mean = statistics.fmean(seeds.values())
    return (
        f" Seed noise: the control scores {scores}; against their mean, {mean:.3f}, the "
        f"distilled model keeps {distilled_ap50 / mean:.1%}."
    )


def teacher_verdict(params: dict, curve: dict | None, distilled_ap50: float, seen: int) -> str:
    """The summary's first line: is the teacher (the baseline) converged, by the teacher curve
    measured with its settings? Retention only means something if it is; where the curve has a
    budget-matched control (the teacher trained the ``seen`` epochs the student saw in all),
    retention against it says what compression cost either way."""
    epochs = params["baseline"]["epochs"]
    if curve is None or curve["settings"] != baseline.teacher_settings(params):
        return (
            "**The teacher's convergence is not measured for these settings**, so the retention "
            "figures below may only say that compression costs less than more epochs would gain "
            "(`python -m stages.tools.teacher_curve` measures it)."
        )
    at, plateau = curve["converged_at"], curve["plateau"]
    control = next((p for p in curve["points"] if p["epochs"] == seen), None)
    against = (
        ""
        if control is None
        else f" Against a budget-matched control, the teacher trained {seen} epochs (as many as "
        f"the distilled model saw in all), test AP50 {control['test_ap50']:.3f}: the distilled "
        f"model keeps **{distilled_ap50 / control['test_ap50']:.1%}**."
        + seed_spread(curve, seen, distilled_ap50)
    )
    if at is not None and epochs >= at:
        return (
            f"The teacher is converged: it trained {epochs} epochs, and on the teacher curve "
            f"(reports/teacher_curve/curve.md) no budget above {at} epochs adds {plateau:g} test "
            f"AP50." + against
        )
    where = f"converges from {at} epochs on" if at else "does not converge within its budgets"
    return (
        f"**The teacher is not converged**: it trained {epochs} epochs, and the teacher curve "
        f"(reports/teacher_curve/curve.md) {where}, so retention against it "
        + ("overstates what compression keeps." if against else "means nothing.")
        + against
    )


def compression_headline(
    metrics: dict[str, dict], runtimes: dict[str, str], sources: dict[str, str]
) -> str:
    """The paper's question in one or two sentences: accuracy kept, size cut, speed gained (and
    what INT8 adds over fp32 on the deploy runtime)."""
    base, model, deployed = metrics["baseline"], metrics[DEPLOYED_FROM], metrics["deployed"]
    reference = metrics.get(same_runtime_reference("deployed", runtimes, sources), {})
    device = "gpu" if "gpu_latency_ms" in deployed else "cpu"
    int8 = ""
    if "deployed_fp32" in metrics:
        fp32 = metrics["deployed_fp32"]
        int8 = (
            f" Against the same model in fp32 ({runtimes['deployed_fp32']}), the deployed "
            f"{runtimes['deployed']} model changes test AP50 by "
            f"**{deployed['ap50'] - fp32['ap50']:+.4f}** and is "
            f"**{_speedup(fp32, deployed, device)}** as fast."
        )
    return (
        f"**{DEPLOYED_FROM}** keeps **{_kept(model, base)}** of the baseline's "
        f"test AP50 ({model['ap50']:.3f} vs {base['ap50']:.3f}) with "
        f"**{1 - model['params_m'] / base['params_m']:.1%} fewer params** and "
        f"**{1 - model['gflops'] / base['gflops']:.1%} fewer FLOPs**; pruning alone, before "
        f"fine-tuning, kept {_kept(metrics['pruned'], base)} ({metrics['pruned']['ap50']:.3f})."
        f" Deployed on "
        f"{runtimes['deployed']}, it is {_speedup(reference, deployed, device)} as fast as the "
        f"baseline deployed the same way, and {_speedup(base, deployed, device)} end to end "
        f"(against the PyTorch baseline on the {device.upper()})."
        + int8
        + fastest_on_cpu(metrics, runtimes, sources)
    )


def fastest_cpu_row(metrics: dict[str, dict], sources: dict[str, str], source: str) -> str | None:
    """The deployed row of checkpoint ``source`` with the lowest CPU latency (None: none timed)."""
    rows = [
        row
        for row, m in metrics.items()
        if row not in MODELS and sources[row] == source and "cpu_latency_ms" in m
    ]
    return min(rows, key=lambda row: metrics[row]["cpu_latency_ms"], default=None)


def fastest_on_cpu(
    metrics: dict[str, dict], runtimes: dict[str, str], sources: dict[str, str]
) -> str:
    """The headline's CPU sentence: the fastest CPU runtime measured for the deployed model,
    against the baseline on that runtime and on the baseline's own fastest one ("" if none)."""
    mine, theirs = (fastest_cpu_row(metrics, sources, s) for s in (DEPLOYED_FROM, "baseline"))
    if mine is None or theirs is None:
        return ""
    model, best_base = metrics[mine], metrics[theirs]
    reference = metrics.get(same_runtime_reference(mine, runtimes, sources), {})
    return (
        f" The fastest CPU runtime measured for it is **{runtimes[mine]}** (`{mine}`, "
        f"{model['cpu_latency_ms']:.2f} ms, test AP50 {model['ap50']:.3f}): "
        f"**{_speedup(reference, model, 'cpu')}** as fast as the baseline deployed the same way, "
        f"and **{_speedup(best_base, model, 'cpu')}** as fast as the baseline on its own fastest "
        f"CPU runtime ({runtimes[theirs]}, {best_base['cpu_latency_ms']:.2f} ms)."
    )


def summary_table(
    metrics: dict[str, dict],
    imgsz: int,
    runtimes: dict[str, str],
    sources: dict[str, str],
    verdict: str,
) -> str:
    """A Markdown table in the paper's shape, with changes relative to the baseline, under the
    teacher's ``verdict`` and the headline.

    ``runtimes`` names each row's runtime (and precision), ``sources`` the checkpoint it was built
    from. Each row's speedup is against the baseline on the same runtime (PyTorch rows against the
    PyTorch baseline, deployed rows against ``baseline_deployed``; "–" for a row no baseline runs
    like, such as ``deployed_fp32`` beside an INT8 deployment); the end-to-end column is against
    the PyTorch baseline for every row.
    """
    base = metrics["baseline"]
    devices = [d for d in ("cpu", "gpu") if any(f"{d}_latency_ms" in m for m in metrics.values())]
    head = ["model", "runtime", "params (M)", "FLOPs (G)", "MACs (G)", "AP50", "mAP50-95"]
    head += ["AP small", "AP medium", "AP large", "AP50 kept"]
    for d in devices:
        head += [f"{d.upper()} ms", f"{d.upper()} FPS"]
    head += ["params", "FLOPs"]
    for d in devices:
        head += [f"{d.upper()} speedup, same runtime", f"{d.upper()} speedup, end-to-end"]
    lines = [
        verdict,
        "",
        compression_headline(metrics, runtimes, sources),
        "",
        f"Models on the test split at imgsz {imgsz}. FLOPs = 2 x MACs of the fused model. AP "
        f"small/medium/large: COCO AP (IoU 0.5:0.95) of objects < 32², < 96², larger (pixels of "
        f"the original image). AP50 kept = AP50 / baseline AP50. Latency: median per image "
        f"(batch 1, at the precision the runtime column names), models on one device timed in "
        f"turns in one run. Speedup, same runtime: against the baseline on the row's own runtime "
        f"(each `baseline_*` row is the baseline exported and built exactly like its twin); "
        f"end-to-end: against the PyTorch baseline, so it includes the change of runtime.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, m in metrics.items():
        reference = metrics.get(same_runtime_reference(name, runtimes, sources), {})
        cells = [name, runtimes[name]] + [_shown(m.get(k), ".3f") for k in TABLE_COLUMNS]
        cells.append(_kept(m, base))
        for d in devices:
            cells += [_shown(m.get(f"{d}_latency_ms"), ".2f"), _shown(m.get(f"{d}_fps"), ".1f")]
        cells += [f"{(m[k] / base[k] - 1) * 100:+.1f}%" for k in ("params_m", "gflops")]
        for d in devices:
            cells += [_speedup(reference, m, d), _speedup(base, m, d)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_per_class(rows: list[dict], path: Path) -> None:
    """Grouped bars: AP50 of every class for every model."""
    import matplotlib.pyplot as plt

    models = [k for k in rows[0] if k != "class"]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 1.1), 4))
    for i, model in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r[model] or 0.0 for r in rows], width, label=model)
    ax.set_xticks(range(len(rows)), [r["class"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("AP50")
    ax.set_title("AP50 per class")
    ax.legend(fontsize="small", ncols=len(models))
    save_figure(fig, path)


REDEPLOY = "re-create it with `dvc repro -f trt_build`, or restore it with `dvc checkout`"
RECORD_KEYS = ("backend", "input_shape", "artifacts")
ARTIFACT_KEYS = ("artifact", "source", "runtime", "precision", "mb")
RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT", "openvino": "OpenVINO"}
# Where each deploy runtime runs, and how one pass of an artifact is timed there.
RUNNERS = {
    "onnxruntime": ("cpu", onnx_runner),
    "openvino": ("cpu", openvino_runner),
    "tensorrt": ("gpu", engine_runner),
}


def read_teacher_curve() -> dict | None:
    """The teacher curve's record (None when it was never measured)."""
    if not TEACHER_CURVE.is_file():
        return None
    try:
        curve = json.loads(TEACHER_CURVE.read_text())
        missing = sorted(CURVE_KEYS - curve.keys())
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        missing = [f"a JSON mapping ({type(err).__name__})"]
    if missing:
        raise cli.UserError(
            f"{TEACHER_CURVE} is not a teacher curve record (it lacks {missing[0]}): re-run "
            f"`python -m stages.tools.teacher_curve` or delete it."
        )
    return curve


def read_deploy_record() -> dict:
    """trt_build's deploy.json, or a clear error when it is missing or not such a record."""
    if not DEPLOY_RECORD.is_file():
        raise cli.UserError(f"{DEPLOY_RECORD} not found: run `dvc repro trt_build` first.")
    try:
        record = json.loads(DEPLOY_RECORD.read_text())
        missing = [k for k in RECORD_KEYS if k not in record] + [
            f"artifacts.{row}.{k}"
            for row, a in record.get("artifacts", {}).items()
            for k in ARTIFACT_KEYS
            if k not in a
        ]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as err:
        missing = [f"a JSON mapping ({type(err).__name__})"]
    if missing:
        raise cli.UserError(
            f"{DEPLOY_RECORD} is not trt_build's record (it lacks {missing[0]}): {REDEPLOY}."
        )
    return record


def check_artifact(path: Path) -> None:
    """A deployed model must be there and parse: an ONNX file, or the IR of an OpenVINO
    folder."""
    on_openvino = path.name.endswith(openvino.SUFFIX)
    stem = path / path.name.removesuffix(openvino.SUFFIX)
    for file in [stem.with_suffix(".xml"), stem.with_suffix(".bin")] if on_openvino else [path]:
        if not file.is_file() or file.stat().st_size == 0:
            raise cli.UserError(
                f"{file}, named in {DEPLOY_RECORD.name}, is missing or empty: {REDEPLOY}."
            )
    if on_openvino:
        try:
            openvino.ov.Core().read_model(stem.with_suffix(".xml"))
        except RuntimeError as err:
            raise cli.UserError(
                f"{path} is not a readable OpenVINO model ({openvino.reason(err)}): {REDEPLOY}."
            ) from None
    if path.suffix == ".onnx":
        try:
            onnx.load(path, load_external_data=False)
        except Exception as err:  # protobuf raises its own DecodeError, among others
            raise cli.UserError(
                f"{path} is not a readable ONNX model ({type(err).__name__}: truncated or "
                f"corrupt): {REDEPLOY}."
            ) from None


def deployed_rows(params: dict) -> tuple[dict, dict[str, Path]]:
    """trt_build's record and the artifact of each deployed row, each checked; refuses a
    TensorRT engine on a machine that cannot run it."""
    record = read_deploy_record()
    artifacts = {
        row: DEPLOY_RECORD.parent / a["artifact"] for row, a in record["artifacts"].items()
    }
    for path in artifacts.values():
        check_artifact(path)
    on_gpu = params["device"] != "cpu" and torch.cuda.is_available()
    if record["backend"] == "tensorrt" and not on_gpu:
        raise cli.UserError(
            f"{artifacts['deployed']} is a TensorRT engine but params.yaml device is "
            f"{params['device']!r} or no CUDA GPU is visible: evaluate it on the machine it was "
            f"built for."
        )
    return record, artifacts


def time_models(
    detectors: dict[str, YOLO], artifacts: dict[str, Path], record: dict, params: dict
) -> dict[str, dict[str, list[float]]]:
    """Latencies (ms per pass) of every model and artifact, per device, all timed in turns before
    validation starts dataloader workers that compete."""
    imgsz, section = params["imgsz"], params["evaluate"]
    fused = {name: deepcopy(d.model).fuse(verbose=False) for name, d in detectors.items()}
    timed = {"cpu": {name: torch_runner(m, imgsz, "cpu") for name, m in fused.items()}}
    if params["device"] != "cpu" and torch.cuda.is_available():
        timed["gpu"] = {  # copies: the CPU runners keep theirs on the CPU
            name: torch_runner(deepcopy(m), imgsz, "cuda:0") for name, m in fused.items()
        }
    for row, path in artifacts.items():
        where, runner = RUNNERS[record["artifacts"][row]["runtime"]]
        timed[where][row] = runner(path, record["input_shape"])
    return {
        where: latency_ms(runners, section["latency_warmup"], section["latency_repeats"])
        for where, runners in timed.items()
    }


def measure(
    detectors: dict[str, YOLO],
    artifacts: dict[str, Path],
    record: dict,
    times: dict,
    params: dict,
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Accuracy, size and speed of every row (metrics.json), and per-class AP50."""
    imgsz = params["imgsz"]
    sources = row_sources(record)
    sizes = {name: model_size(d.model, imgsz) for name, d in detectors.items()}
    sizes |= {row: sizes[sources[row]] for row in artifacts}
    ground_truth = coco_ground_truth(TEST_IMAGES, TEST_LABELS, len(detectors["baseline"].names))
    evaluated = {**detectors} | {  # an INT8 model is validated as it was timed
        row: YOLO(str(as_run_here(path, TMP_DIR / "evaluate")), task="detect")
        for row, path in artifacts.items()
    }
    on_openvino = {row for row, a in record["artifacts"].items() if a["runtime"] == "openvino"}
    # A deployed artifact's size is in its record (an OpenVINO model is a folder of files).
    mb = {name: path.stat().st_size / 2**20 for name, path in MODELS.items()}
    mb |= {row: a["mb"] for row, a in record["artifacts"].items()}
    metrics, per_class = {}, {}
    for name, detector in evaluated.items():
        # ultralytics compiles an OpenVINO folder itself: made to compile it as it was timed.
        compiling = openvino.as_compiled_here() if name in on_openvino else contextlib.nullcontext()
        with compiling:
            headline, per_class[name] = accuracy(detector, f"evaluate-{name}", params, ground_truth)
        metrics[name] = {**headline, **size_metrics(sizes[name], mb[name])}
        images_per_pass = record["input_shape"][0] if name in artifacts else 1
        for where, runs in times.items():
            if name in runs:
                metrics[name] |= speed_metrics(runs[name], images_per_pass, where)
    return metrics, per_class


def row_runtimes(record: dict) -> dict[str, str]:
    """The runtime (and precision) of every row: PyTorch for checkpoints, its deploy runtime for
    each of trt_build's artifacts."""
    return {name: "PyTorch" for name in MODELS} | {
        row: f"{RUNTIME_NAMES[a['runtime']]} {a['precision']}"
        for row, a in record["artifacts"].items()
    }


def row_sources(record: dict) -> dict[str, str]:
    """The checkpoint every row was built from."""
    return {name: name for name in MODELS} | {
        row: EXPORTED_FROM[a["source"]] for row, a in record["artifacts"].items()
    }


def write_reports(
    metrics: dict, per_class: dict, names: dict, record: dict, params: dict, verdict: str
) -> None:
    """metrics.json, summary.md, environment.json, the plot sources and their PNGs."""
    class_rows = [
        {"class": names[c], **{m: per_class[m].get(names[c]) for m in per_class}}
        for c in sorted(names)
    ]
    model_rows = [
        {"model": name, **{k: m.get(k) for k in MODEL_COLUMNS}} for name, m in metrics.items()
    ]
    write_json(METRICS_OUT, metrics)
    with atomic_path(SUMMARY_OUT) as tmp:
        tmp.write_text(
            summary_table(
                metrics, params["imgsz"], row_runtimes(record), row_sources(record), verdict
            )
        )
    write_json(ENVIRONMENT_OUT, describe_environment(str(params["device"])))
    write_csv(REPORT_DIR / "models.csv", model_rows)
    write_csv(REPORT_DIR / "per_class_ap50.csv", class_rows)
    plot_accuracy_vs_cost(
        model_rows,
        "model",
        {"cpu_latency_ms": "CPU latency per image (ms)", "params_m": "params (M)"},
        REPORT_DIR / "accuracy.png",
    )
    plot_per_class(class_rows, REPORT_DIR / "per_class_ap50.png")


def summary_rows(
    metrics: dict, record: dict, devices: list[str], verdict: str
) -> list[tuple[str, str]]:
    """The stage's one-screen summary: one line per row, then the verdict and the headline."""
    runtimes, sources = row_runtimes(record), row_sources(record)
    rows = []
    for name, m in metrics.items():
        speed = ", ".join(
            f"{where.upper()} {m[f'{where}_latency_ms']:.2f} ms ({m[f'{where}_fps']:.0f} FPS)"
            for where in devices
            if f"{where}_latency_ms" in m
        )
        rows.append(
            (
                name,
                f"AP50 {m['ap50']:.3f}  mAP50-95 {m['map50_95']:.3f}  AP small "
                f"{_shown(m['ap_small'], '.3f')}  {m['params_m']:.2f} M params  "
                f"{m['gflops']:.2f} GFLOPs  {speed}",
            )
        )
    gap = metrics["deployed"]["ap50"] - metrics[DEPLOYED_FROM]["ap50"]
    rows.append(("deployed vs PyTorch", f"AP50 {gap:+.4f} ({runtimes['deployed']})"))
    rows.append(("teacher", verdict.replace("**", "")))
    rows.append(("in short", compression_headline(metrics, runtimes, sources).replace("**", "")))
    rows.append(written(METRICS_OUT, SUMMARY_OUT, REPORT_DIR))
    return rows


def main() -> None:
    params = load(SCHEMA)
    curve = read_teacher_curve()
    detectors = {name: load_detector(path) for name, path in MODELS.items()}
    record, artifacts = deployed_rows(params)
    times = time_models(detectors, artifacts, record, params)
    metrics, per_class = measure(detectors, artifacts, record, times, params)
    seen = trained_epochs(detectors)
    verdict = teacher_verdict(params, curve, metrics[DEPLOYED_FROM]["ap50"], seen)
    write_reports(metrics, per_class, detectors["baseline"].names, record, params, verdict)
    print_summary("evaluate", summary_rows(metrics, record, list(times), verdict))


if __name__ == "__main__":
    cli.run(main, __doc__)
