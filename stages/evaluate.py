"""Stage `evaluate`: measure every model of the pipeline on the same val split.

For each checkpoint (baseline, sparse, pruned, distilled) and for the deployed artifact written by
trt_build (ONNX on ONNX Runtime, or a TensorRT engine): AP50, mAP50-95, precision and recall
(ultralytics validation, the same pre- and post-processing for every backend), params, MACs and
FLOPs of the fused model at imgsz, file size, and the latency of one image (batch 1, fp32 on the
CPU, after warm-up; median over repeats) with FPS = 1000 / median ms. All models are timed in
turns, pass by pass, before any validation runs; a TensorRT engine is timed on its GPU.

Writes reports/metrics.json (DVC metrics, keys like ``baseline.ap50``) and reports/summary.md.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from ultralytics import YOLO

from stages.common import params as P
from stages.common import yolo
from stages.common.outputs import atomic_path, print_summary, write_json, written
from stages.common.runtime import PROJECT_ROOT, cpu_threads

# The checkpoints of the pipeline, in DAG order: name -> file written by its stage.
MODELS = {
    "baseline": PROJECT_ROOT / "models" / "baseline.pt",
    "sparse": PROJECT_ROOT / "models" / "sparse.pt",
    "pruned": PROJECT_ROOT / "models" / "pruned.pt",
    "distilled": PROJECT_ROOT / "models" / "distilled.pt",
}
DEPLOY_RECORD = PROJECT_ROOT / "models" / "deploy" / "deploy.json"  # written by trt_build
DEPLOYED_FROM = "distilled"  # the checkpoint trt_build deploys
METRICS_OUT = PROJECT_ROOT / "reports" / "metrics.json"
SUMMARY_OUT = PROJECT_ROOT / "reports" / "summary.md"

SCHEMA = {
    "imgsz": P.COMMON["imgsz"],
    "device": P.COMMON["device"],
    "evaluate": P.Section(
        {
            "batch": P.Int(1, 1024),
            "latency_warmup": P.Int(0, 10_000),
            "latency_repeats": P.Int(1, 100_000),
        }
    ),
}


def torch_runner(model: torch.nn.Module, imgsz: int) -> Callable[[], object]:
    """One fp32 CPU forward pass of a single image."""
    model = model.float().cpu().eval()
    x = torch.rand(1, 3, imgsz, imgsz)
    return lambda: model(x)


def onnx_runner(path: Path, shape: list[int]) -> Callable[[], object]:
    """One ONNX Runtime (CPU) pass at the exported, static input shape."""
    options = ort.SessionOptions()
    # Idle ORT threads spin by default and would slow the torch models timed in turn with it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = cpu_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).random(shape, np.float32)}
    return lambda: session.run(None, feed)


def engine_runner(path: Path, shape: list[int]) -> Callable[[], object]:
    """One TensorRT pass on the GPU, synchronised so that the wall time is the GPU's."""
    from ultralytics.nn.autobackend import AutoBackend

    backend = AutoBackend(str(path), device=torch.device("cuda:0"))
    x = torch.rand(shape, device="cuda:0")

    def run() -> None:
        backend(x)
        torch.cuda.synchronize()

    return run


