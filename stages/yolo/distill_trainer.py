"""Distillation on ultralytics' detection trainer: the detection loss plus CWD
(stages/compress/cwd.py) from a frozen teacher, on the maps the Detect head reads.

Importable by name, so that ultralytics' multi-GPU workers can unpickle it; :func:`distill_trainer`
gives it its settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from ultralytics import YOLO
from ultralytics.utils.torch_utils import unwrap_model

from stages.compress import cwd
from stages.pipeline.cli import UserError
from stages.yolo import distributed
from stages.yolo.heads import feature_maps, head_features
from stages.yolo.training import ModelKeepingTrainer, configured_trainer


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
        weighted = self.weight * cwd.multi_level_cwd(
            feature_maps(preds), teacher_maps, self.aligners, self.tau, self.level_weights
        )
        batch_size = batch["img"].shape[0]  # ultralytics' detection loss is summed over the batch
        total = torch.cat([loss, (weighted * batch_size).reshape(1).to(loss.dtype)])
        return total, {**items, "cwd_loss": weighted.detach()}


class DistillTrainer(ModelKeepingTrainer):
    """Fine-tunes the student with the CWD criterion; the teacher runs in eval mode without
    gradients, the aligners train with the student (in the optimizer) and are not saved.

    The settings are class attributes: use :func:`distill_trainer`.
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
        raise UserError(
            f"teacher feature maps {[tuple(t.shape[1:]) for t in teacher]} do not match the "
            f"student's {[tuple(s.shape[1:]) for s in student]}: the teacher must be a "
            f"detector with the same detection levels (strides) as the student."
        )


def distill_trainer(
    student: YOLO,
    teacher: YOLO,
    tau: float,
    weight: float,
    level_weights: Sequence[float],
    fit_images: torch.Tensor | None,
    imgsz: int,
) -> type[DistillTrainer]:
    """The trainer that distils ``teacher`` into ``student``, with aligners fitted on
    ``fit_images`` (None: random init). Mismatched detection levels fail here, before any
    training."""
    # without fitting, a blank image tells the channel counts
    images = fit_images if fit_images is not None else torch.zeros(1, 3, imgsz, imgsz)
    with torch.no_grad():
        s_maps = head_features(student.model.float().eval(), images)
        t_maps = head_features(teacher.model.float().eval(), images)
    check_levels(s_maps, t_maps)
    aligners = cwd.make_aligners([m.shape[1] for m in s_maps], [m.shape[1] for m in t_maps])
    if fit_images is not None:
        for aligner, s, t in zip(aligners, s_maps, t_maps, strict=True):
            cwd.fit_aligner(aligner, s, t)
    return configured_trainer(
        DistillTrainer,
        teacher=teacher.model,
        aligners=aligners,
        tau=tau,
        weight=weight,
        level_weights=level_weights,
    )
