"""Channel pruning: the dependency trace, the surgery's invariants and the pruned model's life."""

from __future__ import annotations

import random
import subprocess
import sys
import zipfile
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import thop
import torch
from torch import nn
from ultralytics import YOLO
from ultralytics.nn.modules import C2f
from ultralytics.nn.tasks import DetectionModel

from stages.compress.pruning.dependency import InconsistentModule, UnprunableError, trace
from stages.compress.pruning.importance import bn_gammas, largest_gamma, plan
from stages.compress.pruning.surgery import keep_width_readers, remove_channels
from stages.pipeline.cli import UserError
from stages.prune import SCHEMA, live_channels, not_sparse_warning
from stages.tools.exactness import exactness, random_detector, relative_difference, silence
from stages.yolo.heads import detect_prefix
from stages.yolo.models import load_detector, model_size
from stages.yolo.pruning import channel_graph
from tests.test_params import expect_param_error


def _model(config: str = "yolov8n.yaml", seed: int = 0) -> DetectionModel:
    """A random-weight detection model with random BN scales, shifts and statistics."""
    return random_detector(config, seed)


def _pruned_model(config: str = "yolov8n.yaml", seed: int = 0) -> DetectionModel:
    """_model with half of its channels removed by the global plan (a typical pruned student)."""
    model = _model(config, seed)
    graph = channel_graph(model)
    result = plan(graph, bn_gammas(model), 0.5, "global", min_channels=8, round_to=8)
    remove_channels(model, graph, result.removed, torch.rand(2, 3, 64, 64))
    return model


