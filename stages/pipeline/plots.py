"""Plots that a stage and a tool share (evaluate and the pareto tool: AP50 against cost)."""

from __future__ import annotations

from pathlib import Path

from stages.pipeline.outputs import save_figure


def plot_accuracy_vs_cost(
    rows: list[dict],
    name_key: str,
    costs: dict[str, str],
    path: Path,
    ylabel: str = "AP50",
    fronts: dict[str, str] | None = None,
) -> None:
    """One panel per cost (column -> axis label): AP50 against it, one labelled point per row.

    With ``fronts`` (cost column -> flag column), the flagged rows are joined as the Pareto front.
    Rows without a value for a cost are left out of its panel.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(costs), figsize=(6 * len(costs), 4.5), squeeze=False)
    for ax, (cost, label) in zip(axes[0], costs.items(), strict=True):
        shown = [r for r in rows if r.get(cost) is not None]
        ax.scatter([r[cost] for r in shown], [r["ap50"] for r in shown], color="tab:blue")
        if fronts:
            front = sorted((r for r in shown if r[fronts[cost]]), key=lambda r: r[cost])
            ax.plot([r[cost] for r in front], [r["ap50"] for r in front], "o-", color="tab:red")
            ax.legend(["all", "Pareto front"])
        for r in shown:
            ax.annotate(
                r[name_key],
                (r[cost], r["ap50"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize="small",
            )
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs {label}")
        ax.grid(alpha=0.3)
    save_figure(fig, path)
