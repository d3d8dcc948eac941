"""Channel-wise distillation: the loss against NumPy, where gradients go, and bad inputs."""

from __future__ import annotations

from copy import deepcopy

import numpy as np
import pytest
import torch
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel

from stages.common.cli import UserError
from stages.common.yolo import configured_trainer
from stages.distill import (
    SCHEMA,
    CWDCriterion,
    DistillTrainer,
    check_levels,
    cwd_loss,
    fit_aligner,
    head_features,
    make_aligners,
)
from tests.test_params import expect_param_error
from tests.test_prune import _pruned_model


def _reference_cwd(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    """The formula, written out in float64 NumPy."""
    n, c = s.shape[:2]
    total = 0.0
    for i in range(n):
        for j in range(c):
            xs = s[i, j].ravel() / tau
            xt = t[i, j].ravel() / tau
            ps = np.exp(xs - xs.max()) / np.exp(xs - xs.max()).sum()
            pt = np.exp(xt - xt.max()) / np.exp(xt - xt.max()).sum()
            total += float((pt * (np.log(pt) - np.log(ps))).sum())
    return total * tau**2 / (n * c)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 4.0])
def test_cwd_matches_a_numpy_reference(tau: float) -> None:
    rng = np.random.default_rng(int(tau * 10))
    s = rng.normal(size=(2, 5, 6, 7)).astype(np.float32)
    t = rng.normal(size=(2, 5, 6, 7)).astype(np.float32) * 2
    got = cwd_loss(torch.from_numpy(s), torch.from_numpy(t), tau).item()
    assert got == pytest.approx(
        _reference_cwd(s.astype(np.float64), t.astype(np.float64), tau), rel=1e-5
    )
    assert got > 0


def test_cwd_is_zero_for_identical_maps() -> None:
    x = torch.randn(3, 4, 5, 5)
    assert cwd_loss(x, x.clone(), 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert cwd_loss(x, x + 3.0, 2.0).item() == pytest.approx(0.0, abs=1e-6)  # softmax: shift-free


def test_cwd_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="student map"):
        cwd_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4), 1.0)


