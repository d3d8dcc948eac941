"""Stage `evaluate`: measure every model of the pipeline on the same val split.

For each model: AP50, mAP50-95, precision and recall (ultralytics validation), params, MACs and
FLOPs of the fused model at imgsz, file size, and CPU latency of one image (batch 1, fp32, after
warm-up; median over repeats) with FPS = 1000 / median ms. The models are timed in turns, pass by
pass, before any validation runs.

Writes reports/metrics.json (DVC metrics, keys like ``baseline.ap50``) and reports/summary.md.
"""

from __future__ import annotations

import statistics
import time
from copy import deepcopy
from pathlib import Path

import torch

from stages.common import params as P
from stages.common import yolo
from stages.common.outputs import atomic_path, print_summary, write_json
from stages.common.runtime import PROJECT_ROOT

# The models of the pipeline, in DAG order: name -> checkpoint written by its stage.
MODELS = {
    "baseline": PROJECT_ROOT / "models" / "baseline.pt",
    "sparse": PROJECT_ROOT / "models" / "sparse.pt",
    "pruned": PROJECT_ROOT / "models" / "pruned.pt",
}
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


def cpu_latency_ms(
    models: dict[str, torch.nn.Module], imgsz: int, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Wall times (ms) of single-image forward passes of each model on the CPU.

    The models take turns pass by pass, so drift in the machine's speed (other load, clock
    changes) hits all of them alike and their ratios stay fair.
    """
    x = torch.rand(1, 3, imgsz, imgsz)
    models = {name: m.float().cpu().eval() for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1000)
    return times


def evaluate_model(path: Path, params: dict, latency: list[float]) -> dict[str, float]:
    """All metrics of one checkpoint, given its measured latencies."""
    detector = yolo.load_detector(path)
    size = yolo.model_size(detector.model, params["imgsz"])
    results = yolo.validate(
        detector,
        f"evaluate-{path.stem}",
        imgsz=params["imgsz"],
        batch=params["evaluate"]["batch"],
        device=params["device"],
    )
    median = statistics.median(latency)
    return {
        "ap50": round(float(results.box.map50), 4),
        "map50_95": round(float(results.box.map), 4),
        "precision": round(float(results.box.mp), 4),
        "recall": round(float(results.box.mr), 4),
        "params_m": round(size["params"] / 1e6, 4),
        "gflops": round(size["flops_g"], 4),
        "gmacs": round(size["macs_g"], 4),
        "file_mb": round(path.stat().st_size / 2**20, 3),
        "cpu_latency_ms": round(median, 3),
        "cpu_fps": round(1000 / median, 2),
    }


def summary_table(metrics: dict[str, dict[str, float]], imgsz: int) -> str:
    """A Markdown table in the paper's shape, with changes relative to the baseline."""
    base = metrics["baseline"]
    lines = [
        f"Models on the val split at imgsz {imgsz}. FLOPs = 2 x MACs of the fused model. CPU ms: "
        f"median latency of one image (batch 1, fp32), models timed in turns in one run; "
        f"speedup = baseline ms / model ms.",
        "",
        "| model | params (M) | FLOPs (G) | MACs (G) | AP50 | mAP50-95 | CPU ms | CPU FPS "
        "| params | FLOPs | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in metrics.items():
        lines.append(
            f"| {name} | {m['params_m']:.3f} | {m['gflops']:.3f} | {m['gmacs']:.3f} | "
            f"{m['ap50']:.3f} | {m['map50_95']:.3f} | {m['cpu_latency_ms']:.2f} | "
            f"{m['cpu_fps']:.1f} | {(m['params_m'] / base['params_m'] - 1) * 100:+.1f}% | "
            f"{(m['gflops'] / base['gflops'] - 1) * 100:+.1f}% | "
            f"{base['cpu_latency_ms'] / m['cpu_latency_ms']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    params = P.load(SCHEMA)
    cfg = params["evaluate"]
    # Timed first, all together, before validation starts dataloader workers that compete.
    fused = {
        name: deepcopy(yolo.load_detector(path).model).float().fuse(verbose=False)
        for name, path in MODELS.items()
    }
    times = cpu_latency_ms(fused, params["imgsz"], cfg["latency_warmup"], cfg["latency_repeats"])
    metrics = {name: evaluate_model(path, params, times[name]) for name, path in MODELS.items()}
    write_json(METRICS_OUT, metrics)
    with atomic_path(SUMMARY_OUT) as tmp:
        tmp.write_text(summary_table(metrics, params["imgsz"]))
    print_summary(
        "evaluate",
        [
            (
                name,
                f"AP50 {m['ap50']:.3f}  mAP50-95 {m['map50_95']:.3f}  "
                f"{m['params_m']:.2f} M params  {m['gflops']:.2f} GFLOPs  {m['cpu_fps']:.1f} FPS",
            )
            for name, m in metrics.items()
        ]
        + [
            (
                "written",
                f"{METRICS_OUT.relative_to(PROJECT_ROOT)}, {SUMMARY_OUT.relative_to(PROJECT_ROOT)}",
            )
        ],
    )


if __name__ == "__main__":
    main()
