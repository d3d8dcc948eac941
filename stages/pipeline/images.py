"""Finding the images of a split, and loading them as model input the way ultralytics does."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stages.pipeline.cli import UserError
from stages.pipeline.runtime import PROJECT_ROOT

if TYPE_CHECKING:
    import torch

TRAIN_IMAGES = PROJECT_ROOT / "data" / "yolo" / "images" / "train"
VAL_IMAGES = PROJECT_ROOT / "data" / "yolo" / "images" / "val"
TEST_IMAGES = PROJECT_ROOT / "data" / "yolo" / "images" / "test"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_files(folder: Path) -> list[Path]:
    """The images of ``folder`` in name order (the order every stage and report uses)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def calibration_batch(folder: Path, count: int, imgsz: int) -> torch.Tensor:
    """The first ``count`` images of ``folder`` (by name), letterboxed to imgsz, in [0, 1]."""
    # Imported here: the dataset stage imports this module for image_files alone.
    import cv2
    import numpy as np
    import torch
    from ultralytics.data.augment import LetterBox

    files = image_files(folder)
    if not files:
        raise UserError(f"no images in {folder}: run `dvc repro dataset` first.")
    letterbox = LetterBox(new_shape=(imgsz, imgsz), auto=False)
    images = []
    for path in files[:count]:
        image = cv2.imread(str(path))
        if image is None:
            raise UserError(f"{path}: unreadable image; replace or remove it.")
        image = letterbox(image=image)[:, :, ::-1].transpose(2, 0, 1)  # BGR HWC -> RGB CHW
        images.append(torch.from_numpy(np.ascontiguousarray(image)).float() / 255)
    return torch.stack(images)
