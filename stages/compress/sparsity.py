"""Sparsity-aware training: an L1 penalty on BatchNorm scales (gamma), and its schedule.

Network slimming (Liu et al., 2017) adds lambda * sum|gamma| over the BatchNorm scales to the
loss, so that channels the network does not need go to zero and can be pruned for free. Two ways
to apply it:

- ``proximal`` (the default): after the optimizer's step, each penalised gamma is
  soft-thresholded, gamma <- sign(gamma) * max(|gamma| - lr * lambda / d, 0), where d is the
  optimizer's per-coordinate step scale: sqrt(v_hat) + eps for Adam and AdamW, 1 for SGD
  (Deleu & Bengio 2021, arXiv:2102.03869; ProxGen, Yun et al., NeurIPS 2021). A gamma whose
  smoothed task gradient stays below lambda goes exactly to 0 and stays there; one above it stays
  alive. ``group`` soft-thresholds the norm of each tied group of channels (the unit pruning
  removes) instead of each channel.
- ``subgradient``: lambda * sign(gamma) added to the gradient before the step (network slimming's
  own form). It works under SGD over long schedules; Adam normalises every step to about lr,
  so in a few hundred steps no gamma can travel from ~1 to 0 (Sigma lr caps the distance).

Each channel's lambda can be weighted by the MACs its removal saves (:func:`flops_weights`), so
that the zeros fall where the FLOPs are: the high-resolution early layers.

The coefficient lambda follows a :class:`PenaltySchedule`:

- ``constant``: lambda every step;
- ``linear_decay``: lambda * (1 - 0.9 * e / E) at epoch e of E (the paper's public code);
- ``dynamic``: adapted at every step toward a plan: the near-zero fraction should grow linearly
  from its value at the start to ``target`` by 80% of the steps, then stay there. Behind plan,
  lambda is multiplied by ``gain`` ** (1 / steps per epoch); beyond ``target``, divided by that;
  in between (ahead of plan, not past the target) it is left alone: zeros that come early cost
  nothing to keep. After each epoch accuracy comes first: lambda is divided by ``gain`` when val
  AP50 < ``ap50_floor`` * AP50 at the start. lambda stays within [lambda / 1000, lambda * 1000]
  of its start, ``coefficient``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

SCHEDULES = ("constant", "linear_decay", "dynamic")
FORMS = ("proximal", "group", "subgradient")
PLAN_END = 0.8  # the dynamic plan reaches its target at this fraction of the steps


def named_penalized_batchnorms(
    model: nn.Module, exclude: Sequence[str] = ()
) -> list[tuple[str, nn.BatchNorm2d]]:
    """(name, module) of every BatchNorm2d of ``model`` whose qualified name starts with no
    excluded prefix."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and not name.startswith(tuple(exclude))
    ]


def penalized_batchnorms(model: nn.Module, exclude: Sequence[str] = ()) -> list[nn.BatchNorm2d]:
    """Every BatchNorm2d of ``model`` whose qualified name starts with no excluded prefix."""
    return [m for _, m in named_penalized_batchnorms(model, exclude)]


def add_l1_subgradient(
    batchnorms: Sequence[nn.BatchNorm2d],
    gamma_coefficient: float,
    beta_coefficient: float = 0.0,
    weights: Sequence[torch.Tensor] | None = None,
) -> None:
    """Add the subgradient of s*|gamma| (and of s_beta*|beta|) to the BN parameters' gradients;
    ``weights`` (one tensor per BatchNorm) scale each channel's gamma coefficient.

    Call it on unscaled gradients (after ``GradScaler.unscale_``). sign(0) = 0, the usual choice.
    """
    weights = weights or [1.0] * len(batchnorms)
    with torch.no_grad():
        for bn, weight in zip(batchnorms, weights, strict=True):
            for param, coefficient, scale in (
                (bn.weight, gamma_coefficient, weight),
                (bn.bias, beta_coefficient, 1.0),
            ):
                if coefficient == 0:
                    continue
                step = torch.sign(param) * coefficient * scale
                if param.grad is None:
                    param.grad = step
                else:
                    param.grad.add_(step)


