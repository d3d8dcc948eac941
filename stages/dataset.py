"""Stage `dataset`: a raw VisDrone2019-DET tree -> a YOLO-format dataset, its data yaml and stats.

Three splits: train fits, val decides (per-epoch validation, the sparsity schedule, any choice
made from a sweep), test reports (every number of the evaluate stage). For `visdrone`, test is
VisDrone2019-DET-test-dev when it is on disk; otherwise the val folder is divided by video
sequence, so that no scene is in both val and test.

Two sources, one converter (stages/datasets/visdrone.py): `synthetic` renders a deterministic
raw VisDrone tree first (stages/datasets/synthetic.py), `visdrone` reads a real one.

Reads: params `seed` and `dataset`; for `visdrone`, the raw tree under `dataset.visdrone.root`
(data/raw, the stage's declared dep, by default: DVC then re-runs it when the tree changes).
Writes: data/yolo/ (images/, labels/, dataset.yaml), reports/dataset/{stats.json, classes.csv,
classes.png}.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from stages.datasets.synthetic import SceneSpec, write_split
from stages.datasets.visdrone import (
    SPLITS,
    VISDRONE_CLASSES,
    DatasetError,
    SplitStats,
    convert_split,
    source_images,
    split_by_sequence,
    write_data_yaml,
)
from stages.pipeline import cli
from stages.pipeline.outputs import (
    atomic_path,
    print_summary,
    save_figure,
    write_csv,
    write_json,
    written,
)
from stages.pipeline.params import Choice, Int, ParamsError, Section, Str, load
from stages.pipeline.runtime import PROJECT_ROOT, cpu_threads

DATA_DIR = PROJECT_ROOT / "data" / "yolo"
RAW_DIR = PROJECT_ROOT / "data" / "raw"  # a declared dep: DVC sees raw data under it change
REPORT_DIR = PROJECT_ROOT / "reports" / "dataset"

SCHEMA = {
    "seed": Int(0),
    "dataset": Section(
        {
            "source": Choice("synthetic", "visdrone"),
            "synthetic": Section(
                {
                    "train_images": Int(1),
                    "val_images": Int(1),
                    "test_images": Int(1),
                    "image_size": Int(64, 4096),
                    "objects_min": Int(1, 500),
                    "objects_max": Int(1, 500),
                }
            ),
            "visdrone": Section(
                {
                    "root": Str(),
                    "train_dir": Str(),
                    "val_dir": Str(),
                    "test_dir": Str(),
                    "max_images": Int(0),
                }
            ),
        }
    ),
}

UNSEEN_ROOT = (
    "dataset.visdrone.root is outside data/raw: DVC cannot see the raw tree change there; after "
    "changing it, run `dvc repro -f dataset` (or move or link the tree under data/raw)"
)

RawSplit = tuple[Path, int, "list[Path] | None"]  # folder, max_images, its images (None: all)


def synthetic_splits(section: dict, seed: int, workdir: Path) -> dict[str, RawSplit]:
    """Render each split's raw VisDrone tree into ``workdir``."""
    if section["objects_min"] > section["objects_max"]:
        raise ParamsError(
            f"params.yaml: dataset.synthetic.objects_min = {section['objects_min']} is larger "
            f"than dataset.synthetic.objects_max = {section['objects_max']}."
        )
    spec = SceneSpec(section["image_size"], section["objects_min"], section["objects_max"])
    return {
        split: (
            write_split(workdir, split, section[f"{split}_images"], seed, spec, cpu_threads()),
            0,
            None,
        )
        for split in SPLITS
    }


def visdrone_splits(section: dict) -> dict[str, RawSplit]:
    """Where each split of a real VisDrone tree is; val is halved by sequence without test."""
    root = (PROJECT_ROOT / section["root"]).resolve()
    found = {split: root / section[f"{split}_dir"] for split in ("train", "val")}
    missing = [str(p) for p in found.values() if not p.is_dir()]
    if missing:
        raise DatasetError(
            f"VisDrone data not found: {', '.join(missing)}. Download VisDrone2019-DET train and "
            f"val from the VisDrone project and unpack them under {root} so that "
            f"{root}/{section['train_dir']}/images and .../annotations exist (or set "
            f"dataset.visdrone.root / train_dir / val_dir in params.yaml)."
        )
    limit = section["max_images"]
    test_dir = root / section["test_dir"]
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


def split_metrics(stats: SplitStats) -> dict:
    """One split's entry of stats.json."""
    boxes = sum(stats.boxes.values())
    return {
        "images": stats.images,
        "boxes": boxes,
        "boxes_per_image": round(boxes / stats.images, 2),
        **{f"size_{k}": stats.sizes[k] for k in ("small", "medium", "large")},
        "clipped": stats.clipped,
        **{f"dropped_{k}": stats.dropped[k] for k in ("ignored_region", "others", "degenerate")},
        "per_class": {c: stats.boxes[c] for c in VISDRONE_CLASSES},
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
    params = load(SCHEMA)
    section = params["dataset"]
    per_split: dict[str, SplitStats] = {}
    with tempfile.TemporaryDirectory(prefix="raw-") as workdir, atomic_path(DATA_DIR) as dst:
        if section["source"] == "synthetic":
            raw = synthetic_splits(section["synthetic"], params["seed"], Path(workdir))
        else:
            raw = visdrone_splits(section["visdrone"])
        for split, (src, limit, images) in raw.items():
            per_split[split] = convert_split(src, dst, split, limit, images)
        write_data_yaml(dst)

    metrics = {split: split_metrics(stats) for split, stats in per_split.items()}
    unseen = section["source"] == "visdrone" and not (
        (PROJECT_ROOT / section["visdrone"]["root"]).resolve().is_relative_to(RAW_DIR.resolve())
    )
    write_json(REPORT_DIR / "stats.json", {"source": section["source"], **metrics})
    write_csv(
        REPORT_DIR / "classes.csv",
        [{"class": c, **{s: per_split[s].boxes[c] for s in SPLITS}} for c in VISDRONE_CLASSES],
    )
    plot_stats(per_split, REPORT_DIR / "classes.png")
    print_summary(
        f"dataset ({section['source']})",
        [(f"{s} images / boxes", f"{m['images']} / {m['boxes']}") for s, m in metrics.items()]
        + [
            (
                "test small/medium/large",
                "{size_small}/{size_medium}/{size_large}".format(**metrics["test"]),
            ),
            ("dropped (all splits)", dict(sum((s.dropped for s in per_split.values()), Counter()))),
            ("clipped boxes", sum(s.clipped for s in per_split.values())),
            *([("NOTE", UNSEEN_ROOT)] if unseen else []),
            written(DATA_DIR, REPORT_DIR),
        ],
    )


if __name__ == "__main__":
    cli.run(main, __doc__)
