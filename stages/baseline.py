"""Stage `baseline`: train the uncompressed YOLOv8 detector with ultralytics.

Reads: data/yolo (dataset stage). Writes: models/baseline.pt (the last epoch's EMA weights, an
ultralytics checkpoint that loads with ``YOLO(path)``), reports/baseline/results.csv (per-epoch
losses and val metrics, a DVC plot).
"""

from __future__ import annotations

from ultralytics.models.yolo.detect import DetectionTrainer

from stages.common import cli, yolo
from stages.common import params as P
from stages.common.outputs import print_summary, written
from stages.common.runtime import PROJECT_ROOT

MODEL_OUT = PROJECT_ROOT / "models" / "baseline.pt"
RESULTS_OUT = PROJECT_ROOT / "reports" / "baseline" / "results.csv"

SHA256 = P.Pattern(r"|[0-9a-fA-F]{64}", "'' (not checked) or the 64 hex digits of a sha256")
SCHEMA = {
    **P.COMMON,
    "baseline": P.Section({"model": P.Str(), "weights_sha256": SHA256, **yolo.TRAINING}),
}


def main() -> None:
    params = P.load(SCHEMA)
    section = params["baseline"]
    source = yolo.check_model_source("baseline.model", section["model"], section["weights_sha256"])
    args = yolo.training_args(params, section)
    yolo.check_dataset()

    model = yolo.YOLO(source, task="detect")
    # The stock trainer: it rebuilds the head for the dataset's classes when fine-tuning a .pt.
    final = yolo.train(
        model,
        "baseline",
        MODEL_OUT,
        RESULTS_OUT,
        trainer=DetectionTrainer,
        pretrained=source.endswith(".pt"),
        **args,
    )
    size = yolo.model_size(final.model, params["imgsz"])
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