def _predictions(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        decoded, raw = model.eval()(x)
    levels = torch.split(
        raw["scores"], [(x.shape[2] // s) * (x.shape[3] // s) for s in (8, 16, 32)], 2
    )
    return {
        "decoded": decoded,
        "boxes": raw["boxes"],
        **{f"scores_p{i + 3}": t for i, t in enumerate(levels)},
    }


def _zero_random_groups(
    model: nn.Module, graph, fraction: float, seed: int, zero_beta: bool
) -> set:
    modules = dict(model.named_modules())
    candidates = [g for g in graph.groups().values() if not any(c in graph.blocked for c in g)]
    chosen = random.Random(seed).sample(candidates, int(fraction * len(candidates)))
    with torch.no_grad():
        for group in chosen:
            for conv, i in group:
                bn = modules[graph.bn_after[conv]]
                bn.weight[i] = 0.0
                if zero_beta:
                    bn.bias[i] = 0.0
    return {c for g in chosen for c in g}


def test_trace_finds_yolov8_structure() -> None:
    model = _model()
    graph = channel_graph(model)
    c2f = {name for name, m in model.named_modules() if type(m) is C2f}
    assert [s.module for s in graph.splits] == sorted(c2f, key=lambda n: int(n.split(".")[1]))
    assert all(s.index == 0 and len(s.segments) == 2 for s in graph.splits)
    # Residual ties: each C2f with shortcut ties cv1's second half to every bottleneck output.
    expected = {}
    for name, m in model.named_modules():
        if type(m) is C2f and m.m[0].add:
            expected[name] = (m.c, len(m.m) + 1)
    tied = [g for g in graph.groups().values() if len(g) > 1]
    assert len(tied) == sum(c for c, _ in expected.values())
    assert sorted({len(g) for g in tied}) == sorted({n for _, n in expected.values()})
    # The head's six output convs are the only convs without BN and are fully blocked.
    head = detect_prefix(model)
    no_bn = [n for n in graph.convs if n not in graph.bn_after]
    assert len(no_bn) == 6 and all(n.startswith(head) for n in no_bn)
    assert all((n, i) in graph.blocked for n in no_bn for i in range(graph.convs[n].out_channels))
    assert len(graph.blocked) == sum(graph.convs[n].out_channels for n in no_bn)


@pytest.mark.parametrize(
    "config",
    [
        "yolov8n.yaml",
        "yolov8s.yaml",
        "yolov8n-p2.yaml",  # stride-4 level
        "yolov8n-p6.yaml",  # stride-64 level
        "yolov8n-ghost.yaml",  # depthwise convs
        "yolo11n.yaml",  # C3k2, C2PSA attention
        "yolo26n.yaml",  # one-to-one head on detached features
        "yolov10n.yaml",  # PSA, SCDown, v10Detect
        "yolo12n.yaml",  # A2C2f area attention
    ],
)
def test_pruning_zero_gamma_channels_leaves_the_output_unchanged(config: str) -> None:
    """The invariant: channels with gamma = beta = 0 emit exactly 0, so removing them is exact.

    As a user would (and as `stages.tools.exactness` reports it): plan a global prune at 0.5 on
    random scales, zero gamma and beta of the channels it removes, apply, and compare every
    prediction tensor."""
    result = exactness(config, 0.5)
    assert result["params_after"] < 0.75 * result["params_before"]
    assert len(result["after"]) == len(result["before"]) > 0
    assert relative_difference(result["before"], result["after"]) < 1e-4
    for got, ref in zip(result["after"], result["before"], strict=True):
        assert got.shape == ref.shape
    if config.startswith("yolo11"):
        assert result["resized_splits"] > 0  # C3k2's and C2PSA's splits were rewritten


class _ReadsItsWidth(nn.Module):
    """Attention-like (as C2PSA's): reshapes a product to the width of its input, read from
    ``x.shape`` (which autograd does not see), projects it and adds it back to the input. The
    add ties the input's channels to the projection's, so the trace alone finds them prunable."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.qkv = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.proj = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        v = self.qkv(x).flatten(2)
        return x + self.proj((v @ (v.transpose(1, 2) @ v).softmax(-1)).view(b, c, h, w))


def _width_reader_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.SiLU(),
        _ReadsItsWidth(16),
        nn.Conv2d(16, 16, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.SiLU(),
        nn.Conv2d(16, 4, 1),
    ).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    return net


def test_channels_entering_a_module_that_reads_their_width_are_kept() -> None:
    """The trace misses that _ReadsItsWidth reads its input's width; the step after it cuts a
    copy, sees the module fail and keeps the channels entering it. The other spaces stay
    prunable and the real cut runs."""
    net = _width_reader_net()
    graph = trace(net, imgsz=16)
    entering = {("0", i) for i in range(16)}
    assert not entering & graph.blocked
    keep_width_readers(net, graph, imgsz=16)
    assert entering <= graph.blocked
    assert not {("4", i) for i in range(16)} & graph.blocked
    chosen = plan(graph, bn_gammas(net), 0.5, "global", 1, 1)
    assert chosen.removed and all(conv == "4" for conv, _ in chosen.removed)
    remove_channels(net, graph, chosen.removed, torch.rand(2, 3, 16, 16))
    assert net[7].in_channels == 16 - len(chosen.removed)


def test_a_dependency_the_trace_missed_is_refused_naming_the_module() -> None:
    """Without the step after the trace, the surgery's own check refuses the cut model, naming
    the module, instead of returning it."""
    net = _width_reader_net()
    graph = trace(net, imgsz=16)
    chosen = plan(graph, bn_gammas(net), 0.5, "global", 1, 1)
    assert any(conv == "0" for conv, _ in chosen.removed)
    with pytest.raises(InconsistentModule, match=r"pruning left 3 \(_ReadsItsWidth\) inconsistent"):
        remove_channels(net, graph, chosen.removed, torch.rand(2, 3, 16, 16))


def test_a_model_with_nothing_prunable_is_refused() -> None:
    """No BatchNorm: no channel has a scale to be ranked by."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU(), nn.Conv2d(8, 4, 1)).eval()
    with pytest.raises(UnprunableError, match="no channel of this model can be pruned"):
        plan(trace(net, imgsz=16), bn_gammas(net), 0.5, "global", 1, 1)


def test_removed_constants_are_folded_into_1x1_consumers_exactly() -> None:
    """gamma = 0 but beta != 0: the channel emits act(beta); folding keeps a 1x1 consumer exact."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.SiLU(),
        nn.Conv2d(8, 8, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.SiLU(),
        nn.Conv2d(8, 4, 1),
    ).eval()
    with torch.no_grad():
        net[1].weight[[1, 4, 6]] = 0.0
        net[1].bias.uniform_(-1, 1)
        net[4].running_mean.uniform_(-1, 1)
    graph = trace(net, imgsz=16)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
    remove_channels(net, graph, {("0", 1), ("0", 4), ("0", 6)}, x)
    assert net[3].in_channels == 5 and net[1].num_features == 5
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)


def test_folding_into_a_padded_3x3_consumer_is_exact_inside_the_border() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1)
    ).eval()
    with torch.no_grad():
        net[1].weight[[2, 5]] = 0.0
        net[1].bias.uniform_(-1, 1)
    graph = trace(net, imgsz=16)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
    remove_channels(net, graph, {("0", 2), ("0", 5)}, x)
    with torch.no_grad():
        out = net(x)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], rtol=1e-5, atol=1e-5)
    assert (out - ref).abs().max() > 1e-3  # the documented border effect of zero padding


def test_plan_respects_min_channels_round_to_and_caps() -> None:
    model = _model()
    graph = channel_graph(model)
    gammas = bn_gammas(model)
    result = plan(graph, gammas, 0.99, "global", min_channels=8, round_to=8)
    assert any(s.capped for s in result.spaces)  # 0.99 would empty layers: capped and reported
    for space in result.spaces:
        size = space.fixed + len(space.groups)
        assert space.kept >= min(8, size)
        assert space.kept % 8 == 0 or space.kept == size
    remove_channels(model, graph, result.removed, torch.rand(1, 3, 64, 64))
    _predictions(model, torch.rand(1, 3, 64, 64))  # still runs


def test_uniform_prunes_each_space_by_the_ratio() -> None:
    model = _model()
    graph = channel_graph(model)
    result = plan(graph, bn_gammas(model), 0.5, "uniform", min_channels=1, round_to=1)
    for space in result.spaces:
        if space.groups:
            size = space.fixed + len(space.groups)
            assert space.kept == size - int(0.5 * len(space.groups))


@pytest.mark.parametrize("method", ["uniform", "global"])
def test_equal_gammas_never_empty_a_split_half(method: str) -> None:
    """A fresh model has every gamma = 1: ties in the ranking must not starve a C2f branch."""
    model = DetectionModel("yolov8n.yaml", nc=10, verbose=False).eval()
    graph = channel_graph(model)
    result = plan(graph, bn_gammas(model), 0.7, method, min_channels=8, round_to=8)
    remove_channels(model, graph, result.removed, torch.rand(1, 3, 64, 64))
    resized = [m.pruned_splits[0] for m in model.modules() if hasattr(m, "pruned_splits")]
    assert resized and all(min(sizes) >= 8 for sizes in resized)
    assert all(m.in_channels > 0 for m in model.modules() if isinstance(m, nn.Conv2d))
    _predictions(model, torch.rand(1, 3, 64, 64))


def test_global_removes_the_smallest_gammas() -> None:
    model = _model()
    graph = channel_graph(model)
    modules = dict(model.named_modules())
    removed = _zero_random_groups(model, graph, 0.3, seed=2, zero_beta=False)
    share = len(removed) / sum(
        1 for g in graph.groups().values() if not any(c in graph.blocked for c in g) for _ in g
    )
    result = plan(graph, bn_gammas(model), share * 0.9, "global", min_channels=1, round_to=1)
    assert result.removed <= removed  # only zero-gamma channels are chosen
    assert all(float(modules[graph.bn_after[c]].weight[i].detach()) == 0 for c, i in result.removed)


def _train_step(model: nn.Module) -> None:
    """One real optimizer step with the model's own detection loss."""
    from ultralytics.cfg import get_cfg

    model.args = get_cfg(overrides={})
    model.criterion = None
    model.train()
    batch = {
        "img": torch.rand(2, 3, 64, 64),
        "cls": torch.tensor([[1.0], [3.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]]),
        "batch_idx": torch.tensor([0.0, 1.0]),
    }
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss, _ = model.loss(batch)
    loss.sum().backward()
    opt.step()


@pytest.mark.parametrize("config", ["yolov8n.yaml", "yolov8m.yaml"])
def test_pruned_model_runs_loads_trains_and_exports(config: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    model = _pruned_model(config)
    count = sum(p.numel() for p in model.parameters())
    for size in (64, 96):
        _predictions(model, torch.rand(1, 3, size, size))

    path = tmp_path / "pruned.pt"
    torch.save({"model": deepcopy(model).half(), "train_args": {"imgsz": 64}}, path)
    loaded = load_detector(path)
    assert sum(p.numel() for p in loaded.model.parameters()) == count

    trained = deepcopy(loaded.model)
    before = [p.detach().clone() for p in trained.parameters()]
    _train_step(trained)
    assert sum(p.numel() for p in trained.parameters()) == count  # structure kept
    assert any(not torch.equal(a, b) for a, b in zip(before, trained.parameters(), strict=True))

    onnx = Path(loaded.export(format="onnx", imgsz=64, simplify=False, dynamic=False))
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        torch_out = loaded.model.float().eval()(torch.from_numpy(x))[0]
    np.testing.assert_allclose(onnx_out, torch_out.numpy(), rtol=1e-3, atol=1e-3)


def test_yolov8m_matches_the_papers_parameter_count() -> None:
    """The paper's 25.85M for YOLOv8m with 10 classes is the fused count."""
    model = DetectionModel("yolov8m.yaml", nc=10, verbose=False)
    assert sum(p.numel() for p in model.parameters()) == 25_862_110
    size = model_size(model, 640)
    assert size["params"] == 25_845_550
    # ultralytics' 79.1 GFLOPs counts the BatchNorms too; folded into the convs it is 78.7.
    assert size["flops_g"] == pytest.approx(78.7, abs=0.1)
    macs, _ = thop.profile(
        deepcopy(model).eval(), inputs=(torch.zeros(1, 3, 640, 640),), verbose=False
    )
    assert 2 * macs / 1e9 == pytest.approx(79.1, abs=0.1)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("ratio", 1.0, "prune.ratio = 1.0 is invalid: expected a number in (0, 1)"),
        ("ratio", 0.0, "prune.ratio = 0.0 is invalid"),
        ("method", "random", "prune.method = 'random' is invalid"),
        ("round_to", 0, "prune.round_to = 0 is invalid"),
    ],
)
def test_bad_params_name_the_key(key: str, value: object, message: str) -> None:
    expect_param_error(SCHEMA, "prune", key, value, message)


def test_a_model_that_was_never_sparse_trained_prunes_with_a_warning() -> None:
    model = _model()  # |gamma| in [0.5, 1.5]: nothing is near zero
    graph = channel_graph(model)
    gammas = bn_gammas(model)
    removed = plan(graph, gammas, 0.3, "global", 8, 8).removed
    largest = largest_gamma(graph, gammas, removed)
    assert 0.5 <= largest <= 1.5
    assert "not sparse" in not_sparse_warning(largest)
    with torch.no_grad():  # the same channels after sparse training: scales at zero
        for conv, i in removed:
            gammas[graph.bn_after[conv]][i] = 0.0
    assert largest_gamma(graph, gammas, removed) == 0.0
    assert not_sparse_warning(0.0) is None


def test_a_checkpoint_that_is_not_a_detector_is_refused(tmp_path: Path) -> None:
    cls = YOLO("yolov8n-cls.yaml")
    path = tmp_path / "cls.pt"
    torch.save({"model": cls.model, "train_args": {}}, path)
    with pytest.raises(
        UserError, match=r"is a classify model \(ClassificationModel\), not a YOLO detection model"
    ):
        load_detector(path)
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(3)}, junk)
    with pytest.raises(UserError, match="is not an ultralytics checkpoint"):
        load_detector(junk)


