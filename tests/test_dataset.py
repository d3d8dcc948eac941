"""The VisDrone converter, against the real sample's published counts and hand-made cases."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from stages.dataset import visdrone_splits
from stages.datasets.visdrone import (
    DatasetError,
    convert_annotations,
    convert_split,
    parse_line,
    split_by_sequence,
)
from stages.pipeline.images import image_files

# From ../shared/visdrone-sample/README.md: annotation lines per category in the 137 images.
SAMPLE_PER_CATEGORY = {
    0: 388,
    1: 2385,
    2: 1414,
    3: 357,
    4: 3632,
    5: 439,
    6: 207,
    7: 227,
    8: 164,
    9: 67,
    10: 1230,
    11: 8,
}
NAMES = (
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


def test_real_sample_counts(visdrone_sample: Path, tmp_path: Path) -> None:
    stats = convert_split(visdrone_sample, tmp_path, "val")
    assert stats.images == 137
    assert sum(stats.boxes.values()) == 10_122
    assert stats.dropped == {"ignored_region": 388, "others": 8}
    assert {NAMES.index(k) + 1: v for k, v in stats.boxes.items()} == {
        c: n for c, n in SAMPLE_PER_CATEGORY.items() if 1 <= c <= 10
    }
    assert sum(stats.sizes.values()) == 10_122
    labels = sorted((tmp_path / "labels" / "val").glob("*.txt"))
    images = sorted((tmp_path / "images" / "val").glob("*.jpg"))
    assert len(labels) == len(images) == 137
    assert sum(len(p.read_text().splitlines()) for p in labels) == 10_122


def test_real_sample_boxes_match_hand_conversion(visdrone_sample: Path, tmp_path: Path) -> None:
    """Every kept box equals an independent conversion of its raw line with the manifest's size."""
    with open(visdrone_sample / "manifest.csv") as f:
        sizes = {row["name"]: (int(row["width"]), int(row["height"])) for row in csv.DictReader(f)}
    convert_split(visdrone_sample, tmp_path, "val")
    checked = 0
    for name, (w, h) in list(sizes.items())[:20]:
        expected = []
        for line in (visdrone_sample / "annotations" / f"{name}.txt").read_text().splitlines():
            x, y, bw, bh, _, cat, _, _ = (int(v) for v in line.strip().rstrip(",").split(","))
            if 1 <= cat <= 10:
                x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)
                expected.append(
                    (cat - 1, (x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h)
                )
        got = [
            tuple(float(v) for v in row.split())
            for row in (tmp_path / "labels" / "val" / f"{name}.txt").read_text().splitlines()
        ]
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            assert int(g[0]) == e[0]
            assert g[1:] == pytest.approx(e[1:], abs=1e-6)
        checked += len(got)
    assert checked > 1000


def test_clipping_and_degenerate_boxes() -> None:
    lines = [
        "-10,-20,30,40,1,4,1,0",  # car sticking out of the top-left corner: clipped
        "90,90,20,20,1,1,1,0",  # pedestrian past the bottom-right corner: clipped
        "100,50,10,10,1,4,0,0,",  # starts at the right edge (and a trailing comma): degenerate
        "5,5,10,10,0,0,0,0",  # ignored region
        "5,5,10,10,1,11,0,0",  # others
        "",
    ]
    labels, stats = convert_annotations(lines, width=100, height=100, source="a.txt")
    assert labels == [
        "3 0.100000 0.100000 0.200000 0.200000",
        "0 0.950000 0.950000 0.100000 0.100000",
    ]
    assert stats.clipped == 2
    assert stats.dropped == {"degenerate": 1, "ignored_region": 1, "others": 1}
    assert stats.sizes == {"small": 2}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1,2,3,4,1,4,0", "expected 8 comma-separated integers"),
        ("1,2,3,4,1,4,0,0,9", "got 9"),
        ("1,2,x,4,1,4,0,0", "non-integer"),
        ("1,2,3,4,1,12,0,0", "category 12"),
        ("10,10,0,5,1,4,0,0", "width and height must be positive, got 0 x 5"),
        ("10,10,-4,5,1,4,0,0", "got -4 x 5"),
        ("10,10,4,-1,0,0,0,0", "got 4 x -1"),  # an ignored region too
    ],
)
def test_malformed_line_names_file_and_line(line: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message) as err:
        convert_annotations(["1,1,2,2,1,4,0,0", line], 100, 100, source="ann/x.txt")
    assert str(err.value).startswith("ann/x.txt:2:")
    with pytest.raises(DatasetError):
        parse_line(line, "here")


