"""Compression benchmark: how much of a pruned model's FLOPs reduction becomes CPU speed.

    python -m stages.tools.benchmark                  # yolov8n and yolov8m at 640, ratios 0.3..0.8
    python -m stages.tools.benchmark --models yolov8n.yaml --imgsz 320 --ratios 0.5 --repeats 10

For each model (10 classes, freshly built: speed depends on shapes, not on weights): the unpruned
model and its uniform prunings at each ratio (stages.prune.uniformly_pruned), each measured for
params and FLOPs (fused, FLOPs = 2 x MACs) and for the latency of one image (batch 1, fp32,
median after warm-up) on PyTorch and on ONNX Runtime (exported as trt_build exports). All variants
of one model and backend are timed in turns in one run; speedup = unpruned ms / pruned ms on the
same backend. The figure of merit is speedup / FLOPs ratio: 1 would mean every FLOP removed is
time saved (the paper's YOLOv8m: 3.7x fewer FLOPs, 1.73x FPS on a GPU, 0.47).

Writes reports/benchmark/benchmark.csv, benchmark.md and speedup_vs_flops.png (not DVC outputs:
run on demand, not in the test suite).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path

import torch
from tqdm import tqdm

from stages.common import yolo
from stages.common.outputs import atomic_path, print_summary, save_figure, write_csv, written
from stages.common.runtime import PROJECT_ROOT, TMP_DIR, cpu_threads
from stages.evaluate import latency_ms, onnx_runner, torch_runner
from stages.prune import uniformly_pruned
from stages.trt_build import export_onnx

OUT_DIR = PROJECT_ROOT / "reports" / "benchmark"
BACKENDS = ("pytorch", "onnxruntime")


def benchmark_model(
    cfg: str, ratios: Sequence[float], imgsz: int, warmup: int, repeats: int, opset: int
) -> list[dict]:
    """Rows for ``cfg`` unpruned (ratio 0) and pruned at each ratio, timed on both backends."""
    work = TMP_DIR / "benchmark"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows, flops, runners = [], [], {backend: {} for backend in BACKENDS}
    variants = list(uniformly_pruned(cfg, ratios))
    for ratio, model in tqdm(variants, desc=f"{cfg}: size + export"):
        size = yolo.model_size(model, imgsz)
        flops.append(size["flops_g"])
        rows.append(
            {
                "model": cfg.removesuffix(".yaml"),
                "ratio": ratio,
                "params_m": round(size["params"] / 1e6, 3),
                "gflops": round(size["flops_g"], 3),
                "flops_ratio": round(flops[0] / size["flops_g"], 3),  # ratio 0.0 comes first
            }
        )
        checkpoint, onnx_file = work / f"{ratio}.pt", work / f"{ratio}.onnx"
        torch.save({"model": deepcopy(model).half(), "train_args": {}}, checkpoint)
        export_onnx(checkpoint, onnx_file, imgsz, 1, opset)
        runners["pytorch"][ratio] = torch_runner(model.float().fuse(verbose=False), imgsz, "cpu")
        runners["onnxruntime"][ratio] = onnx_runner(onnx_file, [1, 3, imgsz, imgsz])
    for backend, timed in runners.items():
        print(f"timing {cfg} on {backend}: {len(timed)} variants x ({warmup} + {repeats}) passes")
        times = latency_ms(timed, warmup, repeats)
        base_ms = statistics.median(times[0.0])
        for row in rows:
            ms = statistics.median(times[row["ratio"]])
            row[f"{backend}_ms"] = round(ms, 2)
            row[f"{backend}_speedup"] = round(base_ms / ms, 3)
            row[f"{backend}_merit"] = round(base_ms / ms / row["flops_ratio"], 3)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def markdown_table(rows: list[dict], imgsz: int, warmup: int, repeats: int) -> str:
    lines = [
        f"CPU: {platform.processor() or platform.machine()}, {cpu_threads()} threads; imgsz "
        f"{imgsz}, batch 1, fp32; median of {repeats} passes after {warmup} warm-up passes, "
        f"variants of one model timed in turns. Uniform pruning of a freshly built 10-class model. "
        f"merit = speedup / FLOPs ratio.",
        "",
        "| model | ratio | params (M) | GFLOPs | FLOPs ratio | PyTorch ms | speedup | merit "
        "| ORT ms | speedup | merit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ratio']:.1f} | {r['params_m']:.3f} | {r['gflops']:.2f} | "
            f"{r['flops_ratio']:.2f}x | {r['pytorch_ms']:.1f} | {r['pytorch_speedup']:.2f}x | "
            f"{r['pytorch_merit']:.2f} | {r['onnxruntime_ms']:.1f} | "
            f"{r['onnxruntime_speedup']:.2f}x | {r['onnxruntime_merit']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot_speedup(rows: list[dict], path: Path) -> None:
    """Measured speedup against FLOPs reduction; the diagonal is 'every FLOP is time'."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    top = max(r["flops_ratio"] for r in rows)
    ax.plot([1, top], [1, top], "k--", linewidth=1, label="speedup = FLOPs ratio")
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        for backend, marker in (("pytorch", "o-"), ("onnxruntime", "s--")):
            ax.plot(
                [r["flops_ratio"] for r in mine],
                [r[f"{backend}_speedup"] for r in mine],
                marker,
                label=f"{model} {backend}",
            )
    ax.set_xlabel("FLOPs reduction (unpruned / pruned)")
    ax.set_ylabel("measured CPU speedup")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["yolov8n.yaml", "yolov8m.yaml"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    for cfg in args.models:
        yolo.check_model_source("--models", cfg)
        if cfg.endswith(".pt"):
            parser.error(f"--models {cfg}: give a config name such as yolov8n.yaml")
    if not all(0 < r < 1 for r in args.ratios):
        parser.error(f"--ratios {args.ratios}: every ratio must be in (0, 1)")

    rows = []
    for cfg in args.models:
        rows += benchmark_model(cfg, args.ratios, args.imgsz, args.warmup, args.repeats, args.opset)
    out = args.out.resolve()
    write_csv(out / "benchmark.csv", rows)
    with atomic_path(out / "benchmark.md") as tmp:
        tmp.write_text(markdown_table(rows, args.imgsz, args.warmup, args.repeats))
    plot_speedup(rows, out / "speedup_vs_flops.png")
    print_summary(
        "benchmark",
        [
            (
                f"{r['model']} {r['ratio']:.1f}",
                f"{r['gflops']:.2f} GFLOPs ({r['flops_ratio']:.2f}x fewer)  PyTorch "
                f"{r['pytorch_speedup']:.2f}x  ORT {r['onnxruntime_speedup']:.2f}x",
            )
            for r in rows
        ]
        + [written(out / "benchmark.csv", out / "benchmark.md", out / "speedup_vs_flops.png")],
    )


if __name__ == "__main__":
    main()
