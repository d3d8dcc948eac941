"""Stage `distill`: fine-tune the pruned student with Channel-Wise Knowledge Distillation.

CWD (Shu et al., ICCV 2021): for each distilled level, the student's feature map goes through a
learned aligner (1x1 conv + BN) to the teacher's channel count; every channel of both maps becomes
a distribution over its H*W positions by softmax(x / tau); the loss is KL(teacher || student)
summed over positions, times tau^2, averaged over N*C, and weighted per level. The total training
loss is the detection loss plus ``weight`` * sum_l level_weight_l * CWD_l.

The distilled maps are the inputs of the Detect head (the neck outputs, one per level: strides
8, 16, 32 for most models, 4 to 32 with a P2 head, 8 to 64 with P6); ``level_weights`` gives one
weight per level (the default favours strides 8 and 16, where VisDrone's small and medium objects
are), as a list in stride order or a mapping stride -> weight. The teacher
(baseline or sparse model) runs in eval mode without gradients; the aligners train with the student
(they are in the optimizer) and are not saved: the saved model is the pruned student alone, with
exactly its pruned size. ``weight: 0`` is plain fine-tuning with the same budget (the ablation).

Each aligner starts as the least-squares linear map from the student's to the teacher's map on
``aligner_fit_images`` training images (0: the usual random init): with a random aligner the
first CWD gradients pull the student's features toward a random projection of the teacher's.

Reads: models/pruned.pt, the teacher, data/yolo. Writes: models/distilled.pt,
reports/distill/results.csv (per-epoch losses incl. cwd_loss, val metrics), distill.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics import YOLO
from ultralytics.utils.torch_utils import unwrap_model

from stages.common import cli, distributed, yolo
from stages.common import params as P
from stages.common.images import TRAIN_IMAGES, calibration_batch
from stages.common.outputs import print_summary, write_json, written
from stages.common.runtime import PROJECT_ROOT

STUDENT = PROJECT_ROOT / "models" / "pruned.pt"
TEACHERS = {name: PROJECT_ROOT / "models" / f"{name}.pt" for name in ("baseline", "sparse")}
MODEL_OUT = PROJECT_ROOT / "models" / "distilled.pt"
REPORT_DIR = PROJECT_ROOT / "reports" / "distill"

SCHEMA = {
    **P.COMMON,
    "distill": P.Section(
        {
            **yolo.TRAINING,
            "teacher": P.Choice(*TEACHERS),
            "temperature": P.Float(0, 100, open_lo=True),
            "weight": P.Float(0, 1000),
            "level_weights": P.PerLevel(),
            "aligner_fit_images": P.Int(0, 10_000),
        }
    ),
}


# --- the algorithm -----------------------------------------------------------------------------


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """Channel-wise distillation loss of two N x C x H x W maps (the student already aligned).

    tau^2 / (N*C) * sum over n, c of KL(softmax(t_nc / tau) || softmax(s_nc / tau)), each softmax
    over the H*W positions of one channel.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student map {tuple(student.shape)} != teacher map {tuple(teacher.shape)}"
        )
    n, c = student.shape[:2]
    log_p_s = F.log_softmax(student.reshape(n * c, -1).float() / tau, dim=1)
    log_p_t = F.log_softmax(teacher.reshape(n * c, -1).float() / tau, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl * tau**2 / (n * c)


def make_aligners(
    student_channels: Sequence[int], teacher_channels: Sequence[int]
) -> nn.ModuleList:
    """One 1x1 conv + BN per level, from the student's to the teacher's channel count."""
    return nn.ModuleList(
        nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct))
        for cs, ct in zip(student_channels, teacher_channels, strict=True)
    )