class _Halves(nn.Module):
    """conv -> BN -> chunk in two halves -> the second half through ``inner`` -> concat."""

    def __init__(self, c: int, inner: nn.Module | None = None) -> None:
        super().__init__()
        self.cv = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c))
        self.inner = inner or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv(x).chunk(2, 1)
        return torch.cat([a, self.inner(b)], 1)


def test_nested_modules_replay_their_own_splits() -> None:
    """A module that splits and whose child splits too: each replays its own splits at its own
    kept sizes (the parent's replay steps aside while the child runs), exactly."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 1, bias=False),
        nn.BatchNorm2d(16),
        _Halves(16, inner=_Halves(16)),
        nn.Conv2d(48, 4, 1),
    ).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    graph = trace(net, imgsz=16)
    assert sorted((s.module, s.index) for s in graph.splits) == [("2", 0), ("2.inner", 0)]
    removed = plan(graph, bn_gammas(net), 0.4, "global", 1, 1).removed
    silence(net, graph, removed)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        before = net(x)
    remove_channels(net, graph, removed, x)
    assert net[2].pruned_splits and net[2].inner.pruned_splits
    assert net[2].pruned_splits[0] != net[2].inner.pruned_splits[0]  # unequal, so each its own
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)


_FORWARD_OF_LOADED = """
import sys, torch
from stages.yolo.models import load_detector
model = load_detector(sys.argv[1]).model.float().eval()
torch.manual_seed(0)
with torch.no_grad():
    print(float(model(torch.rand(1, 3, 64, 64))[0].abs().sum()))