def test_a_fitted_aligner_recovers_an_exact_linear_map() -> None:
    """Teacher maps that are M @ student + c: the fitted aligner must reproduce them exactly."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 6, 5, 5, generator=gen)
    mix = torch.randn(9, 6, generator=gen)
    offset = torch.randn(9, generator=gen)
    teacher = torch.einsum("ts,nshw->nthw", mix, student) + offset[None, :, None, None]
    (aligner,) = make_aligners([6], [9])
    fit_aligner(aligner, student, teacher)
    for mode in (True, False):  # batch statistics and running statistics give the same map
        with torch.no_grad():
            aligned = deepcopy(aligner).train(mode)(student)
        torch.testing.assert_close(aligned, teacher, atol=1e-4, rtol=1e-4)
    assert cwd_loss(aligned, teacher, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_a_fitted_aligner_beats_a_random_one_on_real_maps() -> None:
    """On a pruned student and its teacher, the fit lowers the CWD loss the training starts at."""
    teacher, student = _detector(0).eval(), _pruned_model(seed=1).eval()
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        t_maps, s_maps = head_features(teacher, x), head_features(student, x)
    channels = ([m.shape[1] for m in s_maps], [m.shape[1] for m in t_maps])
    random_init, fitted = make_aligners(*channels), make_aligners(*channels)
    for aligner, s, t in zip(fitted, s_maps, t_maps, strict=True):
        fit_aligner(aligner, s, t)
    with torch.no_grad():
        for rand, fit, s, t in zip(random_init, fitted, s_maps, t_maps, strict=True):
            assert cwd_loss(fit.eval()(s), t, 1.0) < cwd_loss(rand.train()(s), t, 1.0)


def _detector(seed: int) -> DetectionModel:
    torch.manual_seed(seed)
    model = DetectionModel("yolov8n.yaml", nc=10, verbose=False)
    model.args = get_cfg(overrides={})
    return model


def test_gradients_reach_student_and_aligners_never_the_teacher() -> None:
    teacher = _detector(0).eval()
    student = _pruned_model(seed=1)  # random BN scales, so pruning reaches every level
    student.args = get_cfg(overrides={})
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        s_maps, t_maps = head_features(student, x), head_features(teacher, x)
    aligners = make_aligners([m.shape[1] for m in s_maps], [m.shape[1] for m in t_maps])
    assert [m.shape[1] for m in s_maps] != [m.shape[1] for m in t_maps]  # really pruned
    criterion = CWDCriterion(student.init_criterion(), teacher, aligners, 2.0, 1.0, [1.0, 1.0, 0.5])
    student.criterion = criterion
    student.train()
    batch = {
        "img": x,
        "cls": torch.tensor([[1.0], [3.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]]),
        "batch_idx": torch.tensor([0.0, 1.0]),
    }
    loss, items = student.loss(batch)
    assert set(items) == {"box_loss", "cls_loss", "dfl_loss", "cwd_loss"}
    assert items["cwd_loss"] > 0
    loss.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aligners.parameters())
    assert student.model[0].conv.weight.grad.abs().sum() > 0  # reaches the backbone's first conv
    assert all(p.grad is None for p in teacher.parameters())

    # The CWD part alone also reaches the backbone (not only through the detection loss).
    student.zero_grad()
    cwd = sum(
        cwd_loss(a(s), t, 2.0)
        for a, s, t in zip(aligners, head_features(student, x), t_maps, strict=True)
    )
    cwd.backward()
    assert student.model[0].conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "lr"), [("AdamW", 0.002), ("SGD", 0.03)])
def test_aligners_train_with_the_students_optimizer_settings(name: str, lr: float) -> None:
    teacher, student = _detector(0), _pruned_model(seed=1)
    aligners = make_aligners([16, 32, 64], [64, 128, 256])
    trainer_class = configured_trainer(DistillTrainer, teacher=teacher, aligners=aligners)
    trainer = trainer_class.__new__(trainer_class)  # no dataset: only the optimizer is built
    trainer.device = torch.device("cpu")
    optimizer = trainer.build_optimizer(student, name=name, lr=lr, momentum=0.9, decay=5e-4)
    *student_groups, aligner_group = optimizer.param_groups
    assert aligner_group["params"] == list(aligners.parameters())
    assert aligner_group["lr"] == lr and aligner_group["weight_decay"] == 0.0
    for key in ("betas", "momentum", "nesterov"):  # whichever the optimizer has
        if key in student_groups[0]:
            assert aligner_group[key] == student_groups[0][key]
    assert all(not p.requires_grad for p in teacher.parameters())


def test_weight_zero_leaves_only_the_detection_loss() -> None:
    teacher, student = _detector(0).eval(), _detector(1)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        channels = [m.shape[1] for m in head_features(teacher, x)]
    criterion = CWDCriterion(
        student.init_criterion(),
        teacher,
        make_aligners(channels, channels),
        1.0,
        0.0,
        [1.0, 1.0, 1.0],
    )
    student.train()
    batch = {
        "img": x,
        "cls": torch.tensor([[2.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]]),
        "batch_idx": torch.tensor([0.0]),
    }
    preds = student(x)
    loss, items = criterion(preds, batch)
    plain, _ = student.init_criterion()(preds, batch)
    torch.testing.assert_close(loss[:3], plain)
    assert loss[3].item() == 0.0 and items["cwd_loss"].item() == 0.0


def test_a_teacher_with_other_levels_is_refused_before_training() -> None:
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        student = head_features(_detector(1).eval(), x)
        p2 = DetectionModel("yolov8n-p2.yaml", nc=10, verbose=False).eval()  # strides 4..32
        teacher = head_features(p2, x)
    with pytest.raises(UserError, match="same detection levels"):
        check_levels(student, teacher)
    check_levels(student, student)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("temperature", 0.0, "distill.temperature = 0.0 is invalid: expected a number in (0, 100]"),
        ("temperature", -1, "distill.temperature = -1 is invalid"),
        ("weight", -0.5, "distill.weight = -0.5 is invalid"),
        ("level_weights", [1.0, -1.0, 1.0], "distill.level_weights = [1.0, -1.0, 1.0] is invalid"),
        ("level_weights", [1.0, 1.0], "expected a list of 3 numbers >= 0"),
        ("teacher", "pruned", "distill.teacher = 'pruned' is invalid"),
        ("aligner_fit_images", -1, "distill.aligner_fit_images = -1 is invalid"),
    ],
)
def test_bad_params_name_the_key(key: str, value: object, message: str) -> None:
    expect_param_error(SCHEMA, "distill", key, value, message)
