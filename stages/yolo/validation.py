"""ultralytics validation on one split: val decides, test reports."""

from __future__ import annotations

from typing import Any

from ultralytics import YOLO
from ultralytics.models.yolo.detect import DetectionValidator

from stages.yolo import RUNS_DIR
from stages.yolo.training import check_dataset


class PredictionsValidator(DetectionValidator):
    """Detection validation that, with ``save_json=True``, writes predictions.json for our own
    COCO evaluation (stages/evaluate.py) and skips ultralytics' faster-coco-eval pass."""

    def eval_json(self, stats: dict[str, Any]) -> dict[str, Any]:
        return stats


def validate(model: YOLO, run_name: str, split: str = "val", **args: Any) -> Any:
    """ultralytics validation on one split; returns its DetMetrics.

    ``rect=False``: every backend sees the same square imgsz x imgsz letterbox. ultralytics'
    default rectangular batches pad val images by half a stride (256 -> 288), which exported
    static-shape models cannot do, so their AP50 would not be comparable.
    """
    return model.val(
        validator=PredictionsValidator,
        data=str(check_dataset()),
        split=split,
        rect=False,
        project=str(RUNS_DIR),
        name=run_name,
        exist_ok=True,
        plots=False,
        verbose=False,
        **args,
    )


def val_ap50(model: YOLO, run_name: str, params: dict) -> float:
    """AP50 on the val split at the pipeline's imgsz and device."""
    return float(
        validate(model, run_name, imgsz=params["imgsz"], device=params["device"]).box.map50
    )


def split_accuracy(model: YOLO, run_name: str, params: dict) -> dict[str, float]:
    """AP50 and mAP50-95 of ``model`` on val (what a tool chooses on) and on test (what it
    reports), at the pipeline's imgsz and device."""
    found = {}
    for split in ("val", "test"):
        box = validate(
            model, f"{run_name}-{split}", split, imgsz=params["imgsz"], device=params["device"]
        ).box
        found[f"{split}_ap50"] = round(float(box.map50), 4)
        found[f"{split}_map50_95"] = round(float(box.map), 4)
    return found
