"""Sparse training: the L1 subgradient, its independence from AMP scaling, and the schedules."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from stages.compress.sparsity import (
    PenaltySchedule,
    add_l1_subgradient,
    gamma_magnitudes,
    penalized_batchnorms,
    sparsity_stats,
)
from stages.sparse_train import SCHEMA
from stages.yolo.sparse_trainer import SparseTrainer
from tests.test_params import expect_param_error


def _net(seed: int = 0, width: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 4, 1),
    )
    with torch.no_grad():  # gammas of both signs and one exact zero
        for bn in penalized_batchnorms(net):
            bn.weight.copy_(torch.randn(width))
            bn.bias.copy_(torch.randn(width))
        net[1].weight[0] = 0.0
    return net


def test_subgradient_is_coefficient_times_sign_exactly() -> None:
    net = _net()
    net(torch.randn(2, 3, 8, 8)).square().mean().backward()
    bns = penalized_batchnorms(net)
    before = [(bn.weight.grad.clone(), bn.bias.grad.clone()) for bn in bns]
    add_l1_subgradient(bns, 0.3, 0.05)
    for bn, (gw, gb) in zip(bns, before, strict=True):
        gamma, beta = bn.weight.detach().numpy(), bn.bias.detach().numpy()
        expected_w = gw.numpy() + np.float32(0.3) * np.sign(gamma).astype(np.float32)
        expected_b = gb.numpy() + np.float32(0.05) * np.sign(beta).astype(np.float32)
        np.testing.assert_array_equal(bn.weight.grad.numpy(), expected_w)
        np.testing.assert_array_equal(bn.bias.grad.numpy(), expected_b)
    assert bns[0].weight.grad[0] == before[0][0][0]  # sign(0) = 0: a zero gamma is left alone


def test_exclude_skips_layers_by_name_prefix() -> None:
    net = _net()
    assert penalized_batchnorms(net, exclude=["1"]) == [net[4]]
    assert penalized_batchnorms(net, exclude=[]) == [net[1], net[4]]


def _one_trainer_step(
    net: nn.Module, scale: float | None, coefficient: float, loss_scale: float = 1e-3
) -> nn.Module:
    """Run SparseTrainer.optimizer_step (the real method) on a small net with SGD(lr=1); the
    default ``loss_scale`` keeps gradient clipping inactive."""
    net = copy.deepcopy(net)
    trainer = SparseTrainer.__new__(SparseTrainer)  # no dataset: only the step is exercised
    trainer.model = net
    trainer.optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
    trainer.ema = None
    trainer.epoch = 0
    trainer.batchnorms = penalized_batchnorms(net)
    trainer.beta_coefficient = 0.0
    trainer.schedule = PenaltySchedule("constant", coefficient, epochs=1)
    loss = net(torch.ones(1, 3, 4, 4)).mean() * loss_scale
    trainer.scaler.scale(loss).backward()
    trainer.optimizer_step()
    return net


@pytest.mark.parametrize(
    ("scale", "loss_scale"),
    [(None, 1e-3), (2.0**20, 1e-3), (None, 1e4), (2.0**10, 1e4)],  # 1e4: the gradient is clipped
)
def test_penalty_is_applied_to_unscaled_clipped_gradients(
    scale: float | None, loss_scale: float
) -> None:
    """With SGD(lr=1) a gamma moves by -(clipped loss gradient + c*sign(gamma)) whatever the AMP
    scale, and whether or not clipping shrank the loss gradient."""
    net, c = _net(), 0.25
    no_penalty = _one_trainer_step(net, scale, 0.0, loss_scale)
    penalised = _one_trainer_step(net, scale, c, loss_scale)
    for bn_ref, bn_pen, bn0 in zip(
        penalized_batchnorms(no_penalty),
        penalized_batchnorms(penalised),
        penalized_batchnorms(net),
        strict=True,
    ):
        added = (bn_ref.weight - bn_pen.weight).detach()  # the extra step the penalty caused
        expected = c * torch.sign(bn0.weight.detach())
        torch.testing.assert_close(added, expected, rtol=0, atol=1e-6)


def test_constant_and_linear_decay_follow_their_formulas() -> None:
    constant = PenaltySchedule("constant", 1e-3, epochs=10)
    linear = PenaltySchedule("linear_decay", 1e-3, epochs=10)
    for e in range(10):
        assert constant.coefficient(e) == 1e-3
        assert linear.coefficient(e) == pytest.approx(1e-3 * (1 - 0.9 * e / 10), rel=1e-12)
        linear.observe(e, sparsity=0.0, ap50=0.0, ap50_start=1.0)  # no effect
    assert linear.coefficient(0) == 1e-3 and linear.coefficient(10) == pytest.approx(1e-4)


def test_dynamic_rules() -> None:
    s = PenaltySchedule("dynamic", 1e-3, epochs=4, target=0.8, ap50_floor=0.9, gain=2.0)
    s.observe(0, sparsity=0.1, ap50=0.95, ap50_start=1.0)  # behind plan (0.2), accuracy fine: up
    assert s.coefficient(1) == pytest.approx(2e-3)
    s.observe(1, sparsity=0.5, ap50=0.95, ap50_start=1.0)  # ahead of plan (0.4): ease off
    assert s.coefficient(2) == pytest.approx(1e-3)
    s.observe(2, sparsity=0.1, ap50=0.80, ap50_start=1.0)  # accuracy below floor: down, first
    assert s.coefficient(3) == pytest.approx(5e-4)
    for _ in range(30):  # bounded to base * 1000
        s.observe(0, sparsity=0.0, ap50=1.0, ap50_start=1.0)
    assert s.coefficient(0) == pytest.approx(1.0)


def test_dynamic_drives_a_small_model_toward_its_target() -> None:
    """A small conv net fits a fixed teacher while the dynamic penalty raises its sparsity."""
    torch.manual_seed(1)
    teacher, student = _net(seed=1), _net(seed=2, width=16)
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        y = teacher(x)
    bns = penalized_batchnorms(student)
    opt = torch.optim.Adam(student.parameters(), lr=0.02)
    schedule = PenaltySchedule("dynamic", 1e-3, epochs=8, target=0.5, ap50_floor=0.0, gain=2.0)
    near_zero, history = 0.05, []
    start = sparsity_stats(gamma_magnitudes(bns), near_zero)["near_zero"]
    for epoch in range(8):
        for _ in range(25):
            opt.zero_grad()
            (student(x) - y).square().mean().backward()
            add_l1_subgradient(bns, schedule.coefficient(epoch))
            opt.step()
        sparsity = sparsity_stats(gamma_magnitudes(bns), near_zero)["near_zero"]
        history.append((schedule.coefficient(epoch), sparsity))
        schedule.observe(epoch, sparsity, ap50=1.0, ap50_start=1.0)
    coefficients = [c for c, _ in history]
    assert max(coefficients) > coefficients[0]  # it pushed harder while behind plan
    assert history[-1][1] >= 0.4 > start  # and reached (most of) the 50% target


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("coefficient", -1e-4, "sparse_train.coefficient = -0.0001 is invalid"),
        ("schedule", "cosine", "sparse_train.schedule = 'cosine' is invalid: expected one of"),
        (
            "target_sparsity",
            1.0,
            "sparse_train.target_sparsity = 1.0 is invalid: expected a number in (0, 1)",
        ),
        ("target_sparsity", 0.0, "sparse_train.target_sparsity = 0.0 is invalid"),
        ("gain", 1.0, "sparse_train.gain = 1.0 is invalid"),
        ("exclude", "model.22", "sparse_train.exclude = 'model.22' is invalid"),
    ],
)
def test_bad_params_name_the_key(key: str, value: object, message: str) -> None:
    expect_param_error(SCHEMA, "sparse_train", key, value, message)