def latency_ms(
    runners: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Wall times (ms) of each runner's pass.

    The runners take turns pass by pass, so drift in the machine's speed (other load, clock
    changes) hits all of them alike and their ratios stay fair.
    """
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1000)
    return times


def accuracy(detector: YOLO, run_name: str, params: dict) -> dict[str, float]:
    """AP50, mAP50-95, precision and recall on the val split (ultralytics validation)."""
    results = yolo.validate(
        detector,
        run_name,
        imgsz=params["imgsz"],
        batch=params["evaluate"]["batch"],
        device=params["device"],
    )
    return {
        "ap50": round(float(results.box.map50), 4),
        "map50_95": round(float(results.box.map), 4),
        "precision": round(float(results.box.mp), 4),
        "recall": round(float(results.box.mr), 4),
    }


def size_metrics(model: torch.nn.Module, imgsz: int, file: Path) -> dict[str, float]:
    size = yolo.model_size(model, imgsz)
    return {
        "params_m": round(size["params"] / 1e6, 4),
        "gflops": round(size["flops_g"], 4),
        "gmacs": round(size["macs_g"], 4),
        "file_mb": round(file.stat().st_size / 2**20, 3),
    }


def speed_metrics(times: list[float], images_per_pass: int, where: str) -> dict[str, float]:
    per_image = statistics.median(times) / images_per_pass
    return {f"{where}_latency_ms": round(per_image, 3), f"{where}_fps": round(1000 / per_image, 2)}


def _latency_and_fps(m: dict) -> tuple[str, str]:
    if "cpu_fps" in m:
        return f"{m['cpu_latency_ms']:.2f}", f"{m['cpu_fps']:.1f}"
    return f"GPU {m['gpu_latency_ms']:.2f}", f"GPU {m['gpu_fps']:.1f}"


def summary_table(metrics: dict[str, dict[str, float]], imgsz: int) -> str:
    """A Markdown table in the paper's shape, with changes relative to the baseline."""
    base = metrics["baseline"]
    lines = [
        f"Models on the val split at imgsz {imgsz}. FLOPs = 2 x MACs of the fused model. Latency: "
        f"median per image (batch 1, fp32 on the CPU), models timed in turns in one run; "
        f"speedup = baseline ms / model ms.",
        "",
        "| model | params (M) | FLOPs (G) | MACs (G) | AP50 | mAP50-95 | ms | FPS "
        "| params | FLOPs | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in metrics.items():
        speedup = (
            f"{base['cpu_latency_ms'] / m['cpu_latency_ms']:.2f}x" if "cpu_fps" in m else "GPU"
        )
        lines.append(
            f"| {name} | {m['params_m']:.3f} | {m['gflops']:.3f} | {m['gmacs']:.3f} | "
            f"{m['ap50']:.3f} | {m['map50_95']:.3f} | {' | '.join(_latency_and_fps(m))} | "
            f"{(m['params_m'] / base['params_m'] - 1) * 100:+.1f}% | "
            f"{(m['gflops'] / base['gflops'] - 1) * 100:+.1f}% | {speedup} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    params = P.load(SCHEMA)
    cfg, imgsz = params["evaluate"], params["imgsz"]
    detectors = {name: yolo.load_detector(path) for name, path in MODELS.items()}
    if not DEPLOY_RECORD.is_file():
        raise FileNotFoundError(f"{DEPLOY_RECORD} not found: run `dvc repro trt_build` first.")
    record = json.loads(DEPLOY_RECORD.read_text())
    artifact = DEPLOY_RECORD.parent / record["artifact"]
    shape = record["input_shape"]
    on_gpu = record["backend"] == "tensorrt"

    # Timed first, all together, before validation starts dataloader workers that compete.
    runners = {
        name: torch_runner(deepcopy(d.model).fuse(verbose=False), imgsz)
        for name, d in detectors.items()
    }
    if not on_gpu:
        runners["deployed"] = onnx_runner(artifact, shape)
    times = latency_ms(runners, cfg["latency_warmup"], cfg["latency_repeats"])
    if on_gpu:
        engine = {"deployed": engine_runner(artifact, shape)}
        times.update(latency_ms(engine, cfg["latency_warmup"], cfg["latency_repeats"]))

    metrics = {
        name: {
            **accuracy(d, f"evaluate-{name}", params),
            **size_metrics(d.model, imgsz, MODELS[name]),
            **speed_metrics(times[name], 1, "cpu"),
        }
        for name, d in detectors.items()
    }
    metrics["deployed"] = {
        **accuracy(YOLO(str(artifact), task="detect"), "evaluate-deployed", params),
        **size_metrics(detectors[DEPLOYED_FROM].model, imgsz, artifact),
        **speed_metrics(times["deployed"], shape[0], "gpu" if on_gpu else "cpu"),
    }
    write_json(METRICS_OUT, metrics)
    with atomic_path(SUMMARY_OUT) as tmp:
        tmp.write_text(summary_table(metrics, imgsz))

    gap = metrics["deployed"]["ap50"] - metrics[DEPLOYED_FROM]["ap50"]
    rows = []
    for name, m in metrics.items():
        ms, fps = _latency_and_fps(m)
        rows.append(
            (
                name,
                f"AP50 {m['ap50']:.3f}  mAP50-95 {m['map50_95']:.3f}  {m['params_m']:.2f} M "
                f"params  {m['gflops']:.2f} GFLOPs  {ms} ms, {fps} FPS",
            )
        )
    rows.append(
        ("deployed vs PyTorch", f"AP50 {gap:+.4f} ({record['backend']}, {record['precision']})")
    )
    rows.append(written(METRICS_OUT, SUMMARY_OUT))
    print_summary("evaluate", rows)


if __name__ == "__main__":
    main()
