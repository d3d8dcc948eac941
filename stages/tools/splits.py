"""Accuracy on the split that decides and on the split that reports, for the on-demand tools."""

from __future__ import annotations

from ultralytics import YOLO

from stages.common import yolo


def split_accuracy(model: YOLO, run_name: str, params: dict) -> dict[str, float]:
    """AP50 and mAP50-95 of ``model`` on val (what a tool chooses on) and on test (what it
    reports), at the pipeline's imgsz and device."""
    found = {}
    for split in ("val", "test"):
        box = yolo.validate(
            model, f"{run_name}-{split}", split, imgsz=params["imgsz"], device=params["device"]
        ).box
        found[f"{split}_ap50"] = round(float(box.map50), 4)
        found[f"{split}_map50_95"] = round(float(box.map), 4)
    return found
