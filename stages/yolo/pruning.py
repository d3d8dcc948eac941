"""Pruning an ultralytics detector: the channel graph (the trace, told which outputs are
predictions, then the modules that read their input's width kept whole), its tied groups of
BatchNorm channels, and fresh models pruned uniformly (for size budgets and speed benchmarks)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from copy import deepcopy

import torch
from torch import nn
from ultralytics.nn.tasks import DetectionModel

from stages.compress.pruning import dependency, importance, surgery
from stages.yolo.heads import prediction_tensors


def channel_graph(model: nn.Module, imgsz: int = 64) -> dependency.ChannelGraph:
    """The channel graph of a detector: the trace, then the modules that read their input's
    width kept whole."""
    graph = dependency.trace(model, imgsz, outputs=prediction_tensors)
    surgery.keep_width_readers(model, graph, imgsz)
    return graph


def uniformly_pruned(config: str, ratios: Iterable[float]) -> Iterator[tuple[float, nn.Module]]:
    """A freshly built ``config`` (10 classes) as it is (ratio 0.0), then pruned uniformly at
    each ratio; each model is a new copy.

    Uniform pruning of a fresh model: its shapes (and so its size and speed) depend only on the
    ratio, not on weights, which is what a size budget or a speed benchmark needs.
    """
    base = DetectionModel(config, nc=10, verbose=False).eval()
    yield 0.0, deepcopy(base)
    graph = channel_graph(base)
    for ratio in ratios:
        model = deepcopy(base)
        chosen = importance.plan(graph, importance.bn_gammas(model), ratio, "uniform", 8, 8)
        surgery.remove_channels(model, graph, chosen.removed, torch.rand(1, 3, 64, 64))
        yield ratio, model