def _tiny_split(root: Path, n: int = 2) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i in range(n):
        Image.new("RGB", (64, 48), (i * 40, 80, 120)).save(root / "images" / f"im{i}.jpg")
        (root / "annotations" / f"im{i}.txt").write_text("1,1,10,10,1,4,0,0\n")
    return root


def test_image_without_annotation_fails_naming_it(tmp_path: Path) -> None:
    src = _tiny_split(tmp_path / "src")
    (src / "annotations" / "im1.txt").unlink()
    with pytest.raises(DatasetError, match=r"im1\.jpg has no annotation file"):
        convert_split(src, tmp_path / "out", "train")


def test_unreadable_image_fails_naming_it(tmp_path: Path) -> None:
    src = _tiny_split(tmp_path / "src")
    (src / "images" / "im0.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DatasetError, match=r"im0\.jpg: unreadable image"):
        convert_split(src, tmp_path / "out", "train")


def test_truncated_jpeg_is_unreadable(tmp_path: Path) -> None:
    src = _tiny_split(tmp_path / "src")
    image = src / "images" / "im1.jpg"
    image.write_bytes(image.read_bytes()[:200])
    with pytest.raises(DatasetError, match=r"im1\.jpg: unreadable image"):
        convert_split(src, tmp_path / "out", "train")


def test_missing_split_folder_says_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="images/ and annotations/"):
        convert_split(tmp_path / "nowhere", tmp_path / "out", "val")


def test_val_is_split_by_video_sequence_into_val_and_test(visdrone_sample: Path) -> None:
    """No scene in both halves; every image in exactly one; sequences dealt alternately."""
    images = image_files(visdrone_sample / "images")
    halves = split_by_sequence(images)
    sequence = {split: {p.name.split("_")[0] for p in part} for split, part in halves.items()}
    assert not sequence["val"] & sequence["test"]
    assert sorted(halves["val"] + halves["test"]) == images
    ordered = sorted(sequence["val"] | sequence["test"])
    assert sorted(sequence["val"]) == ordered[0::2] and sorted(sequence["test"]) == ordered[1::2]
    assert len(halves["val"]) > 30 and len(halves["test"]) > 30


def _visdrone_section(root: Path, test_dir: str) -> dict:
    return {
        "root": str(root),
        "train_dir": "train",
        "val_dir": "val",
        "test_dir": test_dir,
        "max_images": 0,
    }


def test_test_dev_is_used_when_present_and_a_single_sequence_is_refused(tmp_path: Path) -> None:
    for split in ("train", "val", "test-dev"):
        _tiny_split(tmp_path / split)
    splits = visdrone_splits(_visdrone_section(tmp_path, "test-dev"))
    assert splits["test"] == (tmp_path / "test-dev", 0, None)
    assert splits["val"] == (tmp_path / "val", 0, None)
    # Without test-dev, val (here: one sequence, "im0"/"im1" are two) is divided.
    splits = visdrone_splits(_visdrone_section(tmp_path, "absent"))
    assert [p.name for p in splits["val"][2]] == ["im0.jpg"]
    assert [p.name for p in splits["test"][2]] == ["im1.jpg"]
    (tmp_path / "val" / "images" / "im1.jpg").unlink()
    with pytest.raises(DatasetError, match="single video sequence"):
        visdrone_splits(_visdrone_section(tmp_path, "absent"))
