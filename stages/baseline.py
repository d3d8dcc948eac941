"""Stage `baseline`: train the uncompressed YOLOv8 detector with ultralytics.

Reads: data/yolo (dataset stage). Writes: models/baseline.pt (the last epoch's EMA weights, an
ultralytics checkpoint that loads with ``YOLO(path)``), reports/baseline/results.csv (per-epoch
losses and val metrics, a DVC plot).
"""

from __future__ import annotations

from pathlib import Path

from ultralytics import YOLO
from ultralytics.models.yolo.detect import DetectionTrainer

from stages.pipeline import cli
from stages.pipeline.outputs import print_summary, written
from stages.pipeline.params import COMMON, Pattern, Section, Str, load
from stages.pipeline.runtime import PROJECT_ROOT
from stages.yolo.models import check_model_source, model_size
from stages.yolo.training import TRAINING, check_dataset, train, training_args

MODEL_OUT = PROJECT_ROOT / "models" / "baseline.pt"
RESULTS_OUT = PROJECT_ROOT / "reports" / "baseline" / "results.csv"

SHA256 = Pattern(r"|[0-9a-fA-F]{64}", "'' (not checked) or the 64 hex digits of a sha256")
SCHEMA = {
    **COMMON,
    "baseline": Section({"model": Str(), "weights_sha256": SHA256, **TRAINING}),
}


def teacher_settings(params: dict) -> dict:
    """Every param the teacher's accuracy depends on but its epoch budget: two baselines with the
    same settings differ only by how long they trained (the teacher curve's x axis)."""
    section = {k: v for k, v in params["baseline"].items() if k != "epochs"}
    return {k: params[k] for k in ("seed", "imgsz", "dataset")} | {"baseline": section}


def train_baseline(
    params: dict, section: dict, run_name: str, model_out: Path, results_out: Path
) -> YOLO:
    """Train ``section`` (a validated ``baseline`` section) from its model source."""
    source = check_model_source("baseline.model", section["model"], section["weights_sha256"])
    args = training_args(params, section)
    check_dataset()
    # The stock trainer: it rebuilds the head for the dataset's classes when fine-tuning a .pt.
    return train(
        YOLO(source, task="detect"),
        run_name,
        model_out,
        results_out,
        trainer=DetectionTrainer,
        pretrained=source.endswith(".pt"),
        **args,
    )


def main() -> None:
    params = load(SCHEMA)
    section = params["baseline"]
    final = train_baseline(params, section, "baseline", MODEL_OUT, RESULTS_OUT)
    size = model_size(final.model, params["imgsz"])
    print_summary(
        "baseline",
        [
            ("model", section["model"]),
            ("epochs, imgsz", f"{section['epochs']}, {params['imgsz']} px"),
            ("params (fused)", f"{size['params'] / 1e6:.3f} M"),
            ("GFLOPs", size["flops_g"]),
            written(MODEL_OUT, RESULTS_OUT),
        ],
    )


if __name__ == "__main__":
    cli.run(main, __doc__)
