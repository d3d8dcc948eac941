"""Glue between the stages and ultralytics: training, validation, loading, model size.

Importing this module finishes the runtime set-up that needs ultralytics itself: integrations and
sync are switched off, its run/weight/dataset dirs point into the project's .cache/, and torch uses
every core (ultralytics resets torch to cpu_count - 1 threads whenever it selects the CPU).
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
import sys
from copy import deepcopy
from pathlib import Path
from typing import Any, TypeVar

import thop
import torch
import ultralytics.utils as ul_utils
import ultralytics.utils.torch_utils as ul_torch_utils
from ultralytics import YOLO
from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator
from ultralytics.nn.modules import Detect
from ultralytics.nn.tasks import DetectionModel, guess_model_task

from stages.common import layers  # noqa: F401  (the split-replay hooks pruned checkpoints unpickle to)
from stages.common import params as P
from stages.common.cli import UserError
from stages.common.outputs import atomic_path
from stages.common.runtime import CACHE_DIR, PROJECT_ROOT, cpu_threads

T = TypeVar("T", bound=DetectionTrainer)

RUNS_DIR = CACHE_DIR / "runs"
DATA_YAML = PROJECT_ROOT / "data" / "yolo" / "dataset.yaml"

# The ultralytics training settings every training stage reads from its own params section.
TRAINING = {
    "epochs": P.Int(1, 10_000),
    "batch": P.Int(1, 1024),
    # ultralytics steps the optimizer every nbs/batch batches; nbs = batch steps every batch.
    "nbs": P.Int(1, 1024),
    "optimizer": P.Choice("SGD", "Adam", "AdamW"),
    "lr0": P.Float(0, 1, open_lo=True),
    "warmup_epochs": P.Float(0, 100),
    "mosaic": P.Float(0, 1),
    "close_mosaic": P.Int(0),
    "workers": P.Int(0, 64),
}

ul_utils.SETTINGS.update(
    {
        "sync": False,
        "runs_dir": str(RUNS_DIR),
        "weights_dir": str(CACHE_DIR / "weights"),
        "datasets_dir": str(PROJECT_ROOT / "data"),
        **{
            k: False
            for k in ("clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
        },
    }
)
ul_utils.NUM_THREADS = ul_torch_utils.NUM_THREADS = cpu_threads()
torch.set_num_threads(cpu_threads())


def check_model_source(key: str, value: str, sha256: str = "") -> str:
    """A model to start from: an ultralytics detection config (a name such as 'yolo11n.yaml' or
    'yolov8n-p2.yaml', or a .yaml path in the project), built here to validate it; or an
    existing local .pt file.

    With ``sha256``, a .pt file is hashed and compared before anything unpickles it: a
    checkpoint from outside the pipeline is never loaded unverified when a hash is given.
    """
    if value.endswith((".yaml", ".yml")):
        if sha256:
            raise P.ParamsError(
                f"params.yaml: a sha256 is given for {key} = {value!r}, which is a config, not a "
                f"weights file: set the sha256 to '' or {key} to the .pt it belongs to."
            )
        local = PROJECT_ROOT / value
        cfg = str(local) if local.is_file() else value
        check_detector_config(key, cfg)
        return cfg
    path = PROJECT_ROOT / value
    if value.endswith(".pt"):
        if not path.is_file():
            raise P.ParamsError(
                f"params.yaml: {key} = {value!r}: no such file. Put the weights there (nothing is "
                f"downloaded) or use a config name such as 'yolov8n.yaml' to train from scratch."
            )
        if sha256:
            verify_sha256(path, sha256)
        return str(path)
    raise P.ParamsError(
        f"params.yaml: {key} = {value!r} is not a model: expected an ultralytics detection config "
        f"(such as yolov8n.yaml, yolov8n-p2.yaml, yolo11n.yaml) or a local .pt path."
    )


def check_detector_config(key: str, cfg: str) -> None:
    """Build ``cfg`` once: it must exist and give a detection model with a YOLO Detect head."""
    try:
        model = DetectionModel(cfg, verbose=False)
    except (FileNotFoundError, KeyError, ValueError, TypeError, AttributeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise P.ParamsError(
            f"params.yaml: {key} = {cfg!r} does not build a model ({reason}): use the name of an "
            f"ultralytics detection config (see ultralytics/cfg/models) or a .yaml in the project."
        ) from None
    problem = detector_problem(model)
    if problem:
        raise P.ParamsError(f"params.yaml: {key} = {cfg!r} {problem}")


def detector_problem(model: torch.nn.Module) -> str | None:
    """Why ``model`` is not a detector this pipeline handles, or None."""
    head = model.model[-1] if isinstance(model, DetectionModel) else None
    if type(model) is not DetectionModel or not isinstance(head, Detect):
        return (
            f"is a {type(model).__name__} ending in {type(head).__name__}, not a YOLO detection "
            f"model: the pipeline trains, prunes and distils ultralytics YOLO detectors "
            f"(yolov8, yolo11, yolo26, ... and their P2/P6 variants)."
        )
    if guess_model_task(model) != "detect":
        return f"has a {type(head).__name__} head for {guess_model_task(model)}, not detection."
    return None


def verify_sha256(path: Path, expected: str) -> None:
    """Raise if the file's sha256 is not ``expected`` (read in chunks; nothing is unpickled)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        raise UserError(
            f"{path}: sha256 is {digest.hexdigest()}, not the expected {expected.lower()}. The "
            f"file is not the one the hash belongs to (corrupt, truncated or replaced): fetch the "
            f"right weights, or update the hash if you changed them on purpose."
        )


