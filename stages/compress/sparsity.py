"""Sparsity-aware training: an L1 penalty on BatchNorm scales (gamma), and its schedule.

Network slimming (Liu et al., 2017) adds s * sum|gamma| over the BatchNorm scales to the loss, so
that channels the network does not need drift to zero and can be pruned with little loss. Its
gradient, s * sign(gamma), is added to each gamma's gradient right before the optimizer step.

The coefficient s follows a :class:`PenaltySchedule`:

- ``constant``: s every epoch;
- ``linear_decay``: s * (1 - 0.9 * e / E) at epoch e of E (the paper's public code);
- ``dynamic``: starts at s and is adapted after every epoch e (0-based) from the measured
  fraction f_e of near-zero gammas and the val AP50 a_e. The plan is to reach ``target`` by the
  last epoch along p_e = target * (e + 1) / E. Accuracy comes first: if a_e < ``ap50_floor`` *
  a_start (a_start: AP50 before sparse training), s is divided by ``gain``; otherwise s is
  multiplied by ``gain`` while f_e < p_e (behind plan) and divided by it once f_e >= p_e (on plan:
  the pressure eases so useful channels can recover). s stays within [s / 1000, s * 1000].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

SCHEDULES = ("constant", "linear_decay", "dynamic")


def penalized_batchnorms(model: nn.Module, exclude: Sequence[str] = ()) -> list[nn.BatchNorm2d]:
    """Every BatchNorm2d of ``model`` whose qualified name starts with no excluded prefix."""
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and not name.startswith(tuple(exclude))
    ]


def add_l1_subgradient(
    batchnorms: Sequence[nn.BatchNorm2d], gamma_coefficient: float, beta_coefficient: float = 0.0
) -> None:
    """Add the subgradient of s*|gamma| (and of s_beta*|beta|) to the BN parameters' gradients.

    Call it on unscaled gradients (after ``GradScaler.unscale_``). sign(0) = 0, the usual choice.
    """
    with torch.no_grad():
        for bn in batchnorms:
            for param, coefficient in ((bn.weight, gamma_coefficient), (bn.bias, beta_coefficient)):
                if coefficient == 0:
                    continue
                step = torch.sign(param) * coefficient
                if param.grad is None:
                    param.grad = step
                else:
                    param.grad.add_(step)


def gamma_magnitudes(batchnorms: Sequence[nn.BatchNorm2d]) -> np.ndarray:
    """|gamma| of every channel of the given BatchNorms, as one float64 array."""
    return np.concatenate([bn.weight.detach().abs().double().cpu().numpy() for bn in batchnorms])


def sparsity_stats(gammas: np.ndarray, near_zero: float) -> dict[str, float]:
    """Total |gamma| and the fraction of channels with |gamma| below ``near_zero``."""
    return {"gamma_l1": float(gammas.sum()), "near_zero": float((gammas < near_zero).mean())}


def gamma_histogram(before: np.ndarray, after: np.ndarray, bins: int = 80) -> list[dict]:
    """Counts of |gamma| before and after sparse training over shared bins (a plot source)."""
    edges = np.linspace(0, max(before.max(), after.max(), 1e-12), bins + 1)
    counts_before, _ = np.histogram(before, edges)
    counts_after, _ = np.histogram(after, edges)
    return [
        {"gamma": round(float((lo + hi) / 2), 6), "baseline": int(b), "sparse": int(a)}
        for lo, hi, b, a in zip(edges[:-1], edges[1:], counts_before, counts_after, strict=True)
    ]


@dataclass
class PenaltySchedule:
    """The coefficient of the L1 penalty over training (see the module docstring)."""

    kind: str  # one of SCHEDULES
    base: float
    epochs: int
    target: float = 0.5
    ap50_floor: float = 0.9
    gain: float = 2.0
    current: float = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}")
        self.current = self.base

    def coefficient(self, epoch: int) -> float:
        """The coefficient to use during ``epoch`` (0-based)."""
        if self.kind == "linear_decay":
            return self.base * (1 - 0.9 * epoch / self.epochs)
        return self.current  # constant never changes it; dynamic adapts it in observe()

    def planned_sparsity(self, epoch: int) -> float:
        return self.target * (epoch + 1) / self.epochs

    def observe(self, epoch: int, sparsity: float, ap50: float, ap50_start: float) -> None:
        """Feed back the end-of-epoch measurements; only ``dynamic`` reacts."""
        if self.kind != "dynamic":
            return
        if ap50 < self.ap50_floor * ap50_start or sparsity >= self.planned_sparsity(epoch):
            self.current /= self.gain
        else:
            self.current *= self.gain
        self.current = float(np.clip(self.current, self.base / 1000, self.base * 1000))
