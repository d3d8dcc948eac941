"""Stage `sparse_train`: continue training the baseline with an L1 penalty on BatchNorm scales.

Network slimming (Liu et al., 2017) adds s * sum|gamma| over the BatchNorm scales (gamma) to the
loss, so channels the detector does not need drift to zero and can be pruned with little loss.
Its gradient, s * sign(gamma), is added to each gamma's gradient right before the optimizer step,
**after** the AMP gradient scaler has unscaled the gradients: the penalty is then the same with
and without mixed precision (added to still-scaled gradients it would shrink by the loss scale,
a known way for sparse training to do nothing). It is also added after ultralytics' gradient
clipping (norm 10), which is there to tame the detection loss's spikes: clipped together, the
penalty would shrink whenever the detection gradient is large, so its strength would follow the
batch rather than the schedule.

The coefficient s follows ``sparse_train.schedule``:

- ``constant``: s every epoch;
- ``linear_decay``: s * (1 - 0.9 * e / E) at epoch e of E (the paper's public code);
- ``dynamic``: starts at s and is adapted after every epoch e (0-based) from the measured
  fraction f_e of near-zero gammas (|gamma| < ``near_zero``) and the val AP50 a_e. The plan is
  to reach ``target_sparsity`` by the last epoch along p_e = target * (e + 1) / E. Accuracy comes
  first: if a_e < ``ap50_floor`` * a_start (a_start: AP50 of the model before sparse training),
  s is divided by ``gain``; otherwise s is multiplied by ``gain`` while f_e < p_e (behind plan)
  and divided by it once f_e >= p_e (on plan: the pressure eases so useful channels can recover).
  s stays within [s / 1000, s * 1000] of its starting value.

Reads: models/baseline.pt, data/yolo. Writes: models/sparse.pt, reports/sparse_train/results.csv
(ultralytics' per-epoch losses and val metrics plus the coefficient, the total |gamma| and the
near-zero fraction), reports/sparse_train/sparsity.json (metrics), gamma_hist.csv (|gamma|
histogram before/after, a DVC plot) and gamma_hist.png.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from ultralytics.utils.torch_utils import unwrap_model

from stages.common import cli, distributed, yolo
from stages.common import params as P
from stages.common.outputs import print_summary, save_figure, write_csv, write_json, written
from stages.common.runtime import PROJECT_ROOT

BASELINE = PROJECT_ROOT / "models" / "baseline.pt"
MODEL_OUT = PROJECT_ROOT / "models" / "sparse.pt"
REPORT_DIR = PROJECT_ROOT / "reports" / "sparse_train"

SCHEMA = {
    **P.COMMON,
    "sparse_train": P.Section(
        {
            **yolo.TRAINING,
            "schedule": P.Choice("constant", "linear_decay", "dynamic"),
            "coefficient": P.Float(0, 1),
            "beta_coefficient": P.Float(0, 1),
            "near_zero": P.Float(0, 1, open_lo=True),
            "target_sparsity": P.Float(0, 1, open_lo=True, open_hi=True),
            "ap50_floor": P.Float(0, 1),
            "gain": P.Float(1, 100, open_lo=True),
            "exclude": P.StrList(),
        }
    ),
}


# --- the algorithm: pure functions on modules and numbers -------------------------------------


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


@dataclass
class PenaltySchedule:
    """The coefficient of the L1 penalty over training (see the module docstring)."""

    kind: str  # constant | linear_decay | dynamic
    base: float
    epochs: int
    target: float = 0.5
    ap50_floor: float = 0.9
    gain: float = 2.0
    current: float = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear_decay", "dynamic"):
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


# --- ultralytics glue ----------------------------------------------------------------------------


class SparseTrainer(yolo.ModelKeepingTrainer):
    """Trains with the L1 penalty added to unscaled gradients and logs sparsity every epoch.

    The settings are class attributes: use :func:`sparse_trainer` for a configured subclass.
    """

    schedule: PenaltySchedule
    beta_coefficient: float = 0.0
    near_zero: float = 0.01
    exclude: Sequence[str] = ()
    ap50_start: float = 0.0

    def _setup_train(self) -> None:
        super()._setup_train()
        self.batchnorms = penalized_batchnorms(unwrap_model(self.model), self.exclude)

    def optimizer_step(self) -> None:
        """ultralytics' step (unscale, clip, step, EMA) with the penalty after unscaling and
        clipping."""
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
        add_l1_subgradient(
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
            gammas = gamma_magnitudes(penalized_batchnorms(evaluated, self.exclude))
            stats = sparsity_stats(gammas, self.near_zero)
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


def sparse_trainer(cfg: dict, ap50_start: float) -> type[SparseTrainer]:
    """The trainer for a validated ``sparse_train`` section, starting from AP50 ``ap50_start``."""
    schedule = PenaltySchedule(
        cfg["schedule"],
        cfg["coefficient"],
        cfg["epochs"],
        cfg["target_sparsity"],
        cfg["ap50_floor"],
        cfg["gain"],
    )
    return yolo.configured_trainer(
        SparseTrainer,
        schedule=schedule,
        beta_coefficient=cfg["beta_coefficient"],
        near_zero=cfg["near_zero"],
        exclude=tuple(cfg["exclude"]),
        ap50_start=ap50_start,
    )


def gamma_histogram(before: np.ndarray, after: np.ndarray, bins: int = 80) -> list[dict]:
    """Counts of |gamma| before and after sparse training over shared bins (a DVC plot source)."""
    edges = np.linspace(0, max(before.max(), after.max(), 1e-12), bins + 1)
    counts_before, _ = np.histogram(before, edges)
    counts_after, _ = np.histogram(after, edges)
    return [
        {"gamma": round(float((lo + hi) / 2), 6), "baseline": int(b), "sparse": int(a)}
        for lo, hi, b, a in zip(edges[:-1], edges[1:], counts_before, counts_after, strict=True)
    ]


def plot_histogram(rows: list[dict], near_zero: float, path: Any) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    centers = [r["gamma"] for r in rows]
    width = centers[1] - centers[0] if len(centers) > 1 else 1.0
    for key, label in (("baseline", "baseline"), ("sparse", "after sparse training")):
        ax.bar(centers, [r[key] for r in rows], width, alpha=0.6, label=label)
    ax.axvline(
        near_zero, color="k", linestyle="--", linewidth=1, label=f"near zero ({near_zero:g})"
    )
    ax.set_yscale("log")
    ax.set_xlabel("|gamma| of BatchNorm channels")
    ax.set_ylabel("channels")
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    params = P.load(SCHEMA)
    cfg = params["sparse_train"]
    args = yolo.training_args(params, cfg)
    model = yolo.load_detector(BASELINE)
    bns_before = penalized_batchnorms(model.model, cfg["exclude"])
    if not bns_before:
        raise P.ParamsError(
            f"params.yaml: sparse_train.exclude = {cfg['exclude']!r} excludes every BatchNorm."
        )
    gammas_before = gamma_magnitudes(bns_before)  # a copy: training changes these modules
    ap50_before = yolo.val_ap50(model, "sparse-start", params)

    sparse = yolo.train(
        model,
        "sparse_train",
        MODEL_OUT,
        REPORT_DIR / "results.csv",
        trainer=sparse_trainer(cfg, ap50_before),
        **args,
    )
    gammas_after = gamma_magnitudes(penalized_batchnorms(sparse.model, cfg["exclude"]))
    ap50_after = yolo.val_ap50(sparse, "sparse-end", params)
    near = cfg["near_zero"]
    before, after = sparsity_stats(gammas_before, near), sparsity_stats(gammas_after, near)
    metrics = {
        "near_zero_before": round(before["near_zero"], 4),
        "near_zero_after": round(after["near_zero"], 4),
        "gamma_l1_before": round(before["gamma_l1"], 2),
        "gamma_l1_after": round(after["gamma_l1"], 2),
        "ap50_before": round(ap50_before, 4),
        "ap50_after": round(ap50_after, 4),
        "ap50_retained": round(ap50_after / max(ap50_before, 1e-9), 4),
        "channels": int(gammas_after.size),
    }
    write_json(REPORT_DIR / "sparsity.json", metrics)
    histogram = gamma_histogram(gammas_before, gammas_after)
    write_csv(REPORT_DIR / "gamma_hist.csv", histogram)
    plot_histogram(histogram, near, REPORT_DIR / "gamma_hist.png")
    print_summary(
        f"sparse_train ({cfg['schedule']}, s={cfg['coefficient']:g})",
        [
            (
                f"channels with |gamma| < {near:g}",
                f"{metrics['near_zero_before']:.1%} -> {metrics['near_zero_after']:.1%}",
            ),
            ("sum |gamma|", f"{metrics['gamma_l1_before']:.1f} -> {metrics['gamma_l1_after']:.1f}"),
            (
                "val AP50",
                f"{ap50_before:.3f} -> {ap50_after:.3f} ({metrics['ap50_retained']:.1%} retained)",
            ),
            written(MODEL_OUT, REPORT_DIR),
        ],
    )


if __name__ == "__main__":
    cli.run(main, __doc__)