def fit_aligner(aligner: nn.Sequential, student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Set a 1x1 conv + BN aligner to the least-squares map from student to teacher channels.

    Over every position of the N x C x H x W maps, W minimises |W (s - mean s) - (t - mean t)|^2;
    the BN then passes W s through with its own statistics and adds mean t, so the aligner outputs
    W (s - mean s) + mean t, in train mode on this batch and in eval mode alike.
    """
    conv, bn = aligner
    s = student.permute(0, 2, 3, 1).reshape(-1, student.shape[1]).double()
    t = teacher.permute(0, 2, 3, 1).reshape(-1, teacher.shape[1]).double()
    w = torch.linalg.lstsq(s - s.mean(0), t - t.mean(0)).solution  # C_s x C_t
    y = s @ w
    var = y.var(0, unbiased=False)
    with torch.no_grad():
        conv.weight.copy_(w.T.reshape(conv.weight.shape))
        bn.running_mean.copy_(y.mean(0))
        bn.running_var.copy_(var)
        bn.weight.copy_((var + bn.eps).sqrt())
        bn.bias.copy_(t.mean(0))


def feature_maps(preds: Any) -> list[torch.Tensor]:
    """The maps the Detect head received, from its output (ultralytics keeps them as "feats")."""
    raw = preds[1] if isinstance(preds, tuple) else preds  # eval mode: (decoded, raw)
    raw = raw.get("one2many", raw)  # end-to-end heads (YOLO26, v10) nest their two branches
    return list(raw["feats"])


def weights_per_level(given: list[float] | dict[int, float], strides: list[int]) -> list[float]:
    """distill.level_weights as one weight per Detect level of a model with these strides."""
    if isinstance(given, dict):
        if sorted(given) != strides:
            raise P.ParamsError(
                f"params.yaml: distill.level_weights gives strides {sorted(given)}, but the "
                f"student's Detect levels have strides {strides}: give a weight for each of them."
            )
        return [given[s] for s in strides]
    if len(given) != len(strides):
        raise P.ParamsError(
            f"params.yaml: distill.level_weights has {len(given)} values, but the student has "
            f"{len(strides)} Detect levels (strides {strides}): give one weight per level in "
            f"stride order, or a mapping stride -> weight."
        )
    return given


def head_features(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The maps the Detect head of ``model`` receives for ``images``."""
    return feature_maps(model(images))


# --- ultralytics glue --------------------------------------------------------------------------


class CWDCriterion:
    """The detection loss plus the weighted CWD term, logged as its own loss item `cwd_loss`."""

    def __init__(
        self,
        detection: Any,
        teacher: nn.Module,
        aligners: nn.ModuleList,
        tau: float,
        weight: float,
        level_weights: Sequence[float],
    ) -> None:
        self.detection, self.teacher, self.aligners = detection, teacher, aligners
        self.tau, self.weight, self.level_weights = tau, weight, list(level_weights)

    def __call__(self, preds: Any, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, items = self.detection(preds, batch)
        with torch.no_grad():
            teacher_maps = head_features(self.teacher, batch["img"])
        cwd = sum(
            w * cwd_loss(align(s), t, self.tau)
            for w, align, s, t in zip(
                self.level_weights, self.aligners, feature_maps(preds), teacher_maps, strict=True
            )
        )
        weighted = self.weight * cwd
        batch_size = batch["img"].shape[0]  # ultralytics' detection loss is summed over the batch
        total = torch.cat([loss, (weighted * batch_size).reshape(1).to(loss.dtype)])
        return total, {**items, "cwd_loss": weighted.detach()}


class DistillTrainer(yolo.ModelKeepingTrainer):
    """Fine-tunes the student with the CWD criterion.

    The settings are class attributes: use :func:`distill_trainer` for a configured subclass.
    """

    teacher: nn.Module
    aligners: nn.ModuleList
    tau: float = 1.0
    weight: float = 1.0
    level_weights: Sequence[float] = (1.0, 1.0, 1.0)

    def build_optimizer(self, model: nn.Module, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """ultralytics' optimizer for the student, plus a parameter group for the aligners with the
        student's learning rate and optimizer settings (not the optimizer class's defaults)."""
        self.teacher = self.teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.aligners = self.aligners.to(self.device)
        optimizer = super().build_optimizer(model, *args, **kwargs)
        student = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        optimizer.add_param_group(
            {
                **student,
                "params": list(self.aligners.parameters()),
                "weight_decay": 0.0,
                "param_group": "aligners",
            }
        )
        return optimizer

    def optimizer_step(self) -> None:
        """Under DDP the aligners' gradients are averaged over the workers, as the student's are
        by DDP itself; then ultralytics' step."""
        distributed.average_gradients(self.aligners.parameters())
        super().optimizer_step()

    def _criterion(self, model: nn.Module) -> CWDCriterion:
        return CWDCriterion(
            model.init_criterion(),
            self.teacher,
            self.aligners,
            self.tau,
            self.weight,
            self.level_weights,
        )

    def _setup_train(self) -> None:
        super()._setup_train()
        unwrap_model(self.model).criterion = self._criterion(unwrap_model(self.model))

    def validate(self) -> tuple[dict[str, Any], Any]:
        """Validation computes the same loss items, cwd_loss included, on the EMA model, with the
        aligners in eval mode as the model is: their BatchNorms use (and keep) their running
        statistics instead of learning from val batches.

        On a GPU with AMP, ultralytics runs this on fp16 images under autocast; the teacher and
        the aligners run in that context too (tests/test_distill.py checks the path on the CPU
        with bfloat16 autocast and half images)."""
        ema = self.ema.ema
        ema.criterion = self._criterion(ema)
        self.aligners.eval()
        try:
            return super().validate()
        finally:
            self.aligners.train()
            ema.criterion = None  # never saved with the model


def check_levels(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> None:
    """Student and teacher must give the same number of maps at the same strides."""
    if len(student) != len(teacher) or any(
        s.shape[2:] != t.shape[2:] for s, t in zip(student, teacher, strict=False)
    ):
        raise cli.UserError(
            f"teacher feature maps {[tuple(t.shape[1:]) for t in teacher]} do not match the "
            f"student's {[tuple(s.shape[1:]) for s in student]}: the teacher must be a "
            f"detector with the same detection levels (strides) as the student."
        )


def distill_trainer(cfg: dict, student: YOLO, teacher: YOLO, imgsz: int) -> type[DistillTrainer]:
    """The trainer for a validated ``distill`` section: the teacher, and the aligners fitted on
    ``aligner_fit_images`` training images. Mismatched detection levels, and level weights that
    do not fit them, fail here, before any training."""
    strides = [int(s) for s in student.model.stride]
    level_weights = weights_per_level(cfg["level_weights"], strides)
    fit_count = cfg["aligner_fit_images"]
    images = (  # without fitting, a blank image tells the channel counts
        calibration_batch(TRAIN_IMAGES, fit_count, imgsz)
        if fit_count
        else torch.zeros(1, 3, imgsz, imgsz)
    )
    with torch.no_grad():
        s_maps = head_features(student.model.float().eval(), images)
        t_maps = head_features(teacher.model.float().eval(), images)
    check_levels(s_maps, t_maps)
    aligners = make_aligners([m.shape[1] for m in s_maps], [m.shape[1] for m in t_maps])
    if fit_count:
        for aligner, s, t in zip(aligners, s_maps, t_maps, strict=True):
            fit_aligner(aligner, s, t)
    return yolo.configured_trainer(
        DistillTrainer,
        teacher=teacher.model,
        aligners=aligners,
        tau=cfg["temperature"],
        weight=cfg["weight"],
        level_weights=level_weights,
    )


def main() -> None:
    params = P.load(SCHEMA)
    cfg = params["distill"]
    args = yolo.training_args(params, cfg)
    student = yolo.load_detector(STUDENT)
    teacher = yolo.load_detector(TEACHERS[cfg["teacher"]])
    trainer = distill_trainer(cfg, student, teacher, params["imgsz"])
    student_params = sum(p.numel() for p in student.model.parameters())
    distilled = yolo.train(
        student, "distill", MODEL_OUT, REPORT_DIR / "results.csv", trainer=trainer, **args
    )
    saved_params = sum(p.numel() for p in distilled.model.parameters())
    if saved_params != student_params:
        raise RuntimeError(
            f"the distilled model has {saved_params} params, the pruned student "
            f"{student_params}: the pruned structure was not kept"
        )
    ap50 = yolo.val_ap50(distilled, "distill-end", params)
    metrics = {
        "ap50": round(ap50, 4),
        "params_m": round(saved_params / 1e6, 4),
        "teacher": cfg["teacher"],
        "weight": cfg["weight"],
        "temperature": cfg["temperature"],
    }
    write_json(REPORT_DIR / "distill.json", metrics)
    print_summary(
        f"distill (teacher {cfg['teacher']}, weight {cfg['weight']:g}, tau {cfg['temperature']:g})",
        [
            ("student params", f"{saved_params / 1e6:.3f} M unfused, as pruned (structure kept)"),
            ("val AP50", f"{ap50:.3f}"),
            written(MODEL_OUT, REPORT_DIR),
        ],
    )


if __name__ == "__main__":
    cli.run(main, __doc__)
