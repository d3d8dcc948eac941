"""Stage `dataset`: a raw VisDrone2019-DET tree -> a YOLO-format dataset, its data yaml and stats.

Three splits: train fits, val decides (per-epoch validation, the sparsity schedule, any choice
made from a sweep), test reports (every number of the evaluate stage). For `visdrone`, test is
VisDrone2019-DET-test-dev when it is on disk; otherwise the val folder is divided by video
sequence (see :func:`split_by_sequence`), so that no scene is in both val and test.

Two sources, one converter: `synthetic` renders a deterministic raw VisDrone tree first (see
stages/synthetic.py), `visdrone` reads a real one. The converter maps VisDrone categories 1..10 to
classes 0..9, drops 0 (ignored regions) and 11 (others), clips boxes to the image, drops boxes
that are empty after clipping, and counts everything it dropped or changed.

Reads: params `seed` and `dataset`; for `visdrone`, the raw tree under `dataset.visdrone.root`.
Writes: data/yolo/ (images/, labels/, dataset.yaml), reports/dataset/{stats.json, classes.csv,
classes.png}.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image
from tqdm import tqdm

from stages.common import cli
from stages.common import params as P
from stages.common.images import image_files
from stages.common.outputs import (
    atomic_path,
    print_summary,
    save_figure,
    write_csv,
    write_json,
    written,
)
from stages.common.runtime import PROJECT_ROOT, cpu_threads
from stages.synthetic import VISDRONE_CLASSES, SceneSpec, write_split

DATA_DIR = PROJECT_ROOT / "data" / "yolo"
REPORT_DIR = PROJECT_ROOT / "reports" / "dataset"
SPLITS = ("train", "val", "test")
SMALL, MEDIUM = 32**2, 96**2  # COCO area buckets, in pixels of the original image

SCHEMA = {
    "seed": P.Int(0),
    "dataset": P.Section(
        {
            "source": P.Choice("synthetic", "visdrone"),
            "synthetic": P.Section(
                {
                    "train_images": P.Int(1),
                    "val_images": P.Int(1),
                    "test_images": P.Int(1),
                    "image_size": P.Int(64, 4096),
                    "objects_min": P.Int(1, 500),
                    "objects_max": P.Int(1, 500),
                }
            ),
            "visdrone": P.Section(
                {
                    "root": P.Str(),
                    "train_dir": P.Str(),
                    "val_dir": P.Str(),
                    "test_dir": P.Str(),
                    "max_images": P.Int(0),
                }
            ),
        }
    ),
}


class DatasetError(cli.UserError):
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


RawSplit = tuple[Path, int, "list[Path] | None"]  # folder, max_images, its images (None: all)


def raw_splits(params: dict, workdir: Path) -> dict[str, RawSplit]:
    """Where each split's raw VisDrone tree is (rendering it first for `synthetic`)."""
    cfg = params["dataset"]
    if cfg["source"] == "synthetic":
        syn = cfg["synthetic"]
        if syn["objects_min"] > syn["objects_max"]:
            raise P.ParamsError(
                f"params.yaml: dataset.synthetic.objects_min = {syn['objects_min']} is larger "
                f"than dataset.synthetic.objects_max = {syn['objects_max']}."
            )
        spec = SceneSpec(syn["image_size"], syn["objects_min"], syn["objects_max"])
        return {
            split: (
                write_split(
                    workdir, split, syn[f"{split}_images"], params["seed"], spec, cpu_threads()
                ),
                0,
                None,
            )
            for split in SPLITS
        }
    vis = cfg["visdrone"]
    root = (PROJECT_ROOT / vis["root"]).resolve()
    found = {split: root / vis[f"{split}_dir"] for split in ("train", "val")}
    missing = [str(p) for p in found.values() if not p.is_dir()]
    if missing:
        raise DatasetError(
            f"VisDrone data not found: {', '.join(missing)}. Download VisDrone2019-DET train and "
            f"val from the VisDrone project and unpack them under {root} so that "
            f"{root}/{vis['train_dir']}/images and .../annotations exist (or set "
            f"dataset.visdrone.root / train_dir / val_dir in params.yaml)."
        )
    limit = vis["max_images"]
    test_dir = root / vis["test_dir"]
    if test_dir.is_dir():
        return {**{s: (p, limit, None) for s, p in found.items()}, "test": (test_dir, limit, None)}
    halves = split_by_sequence(source_images(found["val"]))
    if not halves["val"] or not halves["test"]:
        raise DatasetError(
            f"{test_dir} not found, and {found['val']} holds a single video sequence, which "
            f"cannot be divided into val and test: unpack VisDrone2019-DET-test-dev there (or "
            f"set dataset.visdrone.test_dir)."
        )
    return {
        "train": (found["train"], limit, None),
        **{s: (found["val"], limit, images) for s, images in halves.items()},
    }


