"""Sparse training on ultralytics' detection trainer: the L1 penalty on BatchNorm scales
(stages/compress/sparsity.py), applied at the optimizer step, with sparsity logged every epoch.

Importable by name, so that ultralytics' multi-GPU workers can unpickle it;
:func:`stages.yolo.training.configured_trainer` gives it its settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from ultralytics.utils.torch_utils import unwrap_model

from stages.compress import sparsity
from stages.yolo import distributed
from stages.yolo.training import ModelKeepingTrainer


class SparseTrainer(ModelKeepingTrainer):
    """Trains with the L1 penalty added to unscaled gradients and logs sparsity every epoch.

    The penalty's subgradient is added **after** the AMP gradient scaler has unscaled the
    gradients: the penalty is then the same with and without mixed precision (added to
    still-scaled gradients it would shrink by the loss scale, a known way for sparse training to
    do nothing). It is also added after ultralytics' gradient clipping (norm 10), which is there
    to tame the detection loss's spikes: clipped together, the penalty would shrink whenever the
    detection gradient is large, so its strength would follow the batch rather than the schedule.

    The settings are class attributes: use ``configured_trainer(SparseTrainer, ...)``.
    """

    schedule: sparsity.PenaltySchedule
    beta_coefficient: float = 0.0
    near_zero: float = 0.01
    exclude: Sequence[str] = ()
    ap50_start: float = 0.0

    def _setup_train(self) -> None:
        super()._setup_train()
        self.batchnorms = sparsity.penalized_batchnorms(unwrap_model(self.model), self.exclude)

    def optimizer_step(self) -> None:
        """ultralytics' step (unscale, clip, step, EMA) with the penalty after unscaling and
        clipping."""
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
        sparsity.add_l1_subgradient(
            self.batchnorms, self.schedule.coefficient(self.epoch), self.beta_coefficient
        )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema:
            self.ema.update(self.model)

    def validate(self) -> tuple[dict[str, Any], Any]:
        """ultralytics' validation, plus the sparsity columns of results.csv.

        Under DDP only rank 0 gets metrics (the others get None); it adapts the schedule and every
        rank then takes its coefficient, so all workers apply the same penalty.
        """
        metrics, fitness = super().validate()
        if metrics is not None:
            used = self.schedule.coefficient(self.epoch)
            evaluated = self.ema.ema if self.ema else unwrap_model(self.model)
            gammas = sparsity.gamma_magnitudes(
                sparsity.penalized_batchnorms(evaluated, self.exclude)
            )
            stats = sparsity.sparsity_stats(gammas, self.near_zero)
            self.schedule.observe(
                self.epoch, stats["near_zero"], metrics["metrics/mAP50(B)"], self.ap50_start
            )
            metrics.update(
                {
                    "sparsity/coefficient": used,
                    "sparsity/gamma_l1": stats["gamma_l1"],
                    "sparsity/near_zero": stats["near_zero"],
                }
            )
        self.schedule.current = distributed.broadcast_float(self.schedule.current)
        return metrics, fitness
