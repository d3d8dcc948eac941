"""What the algorithms need to know about ultralytics' Detect head, passed to them as arguments:
which outputs are predictions (pruning keeps their channels), where the head is, and the feature
maps it reads (what CWD distils)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from ultralytics.nn.modules import Detect

from stages.compress.pruning.dependency import tensors_in


def prediction_tensors(out: object) -> list[torch.Tensor]:
    """The prediction tensors of a forward's output (ultralytics returns nested dicts; in eval
    mode, the decoded boxes beside them).

    "feats" holds the neck's maps, returned beside the predictions for the loss: they are not
    outputs whose channels must be kept.
    """
    return tensors_in(out, skip_keys=("feats",))


def detect_prefix(model: nn.Module) -> str:
    """Qualified name of the Detect head."""
    return next(name for name, m in model.named_modules() if isinstance(m, Detect))


def feature_maps(preds: Any) -> list[torch.Tensor]:
    """The maps the Detect head received, from its output (ultralytics keeps them as "feats")."""
    raw = preds[1] if isinstance(preds, tuple) else preds  # eval mode: (decoded, raw)
    raw = raw.get("one2many", raw)  # end-to-end heads (YOLO26, v10) nest their two branches
    return list(raw["feats"])


def head_features(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The maps the Detect head of ``model`` receives for ``images``."""
    return feature_maps(model(images))
