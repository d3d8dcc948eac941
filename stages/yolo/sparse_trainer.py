"""Sparse training on ultralytics' detection trainer: the L1 penalty on BatchNorm scales
(stages/compress/sparsity.py), applied at the optimizer step, with sparsity logged every epoch.

Importable by name, so that ultralytics' multi-GPU workers can unpickle it;
:func:`stages.yolo.training.configured_trainer` gives it its settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from ultralytics.utils.torch_utils import unwrap_model

from stages.compress import sparsity
from stages.yolo import distributed
from stages.yolo.training import ModelKeepingTrainer


class SparseTrainer(ModelKeepingTrainer):
    """Trains with the L1 penalty on BatchNorm scales and logs sparsity every epoch.

    The penalty acts on unscaled, clipped gradients: ``subgradient`` adds lambda * sign(gamma)
    after ``GradScaler.unscale_`` and after ultralytics' gradient clipping (norm 10), so it is the
    same with and without mixed precision and does not shrink on the batches whose detection
    gradient is large; ``proximal`` and ``group`` soft-threshold the scales right after the
    optimizer's step (skipped with it when AMP found an inf). The BatchNorm-scale parameter group
    learns at its own rate, ``bn_lr0``. Zeros reached in training are copied into the EMA model,
    which is what is validated and saved (its average would otherwise lag them).

    The settings are class attributes: use ``configured_trainer(SparseTrainer, ...)``.
    """

    schedule: sparsity.PenaltySchedule
    form: str = "proximal"
    bn_lr0: float | None = None  # None: the optimizer's lr0
    groups: Mapping[str, Sequence[int]] | None = None  # BN name -> group of each channel
    weights: Mapping[str, Sequence[float]] | None = None  # BN name -> each channel's weight
    beta_coefficient: float = 0.0
    near_zero: float = 0.01
    exclude: Sequence[str] = ()
    ap50_start: float = 0.0

    def build_optimizer(self, model: nn.Module, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """ultralytics' optimizer, with the BatchNorm-scale group at ``bn_lr0`` (the scheduler,
        built next, takes every group's rate as its initial one)."""
        optimizer = super().build_optimizer(model, *args, **kwargs)
        if self.bn_lr0 is not None:
            for group in optimizer.param_groups:
                if group.get("param_group") == "bn":
                    group["lr"] = self.bn_lr0
        return optimizer

    def _setup_train(self) -> None:
        super()._setup_train()
        named = sparsity.named_penalized_batchnorms(unwrap_model(self.model), self.exclude)
        self.batchnorms = [m for _, m in named]
        self.ema_batchnorms = [dict(self.ema.ema.named_modules())[n] for n, _ in named]
        self.channel_weights = None
        if self.weights is not None:
            self.channel_weights = [
                torch.tensor(self.weights[n], device=self.device) for n, _ in named
            ]
        self.flat_groups = None
        if self.form == "group":
            self.flat_groups = torch.tensor([g for n, _ in named for g in self.groups[n]])
        self.schedule.steps_per_epoch = max(len(self.train_loader) // self.accumulate, 1)
        self.schedule.start_sparsity = self._near_zero_fraction()
        self.optimizer_steps = 0

    def optimizer_step(self) -> None:
        """ultralytics' step (unscale, clip, step, EMA) with the penalty where it belongs."""
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
        coefficient = self.schedule.coefficient(self.epoch)
        gamma_coefficient = coefficient if self.form == "subgradient" else 0.0
        sparsity.add_l1_subgradient(
            self.batchnorms, gamma_coefficient, self.beta_coefficient, self.channel_weights
        )
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.form != "subgradient" and self.scaler.get_scale() >= scale:  # the step was taken
            sparsity.proximal_l1_step(
                self.optimizer, self.batchnorms, coefficient, self.flat_groups, self.channel_weights
            )
        self.optimizer.zero_grad()
        if self.ema:
            self.ema.update(self.model)
            self._copy_zeros_to_ema()
        if self.schedule.adapts_per_step:  # measuring costs a copy of every scale per step
            self.schedule.observe_step(self.optimizer_steps, self._near_zero_fraction())
        self.optimizer_steps += 1

    def _near_zero_fraction(self) -> float:
        gammas = sparsity.gamma_magnitudes(self.batchnorms)
        return sparsity.sparsity_stats(gammas, self.near_zero)["near_zero"]

    def _copy_zeros_to_ema(self) -> None:
        with torch.no_grad():
            for raw, averaged in zip(self.batchnorms, self.ema_batchnorms, strict=True):
                averaged.weight[raw.weight == 0] = 0.0

    def validate(self) -> tuple[dict[str, Any], Any]:
        """ultralytics' validation, plus the sparsity columns of results.csv.

        Under DDP only rank 0 gets metrics (the others get None); it adapts the schedule and every
        rank then takes its coefficient, so all workers apply the same penalty.
        """
        metrics, fitness = super().validate()
        if metrics is not None:
            used = self.schedule.coefficient(self.epoch)
            evaluated = self.ema_batchnorms if self.ema else self.batchnorms
            stats = sparsity.sparsity_stats(sparsity.gamma_magnitudes(evaluated), self.near_zero)
            self.schedule.observe_epoch(metrics["metrics/mAP50(B)"], self.ap50_start)
            metrics.update(
                {
                    "sparsity/coefficient": used,
                    "sparsity/gamma_l1": stats["gamma_l1"],
                    "sparsity/near_zero": stats["near_zero"],
                }
            )
        self.schedule.current = distributed.broadcast_float(self.schedule.current)
        return metrics, fitness