def check_dataset() -> Path:
    """The dataset yaml written by the dataset stage, or a clear error if it is missing."""
    if not DATA_YAML.is_file():
        raise UserError(f"{DATA_YAML} not found: run `dvc repro dataset` first.")
    return DATA_YAML


def load_detector(path: Path | str) -> YOLO:
    """Load a YOLO detection checkpoint, failing clearly on anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: run the stage that writes it (`dvc repro`).")
    try:
        model = YOLO(str(path))
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{path} is not an ultralytics checkpoint ({reason}): it is truncated, corrupt or "
            f"another kind of file. Re-create it with `dvc repro`, which re-runs the stage that "
            f"writes it."
        ) from err
    problem = (
        detector_problem(model.model)
        if model.task == "detect"
        else f"is a {model.task} model ({type(model.model).__name__}), not a YOLO detection model."
    )
    if problem:
        raise UserError(f"{path} holds a model that {problem}")
    return model


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
    travels by value, settings included. Its base is always taken from the importable module
    (a stage run as ``python -m stages.x`` defines its classes in ``__main__``, which a worker
    cannot import).
    """
    declared = {name for cls in base.__mro__ for name in getattr(cls, "__annotations__", {})}
    unknown = sorted(set(settings) - declared)
    if unknown:
        raise TypeError(f"{base.__name__} declares no setting(s) {unknown}")
    if base.__module__ == "__main__":
        module = importlib.import_module(sys.modules["__main__"].__spec__.name)
        base = getattr(module, base.__qualname__)
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


def val_ap50(model: YOLO, run_name: str, params: dict) -> float:
    """AP50 on the val split at the pipeline's imgsz and device."""
    return float(
        validate(model, run_name, imgsz=params["imgsz"], device=params["device"]).box.map50
    )


class PredictionsValidator(DetectionValidator):
    """Detection validation that, with ``save_json=True``, writes predictions.json for our own
    COCO evaluation (stages/evaluate.py) and skips ultralytics' faster-coco-eval pass."""

    def eval_json(self, stats: dict[str, Any]) -> dict[str, Any]:
        return stats


def validate(model: YOLO, run_name: str, split: str = "val", **args: Any) -> Any:
    """ultralytics validation on one split (val decides, test reports); returns its DetMetrics.

    ``rect=False``: every backend sees the same square imgsz x imgsz letterbox. ultralytics'
    default rectangular batches pad val images by half a stride (256 -> 288), which exported
    static-shape models cannot do, so their AP50 would not be comparable.
    """
    return model.val(
        validator=PredictionsValidator,
        data=str(check_dataset()),
        split=split,
        rect=False,
        project=str(RUNS_DIR),
        name=run_name,
        exist_ok=True,
        plots=False,
        verbose=False,
        **args,
    )


def model_size(model: torch.nn.Module, imgsz: int) -> dict[str, float]:
    """Params, MACs and FLOPs of the fused (deployable) model at one square input size.

    Convention: MACs are multiply-accumulates counted by thop; FLOPs = 2 x MACs (as ultralytics
    and the paper report GFLOPs). Batch-norm is folded into the convolutions first, as it is in
    any deployed model.
    """
    fused = deepcopy(model).float().eval()
    if hasattr(fused, "fuse"):
        fused = fused.fuse(verbose=False)
    params = sum(p.numel() for p in fused.parameters())
    x = torch.zeros(1, 3, imgsz, imgsz)
    macs, _ = thop.profile(fused, inputs=(x,), verbose=False)
    return {"params": params, "macs_g": macs / 1e9, "flops_g": 2 * macs / 1e9}
