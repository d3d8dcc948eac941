"""Stage `baseline`: train the uncompressed YOLOv8 detector with ultralytics.

Reads: data/yolo (dataset stage). Writes: models/baseline.pt (the last epoch's EMA weights, an
ultralytics checkpoint that loads with ``YOLO(path)``), reports/baseline/results.csv (per-epoch
losses and val metrics, a DVC plot).
"""

from __future__ import annotations

import shutil

from stages.common import params as P
from stages.common import yolo
from stages.common.outputs import atomic_path, print_summary
from stages.common.runtime import PROJECT_ROOT

MODEL_OUT = PROJECT_ROOT / "models" / "baseline.pt"
RESULTS_OUT = PROJECT_ROOT / "reports" / "baseline" / "results.csv"

# Training settings shared by every training stage (baseline here; later stages reuse it).
TRAINING = {
    "epochs": P.Int(1, 10_000),
    "batch": P.Int(1, 1024),
    # ultralytics steps the optimizer every nbs/batch batches; nbs = batch steps every batch.
    "nbs": P.Int(1, 1024),
    "optimizer": P.Choice("SGD", "Adam", "AdamW"),
    "lr0": P.Float(0, 1, open_lo=True),
    "warmup_epochs": P.Float(0, 100),
    "mosaic": P.Float(0, 1),
    "close_mosaic": P.Int(0),
    "workers": P.Int(0, 64),
}
COMMON = {"seed": P.Int(0), "imgsz": P.Int(32, 4096), "device": P.DEVICE}
SCHEMA = {**COMMON, "baseline": P.Section({"model": P.Str(), **TRAINING})}


def training_args(common: dict, section: dict) -> dict:
    """ultralytics train() arguments from validated params."""
    if common["imgsz"] % 32:
        raise P.ParamsError(f"params.yaml: imgsz = {common['imgsz']} must be a multiple of 32.")
    args = {k: section[k] for k in TRAINING}
    return {**args, "seed": common["seed"], "imgsz": common["imgsz"], "device": common["device"]}


def main() -> None:
    params = P.load(SCHEMA)
    section = params["baseline"]
    source = yolo.check_model_source("baseline.model", section["model"])
    args = training_args(params, section)
    yolo.check_dataset()

    model = yolo.YOLO(source, task="detect")
    run_dir = yolo.train(model, "baseline", pretrained=source.endswith(".pt"), **args)

    with atomic_path(MODEL_OUT) as tmp:
        shutil.copyfile(run_dir / "weights" / "last.pt", tmp)
    with atomic_path(RESULTS_OUT) as tmp:
        shutil.copyfile(run_dir / "results.csv", tmp)

    final = yolo.load_detector(MODEL_OUT)
    size = yolo.model_size(final.model, params["imgsz"])
    print_summary(
        "baseline",
        [
            ("model", section["model"]),
            ("epochs x images", f"{section['epochs']} x {params['imgsz']} px"),
            ("params (fused)", f"{size['params'] / 1e6:.3f} M"),
            ("GFLOPs", size["flops_g"]),
            (
                "written",
                f"{MODEL_OUT.relative_to(PROJECT_ROOT)}, {RESULTS_OUT.relative_to(PROJECT_ROOT)}",
            ),
        ],
    )


if __name__ == "__main__":
    main()