def plot_stats(per_split: dict[str, SplitStats], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(per_split)
    for i, (split, stats) in enumerate(per_split.items()):
        offset = (i - (len(per_split) - 1) / 2) * width
        xs = [j + offset for j in range(len(VISDRONE_CLASSES))]
        ax1.bar(xs, [stats.boxes[c] for c in VISDRONE_CLASSES], width, label=split)
        ax2.bar(
            [j + offset for j in range(3)],
            [stats.sizes[s] for s in ("small", "medium", "large")],
            width,
            label=split,
        )
    ax1.set_xticks(range(len(VISDRONE_CLASSES)), VISDRONE_CLASSES, rotation=30, ha="right")
    ax1.set_ylabel("boxes")
    ax1.set_title("boxes per class")
    ax1.legend()
    ax2.set_xticks(range(3), ["small", "medium", "large"])
    ax2.set_title("boxes per COCO size bucket")
    save_figure(fig, path)


def main() -> None:
    params = P.load(SCHEMA)
    per_split: dict[str, SplitStats] = {}
    with tempfile.TemporaryDirectory(prefix="raw-") as workdir, atomic_path(DATA_DIR) as dst:
        for split, (src, limit, images) in raw_splits(params, Path(workdir)).items():
            per_split[split] = convert_split(src, dst, split, limit, images)
        write_data_yaml(dst)

    metrics = {}
    for split, s in per_split.items():
        metrics[split] = {
            "images": s.images,
            "boxes": sum(s.boxes.values()),
            "boxes_per_image": round(sum(s.boxes.values()) / s.images, 2),
            **{f"size_{k}": s.sizes[k] for k in ("small", "medium", "large")},
            "clipped": s.clipped,
            **{f"dropped_{k}": s.dropped[k] for k in ("ignored_region", "others", "degenerate")},
            "per_class": {c: s.boxes[c] for c in VISDRONE_CLASSES},
        }
    write_json(REPORT_DIR / "stats.json", {"source": params["dataset"]["source"], **metrics})
    write_csv(
        REPORT_DIR / "classes.csv",
        [{"class": c, **{s: per_split[s].boxes[c] for s in SPLITS}} for c in VISDRONE_CLASSES],
    )
    plot_stats(per_split, REPORT_DIR / "classes.png")
    print_summary(
        f"dataset ({params['dataset']['source']})",
        [(f"{s} images / boxes", f"{m['images']} / {m['boxes']}") for s, m in metrics.items()]
        + [
            (
                "test small/medium/large",
                "{size_small}/{size_medium}/{size_large}".format(**metrics["test"]),
            ),
            ("dropped (all splits)", dict(sum((s.dropped for s in per_split.values()), Counter()))),
            ("clipped boxes", sum(s.clipped for s in per_split.values())),
            written(DATA_DIR, REPORT_DIR),
        ],
    )


if __name__ == "__main__":
    cli.run(main, __doc__)
