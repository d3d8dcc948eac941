"""Deterministic synthetic aerial scenes in the raw VisDrone2019-DET format.

The dataset stage's embedded source: top-down scenes of textured ground (grass, roads with lane
marks, a parking lot, roofs with small rooftop boxes as distractors, trees that occlude) with many
objects of the 10 VisDrone classes. Each class has its own shape, parts and colours; sizes follow
a per-image flight altitude so that most boxes are COCO-small, some medium and few large, as in
VisDrone. Objects at the border are truncated, trees and neighbours occlude, and some areas are
blurred crowds marked as ``ignored region`` (category 0); a few ``others`` (category 11) objects
appear too. Both are dropped by the converter, exactly as for the real data.

Every image draws from its own random generator seeded by (seed, split, index), so the dataset is
byte-identical for the same params and adding images never changes the existing ones.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from stages.datasets.visdrone import IGNORED_REGION, OTHERS, VISDRONE_CLASSES

# How often each class is drawn (VisDrone's order of frequency, flattened so rare classes
# still have enough examples to learn from a few hundred images).
CLASS_WEIGHTS = np.array([0.15, 0.10, 0.06, 0.27, 0.09, 0.06, 0.05, 0.05, 0.05, 0.12])
# Length x width in pixels of a 256-px image at altitude scale 1.
BASE_SIZE = {
    "pedestrian": (8, 8),
    "people": (10, 8),
    "bicycle": (17, 7),
    "car": (31, 16),
    "van": (37, 18),
    "truck": (60, 22),
    "tricycle": (21, 14),
    "awning-tricycle": (22, 15),
    "bus": (80, 25),
    "motor": (16, 8),
}
VEHICLES = {"bicycle", "car", "van", "truck", "tricycle", "awning-tricycle", "bus", "motor"}

CAR_COLOURS = [
    (235, 235, 235),
    (30, 30, 30),
    (170, 170, 175),
    (40, 40, 190),
    (160, 70, 30),
    (110, 110, 110),
    (50, 120, 40),
    (200, 200, 210),
]  # BGR
BUS_COLOURS = [(40, 200, 230), (60, 150, 50), (40, 40, 200), (230, 230, 230)]
CARGO_COLOURS = [(150, 150, 150), (170, 100, 40), (60, 120, 60), (40, 110, 220), (200, 200, 200)]


@dataclass(frozen=True)
class SceneSpec:
    """What one split's scenes look like (from params.yaml's dataset.synthetic)."""

    image_size: int
    objects_min: int
    objects_max: int


@dataclass
class _Placed:
    category: int  # VisDrone category id
    box: tuple[float, float, float, float]  # x0, y0, x1, y1, unclipped
    label: int  # id in the owner map
    truncation: float  # fraction of the box outside the image
    drawn_pixels: int  # pixels it covered when drawn, before anything was drawn over it


def _rotated(points: np.ndarray, cx: float, cy: float, angle: float) -> np.ndarray:
    """Object-local (u along length, v across) points -> image coordinates."""
    c, s = math.cos(angle), math.sin(angle)
    u, v = points[:, 0], points[:, 1]
    return np.stack([cx + u * c - v * s, cy + u * s + v * c], axis=1)


def _rect(u0: float, v0: float, u1: float, v1: float) -> np.ndarray:
    return np.array([[u0, v0], [u1, v0], [u1, v1], [u0, v1]], dtype=np.float64)


def _ellipse(a: float, b: float, du: float = 0.0, n: int = 12) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([du + a * np.cos(t), b * np.sin(t)], axis=1)


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], amount: int = 18) -> tuple:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


_DARK = (25, 25, 30)
_GLASS = (40, 45, 50)


def _random_colour(rng: np.random.Generator) -> tuple[int, ...]:
    return tuple(int(c) for c in rng.integers(30, 230, 3))


def _person(name: str, hl: float, hw: float, rng: np.random.Generator) -> list:
    """pedestrian: shoulders and a head seen from above; people: seated, legs stretched."""
    cloth = _random_colour(rng)
    if name == "pedestrian":
        return [(_ellipse(hl * 0.55, hw), cloth), (_ellipse(hl * 0.35, hw * 0.45), (30, 40, 60))]
    return [
        (_rect(-hl * 0.1, -hw * 0.35, hl, hw * 0.35), (60, 70, 110)),
        (_ellipse(hl * 0.45, hw, du=-hl * 0.4), cloth),
        (_ellipse(hl * 0.25, hw * 0.4, du=-hl * 0.45), (30, 40, 60)),
    ]


def _two_wheeler(name: str, hl: float, hw: float, rng: np.random.Generator) -> list:
    """bicycle: two thin wheels and a frame; motor: a dark body with a rider on it."""
    if name == "bicycle":
        return [
            (_ellipse(hw, hw * 0.35, du=-hl + hw), _DARK),
            (_ellipse(hw, hw * 0.35, du=hl - hw), _DARK),
            (_rect(-hl + hw, -0.6, hl - hw, 0.6), (40, 40, 150)),
        ]
    rider = _random_colour(rng)
    return [(_ellipse(hl, hw * 0.7), (35, 35, 45)), (_ellipse(hl * 0.35, hw, du=-hl * 0.1), rider)]


def _car_or_van(name: str, hl: float, hw: float, rng: np.random.Generator) -> list:
    body = _jitter(rng, CAR_COLOURS[rng.integers(len(CAR_COLOURS))])
    front = 0.55 if name == "car" else 0.75
    parts = [
        (_rect(-hl, -hw, hl, hw), body),
        (_rect(hl * front - hl * 0.22, -hw * 0.8, hl * front, hw * 0.8), _GLASS),
    ]
    if name == "car":
        parts.append((_rect(-hl * 0.75, -hw * 0.75, -hl * 0.6, hw * 0.75), _GLASS))
    else:
        parts.append((_rect(-hl * 0.8, -hw * 0.6, hl * 0.4, hw * 0.6), _jitter(rng, body, 12)))
    return parts


def _truck(_name: str, hl: float, hw: float, rng: np.random.Generator) -> list:
    """A cab, a gap, a long cargo box."""
    cab = _jitter(rng, CAR_COLOURS[rng.integers(len(CAR_COLOURS))])
    cargo = _jitter(rng, CARGO_COLOURS[rng.integers(len(CARGO_COLOURS))])
    return [
        (_rect(hl * 0.62, -hw * 0.85, hl, hw * 0.85), cab),
        (_rect(hl * 0.85, -hw * 0.7, hl * 0.97, hw * 0.7), _GLASS),
        (_rect(-hl, -hw, hl * 0.56, hw), cargo),
    ]


def _tricycle(name: str, hl: float, hw: float, rng: np.random.Generator) -> list:
    """A front wedge and a rear box; the awning kind has a striped canopy over the box."""
    body = _jitter(rng, [(60, 90, 150), (150, 90, 40), (60, 140, 60)][rng.integers(3)])
    parts = [
        (np.array([[hl, 0], [hl * 0.2, -hw * 0.6], [hl * 0.2, hw * 0.6]]), body),
        (_rect(-hl, -hw, hl * 0.2, hw), body),
    ]
    if name == "tricycle":
        return [*parts, (_rect(-hl * 0.8, -hw * 0.7, 0, hw * 0.7), _jitter(rng, body, 30))]
    stripe = _jitter(rng, [(40, 40, 200), (200, 120, 40), (40, 160, 220)][rng.integers(3)])
    stripes = 4
    for i in range(stripes):
        u0 = -hl + i * (hl * 1.2) / stripes
        colour = stripe if i % 2 == 0 else (235, 235, 235)
        parts.append((_rect(u0, -hw, u0 + hl * 1.2 / stripes, hw), colour))
    return parts


def _bus(_name: str, hl: float, hw: float, rng: np.random.Generator) -> list:
    """A long body, a row of windows along each side, roof units."""
    body = _jitter(rng, BUS_COLOURS[rng.integers(len(BUS_COLOURS))])
    parts = [(_rect(-hl, -hw, hl, hw), body)]
    for i in range(7):
        u0 = -hl * 0.9 + i * hl * 0.26
        parts.append((_rect(u0, -hw, u0 + hl * 0.18, -hw * 0.72), (50, 45, 40)))
        parts.append((_rect(u0, hw * 0.72, u0 + hl * 0.18, hw), (50, 45, 40)))
    parts.append((_rect(-hl * 0.2, -hw * 0.4, hl * 0.2, hw * 0.4), (200, 200, 200)))
    return parts


# Who draws each class (name, half length, half width, rng) -> [(polygon, colour), ...]
_DRAWERS = {
    "pedestrian": _person,
    "people": _person,
    "bicycle": _two_wheeler,
    "motor": _two_wheeler,
    "car": _car_or_van,
    "van": _car_or_van,
    "truck": _truck,
    "tricycle": _tricycle,
    "awning-tricycle": _tricycle,
    "bus": _bus,
}


def _parts(name: str, length: float, width: float, rng: np.random.Generator) -> list:
    """The polygons (object-local, centred) and colours that draw one object of a class."""
    if name not in _DRAWERS:
        raise ValueError(f"unknown class {name!r}")
    return _DRAWERS[name](name, length / 2, width / 2, rng)


def _noise_field(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Smooth noise in [0, 1] with features of about ``cell`` pixels."""
    small = rng.random((h // cell + 2, w // cell + 2)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def _ground(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list, list]:
    """Textured ground with roads, a parking lot and roofs; returns image, roads, lots."""
    h = w = size
    base = np.array(_jitter(rng, (60, 115, 70), 25), dtype=np.float32)  # grass / soil, BGR
    img = base * (0.75 + 0.5 * _noise_field(rng, h, w, max(8, size // 8)))[..., None]
    img += (_noise_field(rng, h, w, 3)[..., None] - 0.5) * 30
    roads = []
    for _ in range(rng.integers(1, 4)):
        angle = float(rng.choice([0.0, math.pi / 2, rng.uniform(0, math.pi)]))
        cx, cy = rng.uniform(0.15, 0.85, 2) * size
        half = rng.uniform(0.05, 0.1) * size
        d = np.array([math.cos(angle), math.sin(angle)]) * size * 1.5
        n = np.array([-math.sin(angle), math.cos(angle)]) * half
        c = np.array([cx, cy])
        poly = np.array([c - d - n, c + d - n, c + d + n, c - d + n])
        grey = float(rng.uniform(80, 125))
        cv2.fillConvexPoly(img, np.round(poly).astype(np.int32), (grey, grey, grey + 3))
        for t in np.arange(-1.5, 1.5, 0.06):  # dashed centre line
            p0 = c + d * t / 1.5
            p1 = p0 + d * 0.02
            cv2.line(
                img,
                tuple(np.round(p0).astype(int)),
                tuple(np.round(p1).astype(int)),
                (215, 215, 215),
                1,
                cv2.LINE_AA,
            )
        roads.append((cx, cy, angle, half))
    lots = []
    if rng.random() < 0.5:  # a parking lot with marked bays
        x0, y0 = rng.uniform(0, 0.6, 2) * size
        lw, lh = rng.uniform(0.25, 0.4, 2) * size
        cv2.rectangle(img, (int(x0), int(y0)), (int(x0 + lw), int(y0 + lh)), (100, 100, 104), -1)
        for x in np.arange(x0, x0 + lw, 0.06 * size):
            cv2.line(img, (int(x), int(y0)), (int(x), int(y0 + lh * 0.3)), (200, 200, 200), 1)
        lots.append((x0, y0, lw, lh))
    for _ in range(rng.integers(0, 4)):  # roofs, with small rooftop boxes as hard negatives
        x0, y0 = rng.uniform(0, 0.85, 2) * size
        rw, rh = rng.uniform(0.1, 0.3, 2) * size
        roof = _jitter(rng, [(60, 70, 150), (120, 120, 125), (150, 110, 70)][rng.integers(3)], 20)
        cv2.rectangle(img, (int(x0), int(y0)), (int(x0 + rw), int(y0 + rh)), roof, -1)
        cv2.rectangle(img, (int(x0), int(y0)), (int(x0 + rw), int(y0 + rh)), (45, 45, 45), 1)
        for _ in range(rng.integers(0, 3)):
            bx, by = x0 + rng.uniform(0.1, 0.8) * rw, y0 + rng.uniform(0.1, 0.8) * rh
            bw, bh = rng.uniform(3, 9, 2) * size / 256
            cv2.rectangle(
                img, (int(bx), int(by)), (int(bx + bw), int(by + bh)), (215, 215, 215), -1
            )
    return img, roads, lots


def _pose(rng: np.random.Generator, name: str, size: int, roads: list, lots: list) -> tuple:
    """Centre and heading of an object: vehicles mostly on roads or in the lot, people anywhere."""
    if name in VEHICLES and roads and rng.random() < 0.65:
        cx, cy, angle, half = roads[rng.integers(len(roads))]
        t = rng.uniform(-0.9, 0.9) * size
        off = rng.uniform(-0.8, 0.8) * half
        x = cx + t * math.cos(angle) - off * math.sin(angle)
        y = cy + t * math.sin(angle) + off * math.cos(angle)
        return x, y, angle + (math.pi if off < 0 else 0.0) + rng.normal(0, 0.05)
    if name in ("car", "van") and lots and rng.random() < 0.5:
        x0, y0, lw, lh = lots[rng.integers(len(lots))]
        return x0 + rng.uniform(0, lw), y0 + rng.uniform(0, lh), math.pi / 2 + rng.normal(0, 0.05)
    return (
        rng.uniform(-0.03, 1.03) * size,
        rng.uniform(-0.03, 1.03) * size,
        rng.uniform(0, 2 * math.pi),
    )


def _overlap(a: tuple, b: tuple) -> float:
    """Intersection over the smaller box's area."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(small, 1e-9)


def _ignored_regions(
    rng: np.random.Generator, img: np.ndarray
) -> tuple[list[tuple[int, int, int, int]], list[str]]:
    """Blurred crowds nobody could label, drawn into ``img``: their boxes and annotation lines."""
    size = img.shape[0]
    ignored, lines = [], []
    for _ in range(rng.binomial(2, 0.2)):
        rw, rh = rng.uniform(0.08, 0.2, 2) * size
        x0, y0 = rng.uniform(0, size - rw), rng.uniform(0, size - rh)
        x0i, y0i, x1i, y1i = int(x0), int(y0), int(x0 + rw), int(y0 + rh)
        for _ in range(int(rw * rh / 12)):
            px, py = rng.uniform(x0, x0 + rw), rng.uniform(y0, y0 + rh)
            cv2.circle(
                img, (int(px), int(py)), 1, tuple(float(c) for c in rng.integers(30, 230, 3)), -1
            )
        img[y0i:y1i, x0i:x1i] = cv2.GaussianBlur(img[y0i:y1i, x0i:x1i], (0, 0), 1.5)
        ignored.append((x0i, y0i, x1i, y1i))
        lines.append(f"{x0i},{y0i},{x1i - x0i},{y1i - y0i},0,{IGNORED_REGION},0,0")
    return ignored, lines


def _object_parts(
    rng: np.random.Generator, others: bool, name: str, length: float, width: float
) -> list:
    """The polygons (and colours) an object is drawn from; ``others`` is a handcart-like thing
    that is not one of the 10 classes."""
    if others:
        return [
            (_rect(-length / 3, -width / 2, length / 3, width / 2), (40, 80, 120)),
            (np.array([[-length / 3, -width / 2], [length / 3, width / 2]]), (20, 20, 20)),
        ]
    return _parts(name, length, width, rng)


def _draw_object(
    img: np.ndarray,
    owner: np.ndarray,
    parts: list,
    pose: tuple,
    shadow: np.ndarray | None,
    label: int,
) -> None:
    """Draw ``parts`` at ``pose`` (cx, cy, angle) over a soft ``shadow`` polygon (if any), and
    mark the pixels ``label`` owns."""
    if shadow is not None:
        cv2.fillConvexPoly(img, np.round(shadow).astype(np.int32), (35, 40, 40), cv2.LINE_AA)
    for poly, colour in parts:
        p = np.round(_rotated(poly, *pose)).astype(np.int32)
        if len(poly) == 2:
            cv2.line(img, tuple(p[0]), tuple(p[1]), colour, 1, cv2.LINE_AA)
        else:
            cv2.fillPoly(img, [p], colour, cv2.LINE_AA)
            cv2.fillPoly(owner, [p], label)


def _place_objects(
    rng: np.random.Generator,
    img: np.ndarray,
    owner: np.ndarray,
    spec: SceneSpec,
    scene: tuple,
    ignored: list,
) -> list[_Placed]:
    """Draw the labelled objects by rejection sampling (some poses collide or fall outside);
    ``scene`` is (roads, lots, altitude, sun)."""
    size = spec.image_size
    roads, lots, altitude, sun = scene
    placed: list[_Placed] = []
    n_objects = int(rng.integers(spec.objects_min, spec.objects_max + 1))
    for _ in range(n_objects * 3):
        if len(placed) == n_objects:
            break
        others = rng.random() < 0.01
        name = (
            "car"
            if others
            else VISDRONE_CLASSES[rng.choice(10, p=CLASS_WEIGHTS / CLASS_WEIGHTS.sum())]
        )
        base_l, base_w = BASE_SIZE[name]
        scale = altitude * rng.uniform(0.85, 1.2)
        length, width = base_l * scale, base_w * scale
        cx, cy, angle = _pose(rng, name, size, roads, lots)
        parts = _object_parts(rng, others, name, length, width)
        pts = np.concatenate([_rotated(p, cx, cy, angle) for p, _ in parts])
        box = (pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max() + 1, pts[:, 1].max() + 1)
        bw, bh = box[2] - box[0], box[3] - box[1]
        inside_w = min(box[2], size) - max(box[0], 0)
        inside_h = min(box[3], size) - max(box[1], 0)
        truncation = 1 - max(inside_w, 0) * max(inside_h, 0) / (bw * bh)
        if truncation > 0.5:  # VisDrone leaves objects that are mostly outside unlabelled
            continue
        if any(_overlap(box, p.box) > 0.35 for p in placed) or any(
            _overlap(box, r) > 0 for r in ignored
        ):
            continue
        label = len(placed) + 1
        shadow = None
        if name in VEHICLES or others:  # soft shadow away from the sun
            shift = np.array([math.cos(sun), math.sin(sun)]) * width * 0.25
            body = _rect(-length / 2, -width / 2, length / 2, width / 2)
            shadow = _rotated(body, cx, cy, angle) + shift
        _draw_object(img, owner, parts, (cx, cy, angle), shadow, label)
        x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
        drawn = int((owner[y0 : int(box[3]) + 1, x0 : int(box[2]) + 1] == label).sum())
        category = OTHERS if others else VISDRONE_CLASSES.index(name) + 1
        placed.append(_Placed(category, box, label, truncation, max(drawn, 1)))
    return placed


def _trees(rng: np.random.Generator, img: np.ndarray, owner: np.ndarray) -> None:
    """Trees occlude whatever is under them."""
    size = img.shape[0]
    for _ in range(rng.integers(0, 5)):
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.02, 0.06) * size
        cv2.circle(img, (int(cx), int(cy)), int(r), _jitter(rng, (40, 85, 35), 12), -1, cv2.LINE_AA)
        cv2.circle(owner, (int(cx), int(cy)), int(r), -1, -1)


def _object_lines(placed: list[_Placed], owner: np.ndarray) -> list[str]:
    """VisDrone annotation lines of the placed objects, with truncation and occlusion levels
    measured on the pixels each still owns."""
    visible = np.bincount(owner[owner > 0].ravel(), minlength=len(placed) + 1)
    lines = []
    for p in placed:
        hidden = 1 - visible[p.label] / p.drawn_pixels
        occlusion = 0 if hidden < 0.01 else (1 if hidden <= 0.5 else 2)  # VisDrone's levels
        truncated = 1 if p.truncation > 0.01 else 0
        x, y = round(p.box[0]), round(p.box[1])
        w, h = round(p.box[2] - p.box[0]), round(p.box[3] - p.box[1])
        lines.append(f"{x},{y},{w},{h},1,{p.category},{truncated},{occlusion}")
    return lines


def render_scene(rng: np.random.Generator, spec: SceneSpec) -> tuple[np.ndarray, list[str]]:
    """One image (BGR uint8) and its VisDrone annotation lines."""
    size = spec.image_size
    img, roads, lots = _ground(rng, size)
    owner = np.zeros((size, size), np.int32)  # which drawn thing is on top at each pixel
    sun = rng.uniform(0, 2 * math.pi)
    altitude = float(np.clip(np.exp(rng.normal(0.3, 0.4)), 0.5, 2.8)) * size / 256
    ignored, lines = _ignored_regions(rng, img)
    placed = _place_objects(rng, img, owner, spec, (roads, lots, altitude, sun), ignored)
    _trees(rng, img, owner)
    lines += _object_lines(placed, owner)
    # camera: exposure, slight defocus and sensor noise
    img = img * rng.uniform(0.8, 1.15) + rng.uniform(-15, 15)
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 0.8))
    img += rng.normal(0, rng.uniform(2, 6), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), lines


def write_split(
    root: Path, split: str, n_images: int, seed: int, spec: SceneSpec, threads: int = 1
) -> Path:
    """Write ``root/VisDrone2019-DET-<split>/{images,annotations}``; returns that folder."""
    split_dir = root / f"VisDrone2019-DET-{split}"
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    (split_dir / "annotations").mkdir(parents=True, exist_ok=True)
    split_id = {"train": 1, "val": 2, "test": 3}[split]

    def one(index: int) -> None:
        rng = np.random.default_rng([seed, split_id, index])
        image, lines = render_scene(rng, spec)
        name = f"{split}_{index:05d}"
        ok, jpg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            raise RuntimeError(f"could not encode synthetic image {name}")
        (split_dir / "images" / f"{name}.jpg").write_bytes(jpg.tobytes())
        (split_dir / "annotations" / f"{name}.txt").write_text("\n".join(lines) + "\n")

    # Each image has its own generator, so rendering in threads changes nothing in the output.
    with ThreadPoolExecutor(threads) as pool:
        list(tqdm(pool.map(one, range(n_images)), total=n_images, desc=f"render {split}"))
    return split_dir
