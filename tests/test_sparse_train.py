"""Sparse training: the proximal step and the subgradient against hand computations, their
independence from AMP scaling, the fixed point, Liu's diagnostic, the EMA, and the schedules."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from stages.compress.sparsity import (
    PenaltySchedule,
    add_l1_subgradient,
    flops_weights,
    gamma_histogram,
    gamma_magnitudes,
    group_soft_threshold,
    penalized_batchnorms,
    proximal_l1_step,
    soft_threshold,
    sparsity_stats,
)
from stages.pipeline.params import ParamsError
from stages.sparse_train import SCHEMA, penalized
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


def _trainer(net: nn.Module, optimizer: torch.optim.Optimizer, **settings: object) -> SparseTrainer:
    """A SparseTrainer with just what its optimizer_step reads (no dataset, no ultralytics run):
    the real method is exercised."""
    trainer = SparseTrainer.__new__(SparseTrainer)
    trainer.model = net
    trainer.optimizer = optimizer
    trainer.scaler = settings.pop("scaler", torch.amp.GradScaler("cpu", enabled=False))
    trainer.ema = settings.pop("ema", None)
    trainer.epoch = 0
    trainer.batchnorms = penalized_batchnorms(net)
    trainer.ema_batchnorms = penalized_batchnorms(trainer.ema.ema) if trainer.ema else []
    trainer.flat_groups = settings.pop("flat_groups", None)
    trainer.channel_weights = settings.pop("channel_weights", None)
    trainer.optimizer_steps = 0
    for key, value in settings.items():
        setattr(trainer, key, value)
    return trainer


def _steps(trainer: SparseTrainer, x: torch.Tensor, count: int) -> None:
    """``count`` real optimizer steps of ``trainer`` on a squared-output loss."""
    for _ in range(count):
        trainer.model(x).square().mean().backward()
        trainer.optimizer_step()


def _one_trainer_step(
    net: nn.Module, scale: float | None, coefficient: float, form: str, loss_scale: float = 1e-3
) -> nn.Module:
    """One SparseTrainer.optimizer_step on a small net with SGD(lr=1); the default
    ``loss_scale`` keeps gradient clipping inactive."""
    net = copy.deepcopy(net)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
    trainer = _trainer(
        net,
        torch.optim.SGD(net.parameters(), lr=1.0),
        scaler=scaler,
        form=form,
        schedule=PenaltySchedule("constant", coefficient, epochs=1),
    )
    loss = net(torch.ones(1, 3, 4, 4)).mean() * loss_scale
    trainer.scaler.scale(loss).backward()
    trainer.optimizer_step()
    return net


@pytest.mark.parametrize(
    ("scale", "loss_scale"),
    [(None, 1e-3), (2.0**20, 1e-3), (None, 1e4), (2.0**10, 1e4)],  # 1e4: the gradient is clipped
)
@pytest.mark.parametrize("form", ["subgradient", "proximal"])
def test_penalty_is_applied_to_unscaled_clipped_gradients(
    scale: float | None, loss_scale: float, form: str
) -> None:
    """With SGD(lr=1), whatever the AMP scale and whether or not clipping shrank the loss
    gradient: the subgradient moves a gamma by c*sign(gamma) more than the plain step, the
    proximal step soft-thresholds the plain step's result by c."""
    net, c = _net(), 0.25
    plain = penalized_batchnorms(_one_trainer_step(net, scale, 0.0, form, loss_scale))
    penalised = penalized_batchnorms(_one_trainer_step(net, scale, c, form, loss_scale))
    for ref, pen, start in zip(plain, penalised, penalized_batchnorms(net), strict=True):
        if form == "subgradient":
            expected = ref.weight - c * torch.sign(start.weight)
        else:
            expected = torch.sign(ref.weight) * torch.clamp(ref.weight.abs() - c, min=0)
        torch.testing.assert_close(pen.weight.detach(), expected.detach(), rtol=0, atol=1e-6)


def test_soft_threshold_and_its_group_form_by_hand() -> None:
    x = torch.tensor([0.5, -0.3, 0.05, 0.0, -0.08])
    torch.testing.assert_close(soft_threshold(x, 0.1), torch.tensor([0.4, -0.2, 0.0, 0.0, 0.0]))
    # groups {0, 1} (norm 0.5831, size 2) and {2, 3, 4}: t = 0.1 everywhere
    groups = torch.tensor([0, 0, 1, 1, 1])
    shrunk = group_soft_threshold(x, torch.full_like(x, 0.1), groups)
    keep = 1 - 0.1 * 2**0.5 / (0.5**2 + 0.3**2) ** 0.5
    torch.testing.assert_close(shrunk[:2], x[:2] * keep)
    assert torch.equal(shrunk[2:], torch.zeros(3))  # norm 0.094 < 0.1 * sqrt(3): the group goes
    singletons = group_soft_threshold(x, torch.full_like(x, 0.1), torch.arange(5))
    torch.testing.assert_close(singletons, soft_threshold(x, 0.1))


