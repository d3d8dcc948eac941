"""Pruning to a budget: plan costs against thop after real surgery, the bisection, unreachable
targets, the per-layer cap and the cost-aware ranking."""

from __future__ import annotations

import math
import re

import pytest
import torch

from stages.common import budget as B
from stages.common import yolo
from stages.common.cli import UserError
from stages.prune import (
    LATENCY_STEPS,
    active_budget,
    apply,
    bn_gammas,
    choose_plan,
    latency_measure,
    make_prunable,
    plan,
    trace,
)
from tests.test_prune import _model

IMGSZ = 128


@pytest.mark.parametrize(
    ("cfg", "ratio", "method", "cost_aware"),
    [
        ("yolov8n.yaml", 0.3, "global", False),
        ("yolov8n.yaml", 0.6, "uniform", False),
        ("yolov8n.yaml", 0.7, "global", True),
        ("yolov8n-ghost.yaml", 0.5, "global", False),  # depthwise convs
    ],
)
def test_plan_cost_is_exactly_thops_count_after_surgery(
    cfg: str, ratio: float, method: str, cost_aware: bool
) -> None:
    model = _model(cfg, seed=2)
    graph = trace(model)
    shapes = B.conv_shapes(model, IMGSZ)
    saved = B.channel_macs(shapes, graph.inputs) if cost_aware else None
    chosen = plan(graph, bn_gammas(model), ratio, method, 8, 8, group_macs=saved)
    params, macs = B.pruned_cost(shapes, graph.inputs, chosen.removed)
    before = yolo.model_size(model, IMGSZ)
    assert B.pruned_cost(shapes, graph.inputs, set()) == (
        before["params"],
        round(before["macs_g"] * 1e9),
    )
    apply(model, graph, chosen.removed, torch.rand(1, 3, 64, 64))
    after = yolo.model_size(model, IMGSZ)
    assert params == after["params"] < before["params"]
    assert macs == round(after["macs_g"] * 1e9)


def test_bisection_finds_the_smallest_ratio_within_the_target() -> None:
    def steps(ratio: float) -> float:  # 100 at ratio 0, down by 10 per tenth
        return 100 - 10 * math.floor(ratio * 10)

    found = B.smallest_ratio_within(steps, 55)
    assert found.achieved == 50 and found.ratio == pytest.approx(0.5, abs=1e-6)
    # One step less pruning would miss the target: the ratio is as small as it can be.
    assert any(v > 55 and found.ratio - r < 1e-6 for r, v in found.tried)
    with pytest.raises(B.Unreachable) as err:
        B.smallest_ratio_within(steps, 5)  # even ratio ~1 leaves 10
    assert (err.value.smallest, err.value.largest) == (10, 100)
    with pytest.raises(B.Unreachable):
        B.smallest_ratio_within(steps, 100)  # the unpruned model already meets it


def test_max_layer_ratio_caps_every_space() -> None:
    model = _model("yolov8n.yaml", seed=4)
    graph = trace(model)
    chosen = plan(graph, bn_gammas(model), 0.9, "global", 1, 1, max_layer_ratio=0.5)
    for space in chosen.spaces:
        size = space.fixed + len(space.groups)
        assert space.kept >= math.ceil(size / 2), space.convs
    uncapped = plan(graph, bn_gammas(model), 0.9, "global", 1, 1)
    assert any(s.kept < math.ceil((s.fixed + len(s.groups)) / 2) for s in uncapped.spaces)


def test_cost_aware_ranking_removes_the_expensive_channel_of_two_alike() -> None:
    cheap, costly = [("a", 0)], [("b", 0)]
    importance = {id(cheap): 0.5, id(costly): 0.5}
    ranked = B.cost_aware(importance, [cheap, costly], {("a", 0): 10, ("b", 0): 1000})
    assert ranked[id(costly)] < ranked[id(cheap)]  # less important per MAC: removed first
    assert ranked[id(cheap)] == pytest.approx(0.05)


def test_channel_macs_by_hand() -> None:
    """A 3x3 conv (4 -> 6 channels, 8x8 output) read by a 1x1 conv (6 -> 5, 8x8 output):
    removing one of the first conv's channels saves 64 x 4 x 9 of its own and 64 x 5 x 1 of
    the reader's MACs."""
    shapes = {
        "first": B.ConvShape(4, 6, 1, 9, 64, True),
        "reader": B.ConvShape(6, 5, 1, 1, 64, True),
    }
    inputs = {"reader": [("first", i) for i in range(6)]}
    saved = B.channel_macs(shapes, inputs)
    assert saved[("first", 2)] == 64 * 4 * 9 + 64 * 5
    assert saved[("reader", 0)] == 64 * 6
    params, macs = B.pruned_cost(shapes, inputs, {("first", 2)})
    assert params == (5 * 4 * 9 + 5) + (5 * 5 + 5)
    assert macs == 64 * 5 * 4 * 9 + 64 * 5 * 5


