"""Training with ultralytics the way every training stage does: the stage's settings, the run in
.cache/runs/, the last checkpoint and results.csv published atomically.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, TypeVar

import torch
from ultralytics import YOLO
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.nn.tasks import DetectionModel

from stages.pipeline.cli import UserError
from stages.pipeline.outputs import atomic_path
from stages.pipeline.params import Choice, Float, Int
from stages.pipeline.runtime import PROJECT_ROOT
from stages.yolo import RUNS_DIR
from stages.yolo.models import load_detector

T = TypeVar("T", bound=DetectionTrainer)

DATA_YAML = PROJECT_ROOT / "data" / "yolo" / "dataset.yaml"

# The ultralytics training settings every training stage reads from its own params section.
TRAINING = {
    "epochs": Int(1, 10_000),
    "batch": Int(1, 1024),
    # ultralytics steps the optimizer every nbs/batch batches; nbs = batch steps every batch.
    "nbs": Int(1, 1024),
    "optimizer": Choice("SGD", "Adam", "AdamW"),
    "lr0": Float(0, 1, open_lo=True),
    "warmup_epochs": Float(0, 100),
    "mosaic": Float(0, 1),
    "close_mosaic": Int(0),
    "workers": Int(0, 64),
}


def check_dataset() -> Path:
    """The dataset yaml written by the dataset stage, or a clear error if it is missing."""
    if not DATA_YAML.is_file():
        raise UserError(f"{DATA_YAML} not found: run `dvc repro dataset` first.")
    return DATA_YAML


class ModelKeepingTrainer(DetectionTrainer):
    """A detection trainer that trains the very model it is given.

    Stock ultralytics rebuilds the network from its yaml and copies matching weights into it,
    which silently undoes pruning. Here the loaded checkpoint's module is trained as it is, so a
    pruned model keeps its channel counts through training.
    """

    def get_model(
        self, cfg: Any = None, weights: torch.nn.Module | None = None, verbose: bool = True
    ) -> DetectionModel:
        if weights is None:  # from a yaml: nothing to keep
            return super().get_model(cfg=cfg, weights=None, verbose=verbose)
        if weights.nc != self.data["nc"]:
            raise UserError(
                f"the model detects {weights.nc} classes but the dataset has {self.data['nc']}: "
                f"train it on the dataset it was built for."
            )
        model = weights.float()
        for p in model.parameters():
            p.requires_grad_(True)
        return model


def training_args(params: dict, section: dict) -> dict:
    """ultralytics train() arguments from a validated training section and the common params."""
    args = {k: section[k] for k in TRAINING}
    return {**args, "seed": params["seed"], "imgsz": params["imgsz"], "device": params["device"]}


def run_args(run_name: str, **args: Any) -> dict:
    """Every stage's ultralytics train() arguments: the run in .cache/runs/<run_name> on our
    dataset, deterministic, no plots, plus the stage's own ``args``."""
    return {
        "data": str(check_dataset()),
        "project": str(RUNS_DIR),
        "name": run_name,
        "exist_ok": True,
        "plots": False,
        "deterministic": True,
        "verbose": True,
        **args,
    }


def configured_trainer(base: type[T], **settings: Any) -> type[T]:
    """A subclass of the trainer ``base`` that carries ``settings`` as class attributes.

    ultralytics instantiates the trainer class itself, so a stage hands its settings over on the
    class. For multi-GPU training (``device: 0,1,...``) ultralytics pickles that class with
    cloudpickle into the launcher every DDP worker runs. A class importable by name travels by
    reference and would arrive bare; the subclass made here is not importable by name, so it
    travels by value, settings included, and its base (importable, from stages.yolo) by
    reference.
    """
    declared = {name for cls in base.__mro__ for name in getattr(cls, "__annotations__", {})}
    unknown = sorted(set(settings) - declared)
    if unknown:
        raise TypeError(f"{base.__name__} declares no setting(s) {unknown}")
    namespace = {
        "__module__": base.__module__,
        "__qualname__": f"configured_trainer.<locals>.{base.__name__}",
        **settings,
    }
    return type(base.__name__, (base,), namespace)


def train(
    model: YOLO,
    run_name: str,
    model_out: Path,
    results_out: Path,
    trainer: type[DetectionTrainer] = ModelKeepingTrainer,
    **args: Any,
) -> YOLO:
    """Train in .cache/runs/<run_name>, publish the last checkpoint and results.csv, reload it.

    The run folder is wiped first so that a repeated stage never mixes two runs; the outputs are
    written atomically. The last epoch's EMA weights are kept (not "best"): every stage then
    trains for exactly its budget, which keeps comparisons between stages fair.
    """
    run_dir = RUNS_DIR / run_name
    shutil.rmtree(run_dir, ignore_errors=True)
    model.train(trainer=trainer, **run_args(run_name, **args))
    with atomic_path(model_out) as tmp:
        shutil.copyfile(run_dir / "weights" / "last.pt", tmp)
    with atomic_path(results_out) as tmp:
        shutil.copyfile(run_dir / "results.csv", tmp)
    return load_detector(model_out)
