"""Loading and checking ultralytics detectors, and measuring their size."""

from __future__ import annotations

import hashlib
import importlib
from copy import deepcopy
from pathlib import Path

import thop
import torch
from ultralytics import YOLO
from ultralytics.nn.modules import Detect
from ultralytics.nn.tasks import DetectionModel, guess_model_task

from stages.pipeline.cli import UserError
from stages.pipeline.params import ParamsError
from stages.pipeline.runtime import PROJECT_ROOT

# Pruned checkpoints carry split-replay hooks that pickle records by this module's name (or by
# its name in earlier versions, which the module answers to as well).
REPLAY_MODULE = "stages.compress.pruning.replay"


def check_model_source(key: str, value: str, sha256: str = "") -> str:
    """A model to start from: an ultralytics detection config (a name such as 'yolo11n.yaml' or
    'yolov8n-p2.yaml', or a .yaml path in the project), built here to validate it; or an
    existing local .pt file.

    With ``sha256``, a .pt file is hashed and compared before anything unpickles it: a
    checkpoint from outside the pipeline is never loaded unverified when a hash is given.
    """
    if value.endswith((".yaml", ".yml")):
        if sha256:
            raise ParamsError(
                f"params.yaml: a sha256 is given for {key} = {value!r}, which is a config, not a "
                f"weights file: set the sha256 to '' or {key} to the .pt it belongs to."
            )
        local = PROJECT_ROOT / value
        config = str(local) if local.is_file() else value
        check_detector_config(key, config)
        return config
    path = PROJECT_ROOT / value
    if value.endswith(".pt"):
        if not path.is_file():
            raise ParamsError(
                f"params.yaml: {key} = {value!r}: no such file. Put the weights there (nothing is "
                f"downloaded) or use a config name such as 'yolov8n.yaml' to train from scratch."
            )
        if sha256:
            verify_sha256(path, sha256)
        return str(path)
    raise ParamsError(
        f"params.yaml: {key} = {value!r} is not a model: expected an ultralytics detection config "
        f"(such as yolov8n.yaml, yolov8n-p2.yaml, yolo11n.yaml) or a local .pt path."
    )


def check_detector_config(key: str, config: str) -> None:
    """Build ``config`` once: it must exist and give a detection model with a YOLO Detect head."""
    try:
        model = DetectionModel(config, verbose=False)
    except (FileNotFoundError, KeyError, ValueError, TypeError, AttributeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ParamsError(
            f"params.yaml: {key} = {config!r} does not build a model ({reason}): use the name of "
            f"an ultralytics detection config (see ultralytics/cfg/models) or a .yaml in the "
            f"project."
        ) from None
    problem = detector_problem(model)
    if problem:
        raise ParamsError(f"params.yaml: {key} = {config!r} {problem}")


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


def load_detector(path: Path | str) -> YOLO:
    """Load a YOLO detection checkpoint, failing clearly on anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: run the stage that writes it (`dvc repro`).")
    importlib.import_module(REPLAY_MODULE)
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
