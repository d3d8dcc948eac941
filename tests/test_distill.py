"""Channel-wise distillation: the loss against NumPy, where gradients go, and bad inputs."""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel

from stages.compress.cwd import cwd_loss, fit_aligner, make_aligners
from stages.distill import SCHEMA, weights_per_level
from stages.pipeline.cli import UserError
from stages.pipeline.params import ParamsError
from stages.yolo.distill_trainer import CWDCriterion, DistillTrainer, check_levels
from stages.yolo.heads import head_features
from stages.yolo.training import configured_trainer
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
        ("level_weights", [], "expected a non-empty list of numbers >= 0, or a mapping"),
        ("level_weights", {8: 1.0, "p4": 1.0}, "distill.level_weights = {8: 1.0, 'p4': 1.0}"),
        ("teacher", "pruned", "distill.teacher = 'pruned' is invalid"),
        ("aligner_fit_images", -1, "distill.aligner_fit_images = -1 is invalid"),
    ],
)
def test_bad_params_name_the_key(key: str, value: object, message: str) -> None:
    expect_param_error(SCHEMA, "distill", key, value, message)


def test_level_weights_fit_any_number_of_levels_or_name_the_mismatch() -> None:
    """A list is one weight per level in stride order; a mapping names the strides; anything
    that does not fit the student's levels is a params error naming them."""
    assert weights_per_level([1.0, 0.5, 0.25, 0.1], [4, 8, 16, 32]) == [1.0, 0.5, 0.25, 0.1]
    assert weights_per_level({32: 0.5, 8: 1.0, 16: 0.8}, [8, 16, 32]) == [1.0, 0.8, 0.5]
    with pytest.raises(ParamsError, match=r"has 3 values, but the student has 4 Detect levels"):
        weights_per_level([1.0, 1.0, 0.5], [4, 8, 16, 32])
    with pytest.raises(ParamsError, match=r"gives strides \[8, 16\], but .* strides \[8, 16, 32\]"):
        weights_per_level({8: 1.0, 16: 1.0}, [8, 16, 32])


def _batch(x: torch.Tensor) -> dict:
    return {
        "img": x,
        "cls": torch.tensor([[1.0], [3.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]]),
        "batch_idx": torch.tensor([0.0, 1.0]),
    }


@pytest.mark.parametrize("images", ["float", "half"])
def test_the_criterion_runs_under_autocast_as_on_a_gpu(images: str) -> None:
    """On a GPU with AMP, ultralytics calls the criterion inside autocast, in training (fp32
    images) and in validation (fp16 images): the teacher and the aligners then run in reduced
    precision too. CPU autocast in bfloat16 takes the same path: the loss stays finite, close
    to the fp32 one, and its gradients reach the student and the aligners."""
    teacher, student = _detector(0).eval(), _pruned_model(seed=1)
    student.args = get_cfg(overrides={})
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        s_maps, t_maps = head_features(student, x), head_features(teacher, x)
    # Random aligners: a CWD term of about 1 (fitted ones would make it ~1e-5, nothing to compare)
    aligners = make_aligners([m.shape[1] for m in s_maps], [m.shape[1] for m in t_maps])
    criterion = CWDCriterion(student.init_criterion(), teacher, aligners, 1.0, 1.0, [1.0, 1.0, 0.5])
    student.train()
    _, fp32 = criterion(student(x), _batch(x))
    inputs = x.half() if images == "half" else x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, items = criterion(student(inputs), _batch(inputs))
    assert torch.isfinite(loss).all() and loss.dtype == torch.float32
    assert fp32["cwd_loss"] > 0.5
    for key in ("box_loss", "cls_loss", "dfl_loss", "cwd_loss"):
        torch.testing.assert_close(items[key].float(), fp32[key].float(), rtol=0.05, atol=1e-3)
    loss.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in aligners.parameters())
    assert student.model[0].conv.weight.grad.abs().sum() > 0


def _tiny_dataset(root: Path) -> Path:
    """Four train and two val images (random noise, two boxes each) in YOLO format."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(count):
            image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), image)
            (root / "labels" / split / f"{i}.txt").write_text(
                "1 0.5 0.5 0.3 0.3\n3 0.25 0.25 0.2 0.1\n"
            )
    names = "\n".join(f"  {i}: c{i}" for i in range(10))
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return data


def test_validation_runs_under_autocast_with_half_images_and_aligners_in_eval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's validation as ultralytics runs it on a GPU with AMP (fp16 images, autocast
    around the model and the criterion), emulated on the CPU with bfloat16 autocast, in a real
    one-epoch run: metrics and val/cwd_loss come back finite, the aligners run in eval mode there
    and their running statistics do not move; afterwards they train again."""
    from ultralytics.engine import validator
    from ultralytics.models.yolo.detect import DetectionValidator

    monkeypatch.setattr(
        validator, "autocast", lambda enabled, device: torch.autocast("cpu", dtype=torch.bfloat16)
    )
    preprocess = DetectionValidator.preprocess

    def half_images(self: DetectionValidator, batch: dict) -> dict:
        batch = preprocess(self, batch)
        batch["img"] = batch["img"].half()
        return batch

    monkeypatch.setattr(DetectionValidator, "preprocess", half_images)

    teacher, student = _detector(0).eval(), _pruned_model(seed=1)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        channels = [[m.shape[1] for m in head_features(model, x)] for model in (student, teacher)]
    aligners = make_aligners(*channels)
    trainer_class = configured_trainer(
        DistillTrainer, teacher=teacher, aligners=aligners, level_weights=[1.0, 1.0, 0.5]
    )
    args = {
        "model": "yolov8n.yaml",  # names the run; get_model keeps the pruned student
        "data": str(_tiny_dataset(tmp_path / "data")),
        "epochs": 1,
        "imgsz": 64,
        "batch": 2,
        "workers": 0,
        "device": "cpu",
        "project": str(tmp_path / "runs"),
        "name": "val",
        "plots": False,
        "mode": "train",
        "task": "detect",
    }
    validations = []
    validate = DistillTrainer.validate

    def watched(self: DistillTrainer) -> tuple:
        before = [a[1].running_mean.clone() for a in self.aligners]
        metrics, fitness = validate(self)
        after = [a[1].running_mean.clone() for a in self.aligners]
        validations.append((before, after, [a.training for a in self.aligners], metrics))
        return metrics, fitness

    monkeypatch.setattr(DistillTrainer, "validate", watched)
    modes = []  # (under autocast, aligner in train mode) of every call
    aligners[0].register_forward_pre_hook(
        lambda m, _a: modes.append((torch.is_autocast_enabled("cpu"), m.training))
    )
    trainer = trainer_class(overrides=args)
    student.nc = 10  # as a trained checkpoint's model has it
    trainer.model = trainer.get_model(weights=student, cfg=student.yaml)
    trainer.train()  # one epoch: training in fp32 (no AMP on the CPU), then the validation

    assert (False, True) in modes  # training: aligners train
    assert (True, False) in modes and (True, True) not in modes  # validation: eval mode
    (before, after, training_after, metrics), *_ = validations
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert all(training_after)  # back to training for the next epoch
    assert metrics["val/cwd_loss"] >= 0  # small: the eval-mode aligners barely trained
    assert all(np.isfinite(v) for v in metrics.values())
