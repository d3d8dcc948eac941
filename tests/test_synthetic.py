"""The synthetic generator: deterministic, VisDrone-formatted, and shaped like aerial data."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np

from stages.datasets.synthetic import SceneSpec, render_scene, write_split
from stages.datasets.visdrone import SMALL, parse_line

SPEC = SceneSpec(image_size=128, objects_min=8, objects_max=16)


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    a = write_split(tmp_path / "a", "train", 6, seed=3, spec=SPEC, threads=2)
    b = write_split(tmp_path / "b", "train", 6, seed=3, spec=SPEC, threads=1)
    assert _digest(a) == _digest(b)
    assert len(_digest(a)) == 12


def test_other_seed_or_split_gives_other_images(tmp_path: Path) -> None:
    a = _digest(write_split(tmp_path / "a", "train", 3, seed=3, spec=SPEC))
    b = _digest(write_split(tmp_path / "b", "train", 3, seed=4, spec=SPEC))
    assert all(a[k] != b[k] for k in a)
    img_a, _ = render_scene(np.random.default_rng([3, 1, 0]), SPEC)
    img_v, _ = render_scene(np.random.default_rng([3, 2, 0]), SPEC)
    assert not np.array_equal(img_a, img_v)


def test_adding_images_keeps_existing_ones(tmp_path: Path) -> None:
    few = _digest(write_split(tmp_path / "few", "val", 2, seed=0, spec=SPEC))
    more = _digest(write_split(tmp_path / "more", "val", 4, seed=0, spec=SPEC))
    assert all(more[k] == v for k, v in few.items())


def test_annotations_look_like_visdrone() -> None:
    """Valid lines; all 10 classes, ignored regions and truncation occur; most boxes are small."""
    spec = SceneSpec(image_size=256, objects_min=20, objects_max=45)
    categories, sizes, truncated, occluded = Counter(), Counter(), 0, 0
    for i in range(60):
        image, lines = render_scene(np.random.default_rng([0, 1, i]), spec)
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        for n, line in enumerate(lines):
            _, _, w, h, cat = parse_line(line, f"scene {i}:{n}")
            fields = [int(v) for v in line.split(",")]
            categories[cat] += 1
            truncated += fields[6]
            occluded += fields[7] > 0
            if 1 <= cat <= 10:
                assert w > 0 and h > 0
                sizes["small" if w * h < SMALL else "other"] += 1
    assert set(range(1, 11)) <= set(categories)
    assert categories[0] > 0  # ignored regions
    assert truncated > 0 and occluded > 0
    objects = sum(categories[c] for c in range(1, 11))
    assert 20 <= objects / 60 <= 45
    assert 0.6 < sizes["small"] / objects < 0.95