@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_the_proximal_step_is_the_hand_computed_threshold(optimizer: str) -> None:
    """After one step from fresh state: SGD's threshold is lr * lambda; AdamW's is
    lr * lambda / (|g| + eps), since its bias-corrected second moment is g^2 after one step."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.8, -0.5, 0.02, -0.01, 0.3, 0.0]))
    grad = torch.tensor([0.1, -0.2, 0.05, 0.001, -0.3, 0.02])
    lr, lam = 0.01, 0.5
    if optimizer == "SGD":
        opt = torch.optim.SGD([bn.weight], lr=lr)
    else:
        opt = torch.optim.AdamW([bn.weight], lr=lr, weight_decay=0.0)
    start = bn.weight.detach().clone()
    bn.weight.grad = grad.clone()
    opt.step()
    stepped = bn.weight.detach().clone()
    proximal_l1_step(opt, [bn], lam)
    scale = 1.0 if optimizer == "SGD" else grad.abs() + 1e-8
    expected = torch.sign(stepped) * torch.clamp(stepped.abs() - lr * lam / scale, min=0)
    torch.testing.assert_close(bn.weight.detach(), expected)
    assert optimizer == "SGD" or torch.allclose(stepped, start - lr * torch.sign(grad))


def test_a_gamma_with_a_small_gradient_goes_to_exactly_zero_and_stays() -> None:
    """The fixed point under AdamW: loss -k * gamma (the task wants gamma larger) with k below
    lambda drives gamma to exactly 0 and keeps it there; with k above lambda it stays alive."""
    lam = 0.01
    gammas = nn.Parameter(torch.tensor([1.0, 1.0]))
    pull = torch.tensor([0.5 * lam, 2.0 * lam])  # k per gamma
    opt = torch.optim.AdamW([gammas], lr=0.01, weight_decay=0.0)
    bn = nn.BatchNorm2d(2)
    bn.weight = gammas
    trajectory = []
    for _ in range(400):
        opt.zero_grad()
        (-(pull * gammas).sum()).backward()
        opt.step()
        proximal_l1_step(opt, [bn], lam)
        trajectory.append(gammas.detach().clone())
    small, large = torch.stack(trajectory).T
    first_zero = int((small == 0).nonzero()[0])
    assert first_zero < 200 and torch.all(small[first_zero:] == 0)  # exactly 0, and it stays
    assert large[-1] > 1.0  # the task's pull wins over the penalty


@pytest.mark.parametrize(
    ("optimizer", "lr"), [("AdamW", 0.004), ("SGD", 0.01)]
)  # SGD: the paper's profile
def test_liu_diagnostic_a_huge_coefficient_zeroes_every_gamma_within_the_default_steps(
    optimizer: str, lr: float
) -> None:
    """Network slimming's check of an implementation: with a very large coefficient, every
    penalised gamma must go to ~0, here within the default run's ~190 optimizer steps. The
    proximal step passes it; the subgradient under AdamW cannot (Adam caps each step at ~lr)."""
    fractions = {}
    for form in ("proximal", "subgradient"):
        net = _net(seed=3)
        opt_class = getattr(torch.optim, optimizer)
        kwargs = {"weight_decay": 0.0} if optimizer == "AdamW" else {"momentum": 0.9}
        trainer = _trainer(
            net,
            opt_class(net.parameters(), lr=lr, **kwargs),
            form=form,
            schedule=PenaltySchedule("constant", 10.0, epochs=1),
        )
        _steps(trainer, torch.randn(8, 3, 8, 8), 190)
        gammas = gamma_magnitudes(penalized_batchnorms(net))
        fractions[form] = float((gammas < 0.01).mean())
    assert fractions["proximal"] >= 0.99
    if optimizer == "AdamW":
        assert fractions["subgradient"] < 0.5


def test_zeros_reached_in_training_are_zeros_of_the_saved_ema() -> None:
    from ultralytics.utils.torch_utils import ModelEMA

    net = _net(seed=4)
    ema = ModelEMA(net)
    ema.updates = 10_000  # a long run's decay (~0.9999): the average lags far behind
    trainer = _trainer(
        net,
        torch.optim.AdamW(net.parameters(), lr=0.004, weight_decay=0.0),
        ema=ema,
        form="proximal",
        schedule=PenaltySchedule("constant", 1.0, epochs=1),
    )
    _steps(trainer, torch.randn(4, 3, 8, 8), 20)
    for raw, averaged in zip(trainer.batchnorms, trainer.ema_batchnorms, strict=True):
        zero = raw.weight == 0
        assert zero.any() and torch.all(averaged.weight[zero] == 0)
        assert torch.all(averaged.weight[~zero] != 0)


def test_constant_and_linear_decay_follow_their_formulas() -> None:
    constant = PenaltySchedule("constant", 1e-3, epochs=10)
    linear = PenaltySchedule("linear_decay", 1e-3, epochs=10)
    for e in range(10):
        assert constant.coefficient(e) == 1e-3
        assert linear.coefficient(e) == pytest.approx(1e-3 * (1 - 0.9 * e / 10), rel=1e-12)
        linear.observe_step(e, sparsity=0.0)  # no effect
        linear.observe_epoch(ap50=0.0, ap50_start=1.0)
    assert linear.coefficient(0) == 1e-3 and linear.coefficient(10) == pytest.approx(1e-4)


def test_dynamic_rules() -> None:
    """Per step: lambda x gain^(1/steps per epoch) behind the plan (linear from the start's
    fraction to the target at 80% of the steps), / that beyond the target, unchanged in between;
    per epoch: / gain below the accuracy floor; bounded to [base / 1000, base * 1000]."""
    s = PenaltySchedule(
        "dynamic", 1e-3, epochs=5, target=0.8, ap50_floor=0.9, gain=4.0, steps_per_epoch=2
    )
    s.start_sparsity = 0.2
    assert s.planned_sparsity(0) == pytest.approx(0.2 + 0.6 / 8)
    assert s.planned_sparsity(7) == s.planned_sparsity(9) == pytest.approx(0.8)
    s.observe_step(0, sparsity=0.2)  # behind plan (0.275): up by 4^(1/2)
    assert s.coefficient(0) == pytest.approx(2e-3)
    s.observe_step(1, sparsity=0.5)  # ahead of plan (0.35), below the target: unchanged
    assert s.coefficient(0) == pytest.approx(2e-3)
    s.observe_step(2, sparsity=0.85)  # beyond the target: down
    assert s.coefficient(0) == pytest.approx(1e-3)
    s.observe_epoch(ap50=0.85, ap50_start=1.0)  # below the floor: down by 4
    assert s.coefficient(1) == pytest.approx(2.5e-4)
    s.observe_epoch(ap50=0.95, ap50_start=1.0)  # above: unchanged
    assert s.coefficient(1) == pytest.approx(2.5e-4)
    for step in range(100):
        s.observe_step(step, sparsity=0.0)
    assert s.coefficient(0) == pytest.approx(1.0)


def test_dynamic_drives_a_small_model_to_its_target() -> None:
    """A conv net fits a fixed teacher while the dynamic proximal penalty takes its near-zero
    fraction to the target by the end, not far beyond it."""
    torch.manual_seed(1)
    teacher, student = _net(seed=1, width=64), _net(seed=2, width=64)
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        y = teacher(x)
    bns = penalized_batchnorms(student)
    opt = torch.optim.AdamW(student.parameters(), lr=0.01, weight_decay=0.0)
    schedule = PenaltySchedule(
        "dynamic", 1e-4, epochs=8, target=0.5, ap50_floor=0.0, gain=4.0, steps_per_epoch=25
    )
    near_zero = 0.01
    schedule.start_sparsity = sparsity_stats(gamma_magnitudes(bns), near_zero)["near_zero"]
    for step in range(200):
        opt.zero_grad()
        (student(x) - y).square().mean().backward()
        opt.step()
        proximal_l1_step(opt, bns, schedule.coefficient(0))
        fraction = sparsity_stats(gamma_magnitudes(bns), near_zero)["near_zero"]
        schedule.observe_step(step, fraction)
    assert schedule.coefficient(0) > 1e-4  # it pushed harder while behind plan
    assert 0.45 <= fraction <= 0.6  # and met the 50% target, not far beyond


def test_an_exclusion_that_names_no_batchnorm_is_refused() -> None:
    model = SimpleNamespace(model=_net())
    assert penalized(model, ["1"]) == {"4": 16}
    with pytest.raises(ParamsError, match=r"exclude prefix 'model\.99' names no BatchNorm"):
        penalized(model, ["model.99"])
    with pytest.raises(ParamsError, match="excludes every BatchNorm"):
        penalized(model, ["1", "4"])


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


def test_flops_weights_are_proportional_to_the_macs_saved_with_mean_one() -> None:
    weights = flops_weights([10.0, 30.0, 20.0])
    torch.testing.assert_close(weights, torch.tensor([0.5, 1.5, 1.0]))


def test_weights_scale_each_channels_threshold() -> None:
    """With SGD(lr=1) after a zero-gradient step, the proximal step subtracts lambda * weight."""
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 0.5, -0.5]))
    opt = torch.optim.SGD([bn.weight], lr=1.0)
    bn.weight.grad = torch.zeros(3)
    opt.step()
    proximal_l1_step(opt, [bn], 0.1, weights=[torch.tensor([1.0, 3.0, 6.0])])
    torch.testing.assert_close(bn.weight.detach(), torch.tensor([0.4, 0.2, 0.0]))


def test_a_histogram_has_a_zero_bin_then_log_spaced_bins() -> None:
    before = np.array([0.9, 1.0, 1.1, 0.05])
    after = np.array([0.0, 0.0, 0.3, 2e-5])
    rows = gamma_histogram(before, after)
    assert rows[0]["gamma"] == 0.0 and rows[0]["sparse"] == 2 + 1  # zeros and 2e-5
    assert sum(r["baseline"] for r in rows) == sum(r["sparse"] for r in rows) == 4
    centres = [r["gamma"] for r in rows[1:]]
    ratios = np.array(centres[1:]) / np.array(centres[:-1])
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-4)  # log-spaced
