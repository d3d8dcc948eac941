"""How far one model's detections are from another's: the check of a quantized or exported
model against its float reference."""

from __future__ import annotations

import numpy as np
import torch
from ultralytics.utils.nms import non_max_suppression


def detections(raw: np.ndarray, conf: float = 0.25) -> list[np.ndarray]:
    """Per image, detections after ultralytics' NMS: rows of x1, y1, x2, y2, score, class."""
    kept = non_max_suppression(torch.from_numpy(raw), conf_thres=conf, iou_thres=0.7)
    return [k[:, :6].numpy() for k in kept]


def divergence(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """How far ``other``'s raw outputs are from ``reference``'s: detection agreement (see
    :func:`agreement`) and the largest differences of class scores and of box coordinates."""
    return {
        **agreement(detections(reference), detections(other)),
        "max_abs_score_diff": round(float(np.abs(other[:, 4:] - reference[:, 4:]).max()), 4),
        "max_abs_box_diff_px": round(float(np.abs(other[:, :4] - reference[:, :4]).max()), 2),
    }


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (n x 4, x1 y1 x2 y2) with every box of ``b`` (m x 4)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(axis=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def matched(reference: np.ndarray, other: np.ndarray, iou: float = 0.5) -> int:
    """How many detections of ``other`` match one of ``reference`` (same class, IoU >= iou), each
    used once; pairs are taken greedily from the highest IoU down."""
    if not len(reference) or not len(other):
        return 0
    overlap = _iou(reference[:, :4], other[:, :4])
    overlap[reference[:, 5][:, None] != other[:, 5][None, :]] = 0
    pairs = 0
    while True:
        r, o = np.unravel_index(np.argmax(overlap), overlap.shape)
        if overlap[r, o] < iou:
            return pairs
        pairs += 1
        overlap[r, :] = 0
        overlap[:, o] = 0


def agreement(reference: list[np.ndarray], other: list[np.ndarray]) -> dict[str, float]:
    """How well ``other``'s detections reproduce ``reference``'s over a set of images: the F1 of
    matched detections (1: the same detections; 0: none in common; 1 when both find nothing)."""
    pairs = sum(matched(r, o) for r, o in zip(reference, other, strict=True))
    n_reference = sum(len(r) for r in reference)
    n_other = sum(len(o) for o in other)
    total = n_reference + n_other
    return {
        "f1": round(2 * pairs / total, 4) if total else 1.0,
        "reference_detections": n_reference,
        "detections": n_other,
        "matched": pairs,
    }