"""


def test_a_checkpoint_naming_the_former_replay_module_loads(tmp_path: Path) -> None:
    """Pruned checkpoints written before the split-replay hooks moved name their module
    ``stages.common.layers``; they load in a fresh process and give the same predictions."""
    from stages.compress.pruning import replay

    model = _pruned_model("yolo11n.yaml").half()  # C3k2: resized splits, so hooks to pickle
    assert any(hasattr(m, "pruned_splits") for m in model.modules())
    hooks = (replay._before_forward, replay._after_forward)
    path = tmp_path / "former.pt"
    try:
        for hook in hooks:
            hook.__module__ = "stages.common.layers"
        torch.save({"model": model, "train_args": {"imgsz": 64}}, path)
    finally:
        for hook in hooks:
            hook.__module__ = replay.__name__
    with zipfile.ZipFile(path) as archive:
        pickled = next(archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))
    assert b"stages.common.layers" in pickled and b"stages.compress" not in pickled
    done = subprocess.run(
        [sys.executable, "-c", _FORWARD_OF_LOADED, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    torch.manual_seed(0)
    with torch.no_grad():
        expected = float(model.float().eval()(torch.rand(1, 3, 64, 64))[0].abs().sum())
    assert float(done.stdout.split()[-1]) == pytest.approx(expected, rel=1e-5)


def test_tied_channels_share_a_batchnorm_group() -> None:
    """Every BatchNorm channel gets the id of its tied group: the residual ties of a C2f join
    channels of different BatchNorms, and the number of ids is the graph's number of groups over
    convs with a BatchNorm."""
    model = _model()
    graph = trace(model)
    sizes = {n: m.num_features for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    groups = graph.batchnorm_groups(sizes)
    assert [len(groups[n]) for n in sizes] == list(sizes.values())
    with_bn = {root for root, members in graph.groups().items() if members[0][0] in graph.bn_after}
    assert len({g for ids in groups.values() for g in ids}) == len(with_bn)
    ties = [ids for ids in groups.values()]
    flat = [g for ids in ties for g in ids]
    assert len(set(flat)) < len(flat)  # some ids are shared across BatchNorms: the residuals


def test_prune_counts_the_removed_channels_that_were_not_near_zero() -> None:
    model = _model()
    graph = trace(model)
    gammas = bn_gammas(model)
    removed = plan(graph, gammas, 0.3, "global", 8, 8).removed
    assert live_channels(graph, gammas, removed) == len(removed)  # |gamma| in [0.5, 1.5]
    for conv, i in list(removed)[:10]:
        gammas[graph.bn_after[conv]][i] = 0.0
    assert live_channels(graph, gammas, removed) == len(removed) - 10