def soft_threshold(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """The proximal operator of threshold * |x|, elementwise: sign(x) * max(|x| - threshold, 0)."""
    return torch.sign(x) * torch.clamp(x.abs() - threshold, min=0)


def group_soft_threshold(
    x: torch.Tensor, threshold: torch.Tensor, groups: torch.Tensor
) -> torch.Tensor:
    """The proximal operator of the group lasso: each group g (``groups[i]`` is the group of
    ``x[i]``) is scaled by max(0, 1 - t_g * sqrt(|g|) / ||x_g||), t_g the mean of ``threshold``
    over the group. A group of one channel is :func:`soft_threshold` exactly."""
    count = torch.zeros(int(groups.max()) + 1, dtype=x.dtype).index_add_(
        0, groups, torch.ones_like(x)
    )
    norm = torch.zeros_like(count).index_add_(0, groups, x * x).sqrt()
    mean_t = torch.zeros_like(count).index_add_(0, groups, threshold.expand_as(x)) / count
    keep = torch.clamp(1 - mean_t * count.sqrt() / norm.clamp_min(1e-30), min=0)
    return x * keep[groups]


def step_scale(state: dict, group: dict) -> torch.Tensor | float:
    """The denominator d of an optimizer's last step for a parameter with this ``state`` in this
    param ``group``: sqrt(v_hat) + eps for the Adam family (bias-corrected second moment, as
    torch's Adam and AdamW compute it), 1 for SGD."""
    if "exp_avg_sq" not in state:
        return 1.0
    step = float(state["step"])
    correction = 1 - group["betas"][1] ** step
    return (state["exp_avg_sq"] / correction).sqrt() + group["eps"]


def proximal_l1_step(
    optimizer: torch.optim.Optimizer,
    batchnorms: Sequence[nn.BatchNorm2d],
    coefficient: float,
    groups: torch.Tensor | None = None,
    weights: Sequence[torch.Tensor] | None = None,
) -> None:
    """Soft-threshold the scales of ``batchnorms`` after ``optimizer`` stepped them: per channel,
    or per group with ``groups`` (the group of each channel, in the order of the batchnorms'
    concatenated scales); ``weights`` (one tensor per BatchNorm) scale each channel's
    coefficient."""
    if coefficient == 0 or not batchnorms:
        return
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    gammas = [bn.weight for bn in batchnorms]
    weights = weights or [1.0] * len(gammas)
    with torch.no_grad():
        thresholds = [
            group_of[id(gamma)]["lr"]
            * coefficient
            / step_scale(optimizer.state.get(gamma, {}), group_of[id(gamma)])
            * weight
            * torch.ones_like(gamma)
            for gamma, weight in zip(gammas, weights, strict=True)
        ]
        if groups is None:
            for gamma, threshold in zip(gammas, thresholds, strict=True):
                gamma.copy_(soft_threshold(gamma, threshold))
            return
        flat = torch.cat([g.reshape(-1) for g in gammas])
        shrunk = group_soft_threshold(flat, torch.cat(thresholds), groups.to(flat.device))
        for gamma, part in zip(gammas, shrunk.split([g.numel() for g in gammas]), strict=True):
            gamma.copy_(part)


def flops_weights(macs_saved: Sequence[float]) -> torch.Tensor:
    """Per-channel penalty weights proportional to the MACs each channel's removal saves,
    normalised to mean 1 (MorphNet's FLOPs regulariser, Gordon et al. 2018, on the same scales):
    a channel that costs more must earn its place with a larger gradient."""
    saved = torch.as_tensor(macs_saved, dtype=torch.float32)
    return saved / saved.mean()


def gamma_magnitudes(batchnorms: Sequence[nn.BatchNorm2d]) -> np.ndarray:
    """|gamma| of every channel of the given BatchNorms, as one float64 array."""
    return np.concatenate([bn.weight.detach().abs().double().cpu().numpy() for bn in batchnorms])


def sparsity_stats(gammas: np.ndarray, near_zero: float) -> dict[str, float]:
    """Total |gamma| and the fraction of channels with |gamma| below ``near_zero``."""
    return {"gamma_l1": float(gammas.sum()), "near_zero": float((gammas < near_zero).mean())}


def group_near_zero(gammas: np.ndarray, groups: np.ndarray, near_zero: float) -> float:
    """The fraction of groups whose largest |gamma| is below ``near_zero`` (pruning removes a
    group only as a whole, ranked by its largest member)."""
    largest = np.zeros(int(groups.max()) + 1)
    np.maximum.at(largest, groups, gammas)
    return float((largest < near_zero).mean())


LOG_BINS = 60  # log-spaced bins of the histogram above its smallest edge
SMALLEST_EDGE = 1e-4  # |gamma| below this (exact zeros included) fall in the first bin


def gamma_histogram(before: np.ndarray, after: np.ndarray) -> list[dict]:
    """Counts of |gamma| before and after sparse training over shared bins (a plot source): one
    bin [0, 1e-4) for the zeros, then log-spaced bins up to the largest |gamma|; each row's
    ``gamma`` is its bin's geometric centre (0 for the first)."""
    top = max(before.max(), after.max(), SMALLEST_EDGE * 10)
    edges = np.concatenate([[0.0], np.geomspace(SMALLEST_EDGE, top * (1 + 1e-9), LOG_BINS + 1)])
    counts_before, _ = np.histogram(before, edges)
    counts_after, _ = np.histogram(after, edges)
    centres = [0.0] + [math.sqrt(lo * hi) for lo, hi in itertools.pairwise(edges[1:])]
    return [
        {"gamma": float(f"{c:.6g}"), "baseline": int(b), "sparse": int(a)}
        for c, b, a in zip(centres, counts_before, counts_after, strict=True)
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
    steps_per_epoch: int = 1
    start_sparsity: float = 0.0
    current: float = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}")
        self.current = self.base

    def coefficient(self, epoch: int) -> float:
        """The coefficient to use during ``epoch`` (0-based)."""
        if self.kind == "linear_decay":
            return self.base * (1 - 0.9 * epoch / self.epochs)
        return self.current  # constant never changes it; dynamic adapts it as it goes

    @property
    def adapts_per_step(self) -> bool:
        """Whether :meth:`observe_step` reads the near-zero fraction (``dynamic`` only)."""
        return self.kind == "dynamic"

    def planned_sparsity(self, step: int) -> float:
        """The near-zero fraction the dynamic plan wants after optimizer step ``step`` (0-based)."""
        total = self.epochs * self.steps_per_epoch
        done = min(1.0, (step + 1) / (PLAN_END * total))
        return self.start_sparsity + (self.target - self.start_sparsity) * done

    def observe_step(self, step: int, sparsity: float) -> None:
        """Feed back the near-zero fraction after optimizer step ``step``; only ``dynamic``
        reacts."""
        if not self.adapts_per_step:
            return
        factor = self.gain ** (1 / self.steps_per_epoch)
        if sparsity < self.planned_sparsity(step):
            self._set(self.current * factor)
        elif sparsity > self.target:
            self._set(self.current / factor)

    def observe_epoch(self, ap50: float, ap50_start: float) -> None:
        """Feed back val AP50 after an epoch: ``dynamic`` eases the penalty below the floor."""
        if self.kind == "dynamic" and ap50 < self.ap50_floor * ap50_start:
            self._set(self.current / self.gain)

    def _set(self, value: float) -> None:
        self.current = float(np.clip(value, self.base / 1000, self.base * 1000))
