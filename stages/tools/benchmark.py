"""Compression benchmark: how much of a pruned model's FLOPs reduction becomes CPU speed.

    python -m stages.tools.benchmark                  # yolov8n and yolov8m at 640, ratios 0.3..0.8
    python -m stages.tools.benchmark --models yolov8n.yaml --imgsz 320 --ratios 0.5 --repeats 10
    python -m stages.tools.benchmark --sizes-only --models yolov8m.yaml --imgsz 1024  # seconds

For each model (10 classes, freshly built: speed depends on shapes, not on weights): the unpruned
model and its uniform prunings at each ratio (``uniformly_pruned``, stages/yolo/pruning.py), each
measured for params and FLOPs (fused, FLOPs = 2 x MACs) and for the latency of one image (batch
1, median after warm-up) on PyTorch (fp32), and on ONNX Runtime and OpenVINO (CPU, fp32 and the
INT8 Q/DQ model, both runtimes reading the same files that trt_build writes). All variants of one
model are timed in turns in one run (PyTorch in one, the four ONNX columns in another); speedup =
unpruned fp32 ms / pruned ms on the same runtime. The figure of merit is speedup / FLOPs
ratio: 1 would mean every FLOP removed is time saved (the paper's YOLOv8m: 3.7x fewer FLOPs,
1.73x FPS on a GPU, 0.47).

Reads nothing but the ultralytics model configs (every model is built fresh).
Writes reports/benchmark/benchmark.csv, benchmark.md and speedup_vs_flops.png (not DVC outputs:
run on demand, not in the test suite).
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stages.compress.quantize import quantize_int8
from stages.deploy import openvino
from stages.deploy.export import export_model_onnx
from stages.deploy.timing import latency_ms, onnx_runner, openvino_runner, torch_runner
from stages.pipeline import cli
from stages.pipeline.environment import cpu_description
from stages.pipeline.outputs import atomic_path, print_summary, save_figure, write_csv, written
from stages.pipeline.params import load
from stages.pipeline.runtime import PROJECT_ROOT, TMP_DIR, cpu_threads
from stages.trt_build import TRT_BUILD
from stages.yolo.models import check_model_source, model_size
from stages.yolo.pruning import uniformly_pruned

OUT_DIR = PROJECT_ROOT / "reports" / "benchmark"
BACKENDS = ("pytorch", "onnxruntime", "onnxruntime_int8", "openvino", "openvino_int8")
# Each backend's speedups are against the unpruned model in fp32 on the same runtime.
REFERENCE = {b: b.removesuffix("_int8") for b in BACKENDS}


def size_rows(config: str, ratios: Sequence[float], imgsz: int) -> tuple[list[dict], list]:
    """Params and FLOPs of ``config`` unpruned (ratio 0, first) and pruned at each ratio, with the
    (ratio, model) variants they were counted on."""
    rows, variants = [], list(uniformly_pruned(config, ratios))
    for ratio, model in variants:
        size = model_size(model, imgsz)
        rows.append(
            {
                "model": config.removesuffix(".yaml"),
                "ratio": ratio,
                "params_m": round(size["params"] / 1e6, 3),
                "gflops": round(size["flops_g"], 3),
                "gmacs": round(size["macs_g"], 3),
                "flops_ratio": round(rows[0]["gflops"] / size["flops_g"], 3) if rows else 1.0,
            }
        )
    return rows, variants


def benchmark_model(
    config: str, ratios: Sequence[float], imgsz: int, warmup: int, repeats: int, int8: dict
) -> list[dict]:
    """Rows for ``config`` unpruned (ratio 0) and pruned at each ratio: timed on PyTorch, and on
    ONNX Runtime and OpenVINO in fp32 and INT8 (``int8``: trt_build's exclusions; speedups against
    the unpruned fp32 model on the same runtime, int8_vs_fp32 against the same ratio in fp32)."""
    work = TMP_DIR / "benchmark"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows, variants = size_rows(config, ratios, imgsz)
    # Speed does not depend on the weights or on where the ranges come from: random images.
    calibration = np.random.default_rng(0).random((4, 3, imgsz, imgsz), dtype=np.float32)
    runners: dict[str, dict] = {"pytorch": {}, "ONNX Runtime and OpenVINO": {}}
    for ratio, model in tqdm(variants, desc=f"{config}: export + quantize"):
        fp32, qdq = (work / f"{ratio}{suffix}" for suffix in (".onnx", ".q.onnx"))
        export_model_onnx(model, fp32, imgsz, 1, int8["opset"])
        quantize_int8(fp32, qdq, calibration, int8["int8_exclude"], "minmax")
        runners["pytorch"][("pytorch", ratio)] = torch_runner(
            model.float().fuse(verbose=False), imgsz, "cpu"
        )
        shape = [1, 3, imgsz, imgsz]
        for suffix, path in (("", fp32), ("_int8", qdq)):
            onnx_runners = runners["ONNX Runtime and OpenVINO"]
            onnx_runners[(f"onnxruntime{suffix}", ratio)] = onnx_runner(path, shape)
            onnx_runners[(f"openvino{suffix}", ratio)] = openvino_runner(
                openvino.write_ir(path), shape
            )
    times = {}
    for group, timed in runners.items():  # the ONNX models take turns in one run
        print(f"timing {config} on {group}: {len(timed)} models x ({warmup} + {repeats}) passes")
        times |= {
            key: statistics.median(t) for key, t in latency_ms(timed, warmup, repeats).items()
        }
    for row in rows:
        for backend in BACKENDS:
            reference = times[(REFERENCE[backend], 0.0)]
            ms = times[(backend, row["ratio"])]
            row[f"{backend}_ms"] = round(ms, 2)
            row[f"{backend}_speedup"] = round(reference / ms, 3)
            row[f"{backend}_merit"] = round(reference / ms / row["flops_ratio"], 3)
        for runtime in ("onnxruntime", "openvino"):
            row[f"{runtime}_int8_vs_fp32"] = round(
                row[f"{runtime}_ms"] / row[f"{runtime}_int8_ms"], 3
            )
        row["fastest"] = min(BACKENDS, key=lambda backend: row[f"{backend}_ms"])
        unpruned_best = min(times[(backend, 0.0)] for backend in BACKENDS)
        row["fastest_speedup"] = round(unpruned_best / row[f"{row['fastest']}_ms"], 3)
    shutil.rmtree(work, ignore_errors=True)
    return rows


COLUMN_NAMES = {
    "pytorch": "PyTorch",
    "onnxruntime": "ORT fp32",
    "onnxruntime_int8": "ORT INT8",
    "openvino": "OpenVINO fp32",
    "openvino_int8": "OpenVINO INT8",
}


def markdown_table(rows: list[dict], imgsz: int, warmup: int, repeats: int) -> str:
    cpu = cpu_description()
    lines = [
        f"CPU: {cpu['model']} (flags: {', '.join(cpu['flags']) or 'none of note'}), "
        f"{cpu_threads()} threads; imgsz {imgsz}, batch 1; median of {repeats} passes after "
        f"{warmup} warm-up passes; the variants of one model timed in turns, PyTorch in one run, "
        f"the four ONNX columns in another. Uniform pruning of a freshly built 10-class model. "
        f"Each cell: ms (speedup against the unpruned model in fp32 on the same runtime). INT8: "
        f"the Q/DQ model (trt_build's exclusions, random-image calibration: speed only), read by "
        f"ONNX Runtime and by OpenVINO (f32 for its float layers). Fastest: the quickest runtime "
        f"for the row, and its speedup over the unpruned model on that model's own quickest "
        f"runtime. Merit (speedup / FLOPs ratio) is in benchmark.csv.",
        "",
        "| model | ratio | params (M) | GFLOPs | FLOPs ratio | "
        + " | ".join(f"{name} ms" for name in COLUMN_NAMES.values())
        + " | fastest |",
        "|---|---|---|---|---|" + "---|" * (len(COLUMN_NAMES) + 1),
    ]
    for r in rows:
        cells = [r["model"], f"{r['ratio']:.1f}", f"{r['params_m']:.3f}", f"{r['gflops']:.2f}"]
        cells.append(f"{r['flops_ratio']:.2f}x")
        cells += [f"{r[f'{b}_ms']:.1f} ({r[f'{b}_speedup']:.2f}x)" for b in BACKENDS]
        cells.append(f"{COLUMN_NAMES[r['fastest']]} ({r['fastest_speedup']:.2f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_speedup(rows: list[dict], path: Path) -> None:
    """Measured speedup against FLOPs reduction; the diagonal is 'every FLOP is time'."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    top = max(r["flops_ratio"] for r in rows)
    ax.plot([1, top], [1, top], "k--", linewidth=1, label="speedup = FLOPs ratio")
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        for backend, marker in zip(BACKENDS, ("o-", "s--", "^:", "D-.", "v:"), strict=True):
            ax.plot(
                [r["flops_ratio"] for r in mine],
                [r[f"{backend}_speedup"] for r in mine],
                marker,
                label=f"{model} {COLUMN_NAMES[backend]}",
            )
    ax.set_xlabel("FLOPs reduction (unpruned / pruned)")
    ax.set_ylabel("measured CPU speedup")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--models", nargs="+", default=["yolov8n.yaml", "yolov8m.yaml"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument(
        "--sizes-only", action="store_true", help="print params and FLOPs; no export or timing"
    )
    args = parser.parse_args(argv)
    for config in args.models:
        check_model_source("--models", config)
        if config.endswith(".pt"):
            parser.error(f"--models {config}: give a config name such as yolov8n.yaml")
    if not all(0 < r < 1 for r in args.ratios):
        parser.error(f"--ratios {args.ratios}: every ratio must be in (0, 1)")

    if args.sizes_only:
        rows = [
            row for config in args.models for row in size_rows(config, args.ratios, args.imgsz)[0]
        ]
        print_summary(
            f"sizes at {args.imgsz} (fused, FLOPs = 2 x MACs)",
            [
                (
                    f"{r['model']} {r['ratio']:.2f}",
                    f"{r['params_m']:.3f} M params  {r['gflops']:.2f} GFLOPs  {r['gmacs']:.2f} "
                    f"GMACs ({r['flops_ratio']:.2f}x fewer FLOPs)",
                )
                for r in rows
            ],
        )
        return
    int8 = load({"trt_build": TRT_BUILD})["trt_build"]
    rows = []
    for config in args.models:
        rows += benchmark_model(config, args.ratios, args.imgsz, args.warmup, args.repeats, int8)
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
                f"{r['gflops']:.2f} GFLOPs ({r['flops_ratio']:.2f}x fewer)  "
                + "  ".join(f"{COLUMN_NAMES[b]} {r[f'{b}_speedup']:.2f}x" for b in BACKENDS)
                + f"  fastest: {COLUMN_NAMES[r['fastest']]}",
            )
            for r in rows
        ]
        + [written(out / "benchmark.csv", out / "benchmark.md", out / "speedup_vs_flops.png")],
    )


if __name__ == "__main__":
    cli.run(main)
