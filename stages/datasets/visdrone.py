"""VisDrone2019-DET's raw format -> YOLO labels: one converter for the real data and the
synthetic scenes alike.

The converter maps VisDrone categories 1..10 to classes 0..9, drops 0 (ignored regions) and 11
(others), clips boxes to the image, drops boxes that are empty after clipping, and counts
everything it dropped or changed. For real data without a test split, val is divided by video
sequence (:func:`split_by_sequence`), so that no scene is in both val and test.
"""

from __future__ import annotations

import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image
from tqdm import tqdm

from stages.pipeline.cli import UserError
from stages.pipeline.images import image_files
from stages.pipeline.runtime import cpu_threads

# VisDrone DET categories 1..10, in order (0 = ignored region, 11 = others).
VISDRONE_CLASSES = (
    "pedestrian",
    "people",
    "bicycle",
    "car",
    "van",
    "truck",
    "tricycle",
    "awning-tricycle",
    "bus",
    "motor",
)
IGNORED_REGION, OTHERS = 0, 11
SPLITS = ("train", "val", "test")
SMALL, MEDIUM = 32**2, 96**2  # COCO area buckets, in pixels of the original image


class DatasetError(UserError):
    """Raw data the converter cannot use: the message names the file (and line) and the fix."""


@dataclass
class SplitStats:
    """What the converter kept, dropped and changed in one split."""

    images: int = 0
    boxes: Counter = field(default_factory=Counter)  # per class name
    sizes: Counter = field(default_factory=Counter)  # small / medium / large
    dropped: Counter = field(default_factory=Counter)  # ignored_region / others / degenerate
    clipped: int = 0

    def add(self, other: SplitStats) -> None:
        self.images += other.images
        self.boxes.update(other.boxes)
        self.sizes.update(other.sizes)
        self.dropped.update(other.dropped)
        self.clipped += other.clipped


def parse_line(line: str, where: str) -> tuple[int, int, int, int, int]:
    """One VisDrone annotation line -> (left, top, width, height, category).

    The format is ``left,top,width,height,score,category,truncation,occlusion``; some files end
    lines with a trailing comma.
    """
    fields = line.strip().rstrip(",").split(",")
    if len(fields) != 8:
        raise DatasetError(
            f"{where}: expected 8 comma-separated integers "
            f"(left,top,width,height,score,category,truncation,occlusion), got {len(fields)}: "
            f"{line.strip()!r}"
        )
    try:
        left, top, width, height, _score, category, _trunc, _occ = (int(f) for f in fields)
    except ValueError:
        raise DatasetError(f"{where}: non-integer field in {line.strip()!r}") from None
    if not 0 <= category <= 11:
        raise DatasetError(f"{where}: category {category} is not a VisDrone category (0..11)")
    if width <= 0 or height <= 0:
        raise DatasetError(
            f"{where}: box width and height must be positive, got {width} x {height} in "
            f"{line.strip()!r}"
        )
    return left, top, width, height, category


def convert_annotations(
    lines: list[str], width: int, height: int, source: str
) -> tuple[list[str], SplitStats]:
    """VisDrone annotation lines of one image -> YOLO label lines and what was kept/dropped."""
    stats = SplitStats(images=1)
    labels = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        left, top, w, h, category = parse_line(line, f"{source}:{number}")
        if category == 0:
            stats.dropped["ignored_region"] += 1
            continue
        if category == 11:
            stats.dropped["others"] += 1
            continue
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + w, width), min(top + h, height)
        if x1 - x0 < 1 or y1 - y0 < 1:
            stats.dropped["degenerate"] += 1
            continue
        if (x0, y0, x1, y1) != (left, top, left + w, top + h):
            stats.clipped += 1
        area = (x1 - x0) * (y1 - y0)
        stats.sizes["small" if area < SMALL else "medium" if area < MEDIUM else "large"] += 1
        stats.boxes[VISDRONE_CLASSES[category - 1]] += 1
        labels.append(
            f"{category - 1} {(x0 + x1) / 2 / width:.6f} {(y0 + y1) / 2 / height:.6f} "
            f"{(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}"
        )
    return labels, stats


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image after decoding it fully, or a DatasetError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except Exception as err:  # PIL raises many types for broken files
        raise DatasetError(f"{path}: unreadable image ({err}); replace or remove it.") from err


def split_by_sequence(images: list[Path]) -> dict[str, list[Path]]:
    """VisDrone val images -> disjoint ``val`` and ``test`` halves that share no video sequence.

    VisDrone-DET frames are named ``<sequence>_<frame>_...``; frames of one sequence show the same
    scene, so splitting frame by frame would leak it into both halves. The sequences, sorted, are
    dealt alternately: the 1st, 3rd, ... to val, the 2nd, 4th, ... to test.
    """
    sequences = sorted({p.stem.split("_")[0] for p in images})
    to_test = set(sequences[1::2])
    return {
        "val": [p for p in images if p.stem.split("_")[0] not in to_test],
        "test": [p for p in images if p.stem.split("_")[0] in to_test],
    }


def source_images(src: Path) -> list[Path]:
    """The images of a raw VisDrone split folder, which must hold images/ and annotations/."""
    for d in (src / "images", src / "annotations"):
        if not d.is_dir():
            raise DatasetError(f"{d} not found: a VisDrone split holds images/ and annotations/.")
    return image_files(src / "images")


def convert_split(
    src: Path,
    dst: Path,
    split: str,
    max_images: int = 0,
    images: list[Path] | None = None,
) -> SplitStats:
    """Convert ``src/{images,annotations}`` (all its images, or only ``images``) into
    ``dst/{images,labels}/<split>``; ``max_images`` keeps the first N by name."""
    image_dir, annotation_dir = src / "images", src / "annotations"
    images = source_images(src) if images is None else images
    if max_images:
        images = images[:max_images]
    if not images:
        raise DatasetError(f"{image_dir} holds no .jpg/.png images.")
    for image in images:  # fail before any work on a missing annotation
        if not (annotation_dir / f"{image.stem}.txt").exists():
            raise DatasetError(
                f"{image} has no annotation file {annotation_dir / (image.stem + '.txt')}."
            )
    (dst / "images" / split).mkdir(parents=True)
    (dst / "labels" / split).mkdir(parents=True)

    def one(image: Path) -> SplitStats:
        width, height = image_size(image)
        annotation = annotation_dir / f"{image.stem}.txt"
        labels, stats = convert_annotations(
            annotation.read_text().splitlines(), width, height, str(annotation)
        )
        shutil.copyfile(image, dst / "images" / split / image.name)
        text = "\n".join(labels) + "\n" if labels else ""
        (dst / "labels" / split / f"{image.stem}.txt").write_text(text)
        return stats

    total = SplitStats()
    with ThreadPoolExecutor(cpu_threads()) as pool:
        for stats in tqdm(pool.map(one, images), total=len(images), desc=f"convert {split}"):
            total.add(stats)
    return total


def write_data_yaml(dst: Path) -> None:
    """The ultralytics data yaml; paths are relative to its own folder, so the dataset can move."""
    data = {
        **{split: f"images/{split}" for split in SPLITS},
        "nc": len(VISDRONE_CLASSES),
        "names": dict(enumerate(VISDRONE_CLASSES)),
    }
    (dst / "dataset.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