def _cfg(**overrides: object) -> dict:
    cfg = {
        "ratio": 0.5,
        "method": "global",
        "min_channels": 8,
        "round_to": 8,
        "max_layer_ratio": 1.0,
        "importance": "gamma",
        "budget": {"params_m": None, "gflops": None, "latency_ms": None, "runtime": "torch-cpu"},
    }
    budget = {**cfg["budget"], **overrides.pop("budget", {})}
    return {**cfg, **overrides, "budget": budget}


@pytest.fixture(scope="module")
def traced() -> tuple:
    model = make_prunable(_model("yolov8n.yaml", seed=6))
    return model, trace(model), bn_gammas(model)


@pytest.mark.parametrize(
    ("key", "target", "importance"),
    [("params_m", 1.2, "gamma"), ("gflops", 0.25, "gamma"), ("gflops", 0.25, "gamma_per_flop")],
)
def test_a_params_or_flops_budget_is_met_within_one_step(
    traced: tuple, key: str, target: float, importance: str
) -> None:
    model, graph, gammas = traced
    cfg = _cfg(importance=importance, budget={key: target})
    chosen, how = choose_plan(model, graph, gammas, cfg, IMGSZ, ())
    params, macs = B.pruned_cost(B.conv_shapes(model, IMGSZ), graph.inputs, chosen.removed)
    achieved = params / 1e6 if key == "params_m" else 2 * macs / 1e9
    assert how["budget_achieved"] == pytest.approx(achieved, abs=1e-4) and achieved <= target
    assert how["ratio_from"] == f"searched for prune.budget.{key}"
    # A hair less pruning (the step below the ratio found) is over the target.
    shapes = B.conv_shapes(model, IMGSZ)
    per_mac = B.channel_macs(shapes, graph.inputs) if importance == "gamma_per_flop" else None
    below = plan(graph, gammas, how["ratio"] - 1e-6, "global", 8, 8, group_macs=per_mac)
    p, m = B.pruned_cost(shapes, graph.inputs, below.removed)
    assert (p / 1e6 if key == "params_m" else 2 * m / 1e9) > target


def test_an_unreachable_budget_names_the_reachable_range(traced: tuple) -> None:
    model, graph, gammas = traced
    with pytest.raises(UserError, match=r"prune\.budget\.gflops = 0\.001 cannot be met") as err:
        choose_plan(model, graph, gammas, _cfg(budget={"gflops": 0.001}), IMGSZ, ())
    smallest, largest = re.search(r"Set a value in \[([\d.]+), ([\d.]+)\)", str(err.value)).groups()
    assert 0.001 < float(smallest) < float(largest)
    assert float(largest) == pytest.approx(yolo.model_size(model, IMGSZ)["flops_g"], rel=1e-3)
    with pytest.raises(UserError, match="cannot be met"):  # more than the model has
        choose_plan(model, graph, gammas, _cfg(budget={"params_m": 100.0}), IMGSZ, ())
    with pytest.raises(UserError, match=r"prune\.budget sets params_m and gflops"):
        active_budget(_cfg(budget={"params_m": 1.0, "gflops": 0.2}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_a_tensorrt_latency_budget_without_a_gpu_is_refused_with_the_reason(traced: tuple):
    model, graph, gammas = traced
    cfg = _cfg(budget={"latency_ms": 5.0, "runtime": "tensorrt"})
    with pytest.raises(UserError, match="'tensorrt' cannot be measured here: no CUDA device"):
        choose_plan(model, graph, gammas, cfg, 64, ())


def test_a_latency_search_on_a_tiny_model_converges(traced: tuple) -> None:
    model, graph, gammas = traced
    measure = latency_measure(model, graph, "torch-cpu", 64)
    full = measure(set())
    thin = measure(plan(graph, gammas, 0.9, "global", 8, 8).removed)
    target = (full + thin) / 2
    cfg = _cfg(budget={"latency_ms": target, "runtime": "torch-cpu"})
    chosen, how = choose_plan(model, graph, gammas, cfg, 64, ())
    assert how["budget_achieved"] <= target
    assert len(how["latency_measured_ms"]) == 2 + LATENCY_STEPS  # both ends, then bisection
    assert 0 < how["ratio"] < 1 and chosen.removed
