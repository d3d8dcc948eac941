"""End to end: `dvc repro` of a tiny profile in a temporary copy of the repo, for real."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from stages.evaluate import MODELS
from stages.pipeline.runtime import has_avx2
from stages.tools.pareto import experiments
from tests.conftest import PROJECT_ROOT, STAGES

# trt_build's rows for the default int8: ONNX Runtime, then OpenVINO; int8, then the fp32 twins.
DEPLOYED_ROWS = [
    f"{who}deployed{runtime}{precision}"
    for runtime in ("", "_openvino")
    for precision in ("", "_fp32")
    for who in ("baseline_", "")
]

pytestmark = pytest.mark.slow

TINY = {
    "imgsz": 64,
    "dataset": {
        "synthetic": {
            "train_images": 16,
            "val_images": 8,
            "test_images": 8,
            "image_size": 64,
            "objects_min": 3,
            "objects_max": 6,
        }
    },
    "baseline": {"epochs": 1, "batch": 8, "nbs": 8, "warmup_epochs": 0.0},
    "sparse_train": {"epochs": 1, "batch": 8, "nbs": 8},
    "prune": {"ratio": 0.6},  # the tests' own ratio, whatever the default
    "distill": {"epochs": 1, "batch": 8, "nbs": 8},
    "evaluate": {"latency_warmup": 1, "latency_repeats": 3},
    # A 1-epoch model's few, low-confidence detections are no test of INT8 fidelity; its head's
    # nearly constant maps are too narrow for the percentile histogram (test_quantize checks that
    # message): minmax calibrates them.
    "trt_build": {"int8_min_agreement": 0.0, "int8_calibration": "minmax"},
}


def _merge(base: dict, override: dict) -> dict:
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        base[key] = _merge(base[key], value) if nested else value  # a dict replaces a list
    return base


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    return done.stdout


def make_repo(root: Path, overrides: dict) -> tuple[Path, dict[str, str]]:
    """A git + DVC copy of the project's tracked (and new, non-ignored) files in ``root``, with
    ``overrides`` merged into params.yaml, and the environment to run it with (an empty HOME)."""
    repo = root / "repo"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        src = PROJECT_ROOT / name
        outputs = name.startswith(("data/", "models/", "reports/"))
        # Git files: the raw data, and the tool reports that evaluate reads and dvc.yaml plots.
        inputs = name.startswith(("data/raw/", "reports/teacher_curve/", "reports/finetune_curve/"))
        if src.is_file() and (not outputs or inputs):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    (repo / "dvc.lock").unlink(missing_ok=True)  # start from nothing, as a fresh checkout would
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(_merge(params, overrides), sort_keys=False))

    home = root / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "DVC_"))}
    env.update(
        HOME=str(home),
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
        GIT_CONFIG_NOSYSTEM="1",
        PYTHONPATH=str(repo),
    )
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "tiny"], repo, env)
    return repo, env


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    return make_repo(tmp_path_factory.mktemp("tiny"), TINY)


def _commit_results(repo: Path, env: dict[str, str]) -> None:
    """Commit dvc.lock and the reports, as a user does after `dvc repro`."""
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "results"], repo, env)


def _reproduced(repo: Path, env: dict[str, str]) -> None:
    """The first test's state, for a test run on its own: reproduced and committed."""
    if not (repo / "dvc.lock").exists():
        _run([sys.executable, "-m", "dvc", "repro"], repo, env)
        _commit_results(repo, env)


def test_repro_runs_every_stage_and_writes_outputs(tiny_repo: tuple[Path, dict]) -> None:
    repo, env = tiny_repo
    out = _run([sys.executable, "-m", "dvc", "repro"], repo, env)
    _commit_results(repo, env)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out

    stats = json.loads((repo / "reports/dataset/stats.json").read_text())
    assert stats["train"]["images"] == 16 and stats["val"]["images"] == stats["test"]["images"] == 8
    assert len(list((repo / "data/yolo/labels/test").glob("*.txt"))) == 8
    assert len(list((repo / "data/yolo/labels/train").glob("*.txt"))) == 16

    all_metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert list(all_metrics) == [*MODELS, *DEPLOYED_ROWS]
    metrics = all_metrics["baseline"]
    assert 0.0 <= metrics["ap50"] <= 1.0
    assert {"ap_small", "ap_medium", "ap_large", "cpu_latency_ms", "file_mb"} <= set(metrics)
    per_class = (repo / "reports/evaluate/per_class_ap50.csv").read_text().splitlines()
    assert per_class[0] == ",".join(["class", *MODELS, *DEPLOYED_ROWS])
    assert len(per_class) == 11  # the ten VisDrone classes
    models = (repo / "reports/evaluate/models.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in models[1:]] == list(all_metrics)
    for png in ("accuracy.png", "per_class_ap50.png"):
        assert (repo / "reports/evaluate" / png).stat().st_size > 1000
    assert metrics["params_m"] > 1.0 and metrics["gflops"] > 0 and metrics["cpu_fps"] > 0
    # Sparse training alone removes nothing.
    assert all_metrics["sparse"]["params_m"] == metrics["params_m"]

    sparsity = json.loads((repo / "reports/sparse_train/sparsity.json").read_text())
    assert sparsity["gamma_l1_after"] < sparsity["gamma_l1_before"]  # the penalty did its work
    sparse_header = (repo / "reports/sparse_train/results.csv").read_text().splitlines()[0]
    for column in ("sparsity/coefficient", "sparsity/gamma_l1", "sparsity/near_zero"):
        assert column in sparse_header
    assert (repo / "reports/sparse_train/gamma_hist.png").stat().st_size > 1000
    histogram = (repo / "reports/sparse_train/gamma_hist.csv").read_text().splitlines()
    assert histogram[0] == "gamma,baseline,sparse" and len(histogram) == 62  # 1 + 61 bins

    pruned = json.loads((repo / "reports/prune/prune.json").read_text())
    assert pruned["params_after_m"] < pruned["params_before_m"]
    assert all_metrics["pruned"]["params_m"] == pytest.approx(pruned["params_after_m"], abs=1e-3)
    assert all_metrics["pruned"]["gflops"] < all_metrics["baseline"]["gflops"]
    # Distillation kept the pruned structure and logged its CWD term.
    assert all_metrics["distilled"]["params_m"] == all_metrics["pruned"]["params_m"]
    distill_header = (repo / "reports/distill/results.csv").read_text().splitlines()[0]
    assert "train/cwd_loss" in distill_header and "val/cwd_loss" in distill_header
    # Without a GPU the ONNX model is deployed, and the record says why there is no engine.
    record = json.loads((repo / "reports/trt_build/deploy.json").read_text())
    assert record["backend"] == "onnxruntime" and record["no_engine_because"]
    assert (repo / "models/deploy/model.onnx").stat().st_size > 100_000
    artifacts = record["artifacts"]  # the default int8: Q/DQ models, the baseline alike
    assert artifacts["baseline_deployed"]["artifact"] == "baseline.int8.onnx"
    assert artifacts["deployed"]["artifact"] == "model.int8.onnx"
    assert artifacts["deployed_fp32"]["artifact"] == "model.onnx"
    assert artifacts["deployed"]["int8"]["int8_convs"] > 20
    # OpenVINO reads the same files, and runs in INT8 the convs the Q/DQ model quantized.
    assert artifacts["deployed_openvino"]["artifact"] == "model_int8_openvino_model"
    assert artifacts["baseline_deployed_openvino_fp32"]["artifact"] == "baseline_openvino_model"
    assert {a["runtime"] for a in artifacts.values()} == {"onnxruntime", "openvino"}
    for key in ("int8_convs", "float_convs"):
        assert artifacts["deployed_openvino"]["int8"][key] == artifacts["deployed"]["int8"][key]
    assert record["openvino"]["INFERENCE_PRECISION_HINT"] == "f32"
    fp32_gap = all_metrics["deployed_openvino_fp32"]["ap50"] - all_metrics["deployed_fp32"]["ap50"]
    assert abs(fp32_gap) <= 0.005
    assert all_metrics["baseline_deployed"]["params_m"] == metrics["params_m"]
    summary = (repo / "reports/summary.md").read_text()
    assert "speedup, same runtime" in summary and "end-to-end" in summary
    # The committed teacher curve was measured with the default's settings, not the tiny ones.
    assert summary.startswith("**The teacher's convergence is not measured for these settings**")
    environment = json.loads((repo / "reports/evaluate/environment.json").read_text())
    assert environment["packages"]["ultralytics"] and environment["threads"]["torch"] >= 1
    assert abs(all_metrics["deployed_fp32"]["ap50"] - all_metrics["distilled"]["ap50"]) <= 0.01
    channels = (repo / "reports/prune/channels.csv").read_text().splitlines()
    assert channels[0] == "layer,before,after" and len(channels) > 50
    header = (repo / "reports/baseline/results.csv").read_text().splitlines()[0]
    assert "metrics/mAP50(B)" in header
    assert "| baseline |" in (repo / "reports/summary.md").read_text()

    # The checkpoint is a regular ultralytics detection model.
    check = (
        "from stages.yolo.models import load_detector; "
        "m = load_detector('models/baseline.pt'); print(m.task, len(m.names))"
    )
    assert _run([sys.executable, "-c", check], repo, env).split()[-2:] == ["detect", "10"]

    # Nothing was written to the home directory; nothing left half-written.
    assert list(Path(env["HOME"]).iterdir()) == []
    assert not list(repo.rglob(".*.partial-*"))


@pytest.mark.parametrize(
    ("model", "level_weights", "levels"),
    [
        ("yolov8n-p2.yaml", {4: 1.0, 8: 1.0, 16: 1.0, 32: 0.5}, 4),  # a weight per stride
        ("yolo11n.yaml", [1.0, 1.0, 0.5], 3),  # C3k2 splits, C2PSA attention
    ],
)
def test_repro_of_another_ultralytics_detector(
    model: str, level_weights: object, levels: int, tmp_path: Path
) -> None:
    """The whole pipeline on a P2-head YOLOv8 and on YOLO11: pruned for real (splits resized),
    distilled on every Detect level, deployed and evaluated. minmax INT8 calibration: at 64 px
    YOLO11's attention spans a 2x2 map, whose near-constant softmax the default percentile
    histogram refuses (test_quantize checks that message)."""
    overrides = _merge(
        json.loads(json.dumps(TINY)),
        {
            "baseline": {"model": model},
            "distill": {"level_weights": level_weights},
            "trt_build": {"int8_calibration": "minmax"},
        },
    )
    repo, env = make_repo(tmp_path, overrides)
    out = _run([sys.executable, "-m", "dvc", "repro"], repo, env)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    pruned = json.loads((repo / "reports/prune/prune.json").read_text())
    assert pruned["params_after_m"] < 0.5 * pruned["params_before_m"]
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert metrics["distilled"]["params_m"] == metrics["pruned"]["params_m"]
    assert metrics["deployed"]["params_m"] == metrics["pruned"]["params_m"]
    check = (
        "from stages.yolo.models import load_detector; "
        "m = load_detector('models/distilled.pt').model; "
        "print(type(m.model[-1]).__name__, len(m.stride), "
        "sum(hasattr(x, 'pruned_splits') for x in m.modules()))"
    )
    head, strides, resized = _run([sys.executable, "-c", check], repo, env).split()[-3:]
    assert head == "Detect" and int(strides) == levels and int(resized) > 0


def test_second_repro_is_a_no_op(tiny_repo: tuple[Path, dict]) -> None:
    repo, env = tiny_repo
    _reproduced(repo, env)
    out = _run([sys.executable, "-m", "dvc", "repro"], repo, env)
    assert "Running stage" not in out
    status = _run([sys.executable, "-m", "dvc", "status"], repo, env)
    assert "up to date" in status


@pytest.mark.parametrize(
    ("override", "first_stale"),
    [
        ("evaluate.latency_repeats=4", "evaluate"),
        ("distill.temperature=2.0", "distill"),
        ("prune.ratio=0.7", "prune"),
        ("sparse_train.coefficient=0.02", "sparse_train"),
    ],
)
def test_changing_one_param_reruns_exactly_its_stage_and_downstream(
    tiny_repo: tuple[Path, dict], override: str, first_stale: str
) -> None:
    repo, env = tiny_repo
    _reproduced(repo, env)
    out = _run([sys.executable, "-m", "dvc", "exp", "run", "-S", override], repo, env)
    ran = [s for s in STAGES if f"Running stage '{s}'" in out]
    assert ran == list(STAGES[STAGES.index(first_stale) :])


def test_an_experiment_shows_in_metrics_diff_plots_diff_pr_comment_and_pareto(
    tiny_repo: tuple[Path, dict],
) -> None:
    repo, env = tiny_repo
    _reproduced(repo, env)
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "exp", "run", "-n", "ratio-half", "-S", "prune.ratio=0.5"], repo, env)

    diff = json.loads(_run([*dvc, "metrics", "diff", "HEAD", "--json"], repo, env))
    ratio = diff["reports/prune/prune.json"]["ratio"]
    assert (ratio["old"], ratio["new"]) == (0.6, 0.5)
    assert "pruned.params_m" in diff["reports/metrics.json"]
    table = _run([*dvc, "metrics", "diff", "HEAD", "--md"], repo, env)
    assert "| reports/prune/prune.json" in table and "ratio_achieved" in table

    plots = json.loads(_run([*dvc, "plots", "diff", "HEAD", "--json"], repo, env))
    assert not plots.get("errors"), plots["errors"]
    for title in ("accuracy vs params", "channels kept per layer", "reports/evaluate/accuracy.png"):
        assert title in plots["data"]
    rendered = repo.parent / "plots"
    _run([*dvc, "plots", "diff", "HEAD", "-o", str(rendered)], repo, env)
    assert "accuracy vs CPU latency" in (rendered / "index.html").read_text()

    comment = _run([sys.executable, "-m", "stages.tools.pr_comment", "--base", "HEAD"], repo, env)
    assert "| params.yaml | prune.ratio" in comment and "ratio_achieved" in comment
    assert "![AP50 per class](reports/evaluate/per_class_ap50.png)" in comment

    sweep = repo.parent / "sweep"
    _run([sys.executable, "-m", "stages.tools.pareto", "--out", str(sweep)], repo, env)
    rows = (sweep / "pareto.csv").read_text().splitlines()
    assert rows[0].startswith("experiment,") and "prune.ratio" in rows[0]
    assert any(row.startswith("ratio-half,") for row in rows[1:]) and len(rows) >= 3
    assert (sweep / "pareto.png").stat().st_size > 1000


def test_distill_ablation_runs_all_three_arms_and_reports_on_test(
    tiny_repo: tuple[Path, dict],
) -> None:
    """The ablation tool end to end: two CWD candidates screened on val over two seeds, then
    plain fine-tuning, the chosen CWD and ultralytics' own distillation (its `distill_model`
    train arg on our pruned student) over three."""
    repo, env = tiny_repo
    _reproduced(repo, env)
    out_dir = repo.parent / "ablation"
    command = [sys.executable, "-m", "stages.tools.distill_ablation", "--seeds", "0", "1", "2"]
    command += ["--screen-seeds", "2", "--weights", "0.1", "--temperatures", "1", "4"]
    _run([*command, "--out", str(out_dir)], repo, env)
    rows = (out_dir / "ablation.csv").read_text().splitlines()
    assert rows[0].startswith("arm,seed,weight,temperature,val_ap50,")
    runs = Counter(r.split(",")[0] for r in rows[1:])
    chosen = next(arm for arm, n in runs.items() if arm.startswith("cwd") and n == 3)
    unchosen = ({"cwd w0.1 tau1", "cwd w0.1 tau4"} - {chosen}).pop()
    assert runs == {"plain": 3, chosen: 3, unchosen: 2, "ultralytics": 3}
    report = (out_dir / "ablation.md").read_text()
    assert "(mean val AP50 over seeds 0, 1)" in report
    assert f"| {chosen} (chosen) |" in report and "| ultralytics |" in report
    # The built-in distillation saved the bare pruned student, not its wrapper or the teacher.
    check = (
        "from stages.yolo.models import load_detector; "
        "a = load_detector('.cache/distill_ablation/ablation-ultralytics-s0.pt'); "
        "b = load_detector('models/pruned.pt'); "
        "print(sum(p.numel() for p in a.model.parameters()) == "
        "sum(p.numel() for p in b.model.parameters()))"
    )
    assert _run([sys.executable, "-c", check], repo, env).split()[-1] == "True"
    # Cached: a second call trains nothing and writes the same report.
    again = _run([*command, "--out", str(out_dir)], repo, env)
    assert "Starting training" not in again and (out_dir / "ablation.md").read_text() == report


def test_ddp_worker_script_runs_our_trainers_with_their_settings(
    tiny_repo: tuple[Path, dict],
) -> None:
    """ultralytics' generated multi-GPU worker script, run as one CPU worker (see tests/ddp_launch):
    it imports our trainer classes in a fresh process and trains with the stages' settings."""
    repo, env = tiny_repo
    _reproduced(repo, env)
    out = _run([sys.executable, "-m", "tests.ddp_launch"], repo, env)
    printed = [json.loads(line) for line in out.splitlines() if line.startswith('{"trainer"')]
    rows = {row["trainer"]: row for row in printed}
    sparse, distilled = rows["sparse_train"], rows["distill"]
    # the schedule arrived: the coefficient it ended on is within its bounds of the start's
    assert (
        sparse["coefficient"] / 1000
        <= sparse["sparsity/coefficient"]
        <= sparse["coefficient"] * 1000
    )
    assert sparse["coefficient"] > 0
    assert sparse["sparsity/gamma_l1"] > 0
    assert distilled["weight"] > 0 and distilled["train/cwd_loss"] > 0  # teacher + aligners arrived
    assert "lr/pg3" in distilled  # the aligners' parameter group
    assert not list(
        (repo / ".cache/ultralytics/Ultralytics/DDP").iterdir()
    )  # worker scripts cleaned up
    assert list(Path(env["HOME"]).iterdir()) == []


def test_a_queued_sweep_over_flops_budgets_runs_on_two_workers_and_feeds_pareto(
    tiny_repo: tuple[Path, dict],
) -> None:
    """`-S prune.budget.gflops=...` from the default params (where it is null) sets one budget;
    the yolov8n of the tiny profile has 0.081 GFLOPs at imgsz 64."""
    repo, env = tiny_repo
    _reproduced(repo, env)
    dvc = [sys.executable, "-m", "dvc"]
    base_ratio = yaml.safe_load((repo / "params.yaml").read_text())["prune"]["ratio"]
    for name, gflops in (("queued-a", 0.05), ("queued-b", 0.03)):
        setting = f"prune.budget.gflops={gflops}"
        _run([*dvc, "exp", "run", "--queue", "-n", name, "-S", setting], repo, env)
    assert "Started '2' new" in _run([*dvc, "queue", "start", "-j", "2"], repo, env)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = _run([*dvc, "queue", "status"], repo, env)
            if not re.search(r"\b(Queued|Running)\b", status):
                break
            time.sleep(3)
    finally:
        _run([*dvc, "queue", "stop", "--kill"], repo, env)
    assert re.search(r"queued-a\s.*Success", status) and re.search(r"queued-b\s.*Success", status)
    found = {
        e["name"]: e
        for e in experiments(json.loads(_run([*dvc, "exp", "show", "--json"], repo, env)))
    }
    budgets = {n: found[n]["params"]["prune.budget.gflops"] for n in ("queued-a", "queued-b")}
    assert budgets == {"queued-a": 0.05, "queued-b": 0.03}
    for name, gflops in budgets.items():  # each searched its own ratio and met its budget
        pruned = found[name]["metrics"]["pruned"]
        assert pruned["gflops"] <= gflops and found[name]["params"]["prune.ratio"] == base_ratio
    a, b = (found[n]["metrics"]["pruned"]["gflops"] for n in ("queued-a", "queued-b"))
    assert a > b
    sweep = repo.parent / "budget-sweep"
    _run([sys.executable, "-m", "stages.tools.pareto", "--out", str(sweep)], repo, env)
    rows = (sweep / "pareto.csv").read_text().splitlines()
    assert "prune.budget.gflops" in rows[0]
    assert {"queued-a", "queued-b"} <= {row.split(",")[0] for row in rows[1:]}


def test_a_dvc_remote_gives_a_fresh_clone_the_results_without_rerunning(
    tiny_repo: tuple[Path, dict],
) -> None:
    """Another machine: a git clone that `dvc pull`s the committed results from a shared remote
    (a local folder here; S3, SSH etc. work the same) is up to date and `dvc repro` runs nothing."""
    repo, env = tiny_repo
    _reproduced(repo, env)
    dvc = [sys.executable, "-m", "dvc"]
    remote = repo.parent / "remote"
    _run([*dvc, "remote", "add", "--local", "-d", "shared", str(remote)], repo, env)
    _run([*dvc, "push", "--all-commits"], repo, env)

    clone = repo.parent / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], repo.parent, env)
    clone_env = {**env, "PYTHONPATH": str(clone)}
    _run([*dvc, "remote", "add", "--local", "-d", "shared", str(remote)], clone, clone_env)
    _run([*dvc, "pull"], clone, clone_env)
    assert (clone / "models/distilled.pt").stat().st_size > 100_000
    assert "up to date" in _run([*dvc, "status"], clone, clone_env)
    assert "Running stage" not in _run([*dvc, "repro"], clone, clone_env)


def test_pr_report_shows_only_what_the_pr_changed_with_and_without_a_remote(
    tiny_repo: tuple[Path, dict],
) -> None:
    """A PR that changes prune.ratio, reported as CI would. With a remote, CI pulls the base's
    outputs and re-runs only prune and what follows. Without one, CI re-runs everything, on
    "another machine" here (torch's portable kernels instead of AVX2); the comment must still
    attribute only the pruned models' metrics to the PR and list the rest as noise."""
    repo, env = tiny_repo
    _reproduced(repo, env)
    dvc = [sys.executable, "-m", "dvc"]
    remote = repo.parent / "pr-remote"
    _run([*dvc, "remote", "add", "--local", "-f", "-d", "shared", str(remote)], repo, env)
    _run([*dvc, "push", "--all-commits"], repo, env)
    origin = repo.parent / "origin"
    _run(["git", "clone", "-q", str(repo), str(origin)], repo.parent, env)
    base = _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], origin, env).strip()
    _run(["git", "checkout", "-qb", "pr"], origin, env)
    params = yaml.safe_load((origin / "params.yaml").read_text())
    params["prune"]["ratio"] = 0.7
    (origin / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "commit", "-qam", "prune harder"], origin, env)
    _run(["git", "checkout", "-q", base], origin, env)

    def pr_checkout(name: str, **extra_env: str) -> tuple[Path, dict[str, str]]:
        clone = repo.parent / name
        _run(["git", "clone", "-q", "-b", "pr", str(origin), str(clone)], repo.parent, env)
        return clone, {**env, "PYTHONPATH": str(clone), **extra_env}

    def comment(clone: Path, clone_env: dict[str, str]) -> tuple[str, str]:
        text = _run(
            [sys.executable, "-m", "stages.tools.pr_comment", "--base", f"origin/{base}"],
            clone,
            clone_env,
        )
        caused, noise = text.split("### Metrics that moved without a cause in this PR")
        return caused, noise.split("### Environment")[0]

    # With a remote: only what the PR changed runs; the pruned models' metrics are the PR's.
    clone, clone_env = pr_checkout("pr-with-remote")
    _run([*dvc, "remote", "add", "--local", "-d", "shared", str(remote)], clone, clone_env)
    out = _run([*dvc, "repro", "--pull", "--allow-missing"], clone, clone_env)
    assert [s for s in STAGES if f"Running stage '{s}'" in out] == list(STAGES[3:])
    caused, noise = comment(clone, clone_env)
    assert "Stages whose inputs this PR changed: `distill`, `evaluate`, `prune`, `trt_build`." in (
        caused
    )
    assert "| reports/metrics.json | pruned.params_m |" in caused
    assert "| reports/prune/prune.json | ratio |" in caused
    assert "| reports/metrics.json | baseline." not in caused
    assert "| reports/metrics.json | sparse." not in caused
    # evaluate re-timed the unchanged baseline: its latency moved, and is listed as noise.
    noise_rows = [line for line in noise.splitlines() if line.startswith("| reports/")]
    assert all(row.split(" | ")[1].split(".")[0] in ("baseline", "sparse") for row in noise_rows), (
        noise_rows
    )

    # Without a remote, on another machine: everything re-runs, and what the PR did not change
    # is kept apart.
    clone, clone_env = pr_checkout("pr-no-remote", ATEN_CPU_CAPABILITY="default")
    out = _run([*dvc, "repro"], clone, clone_env)
    assert [s for s in STAGES if f"Running stage '{s}'" in out] == list(STAGES)
    caused, noise = comment(clone, clone_env)
    assert "| reports/metrics.json | pruned.params_m |" in caused
    # (trt_build re-ran, so its record of the baseline's export is the PR's stage output.)
    assert "| reports/metrics.json | baseline." not in caused and "`baseline`" not in caused
    assert "| reports/metrics.json | baseline.cpu_latency_ms |" in noise
    print(caused + noise)  # the comment's two sections, shown with `pytest -s`
    text = _run(
        [sys.executable, "-m", "stages.tools.pr_comment", "--base", f"origin/{base}"],
        clone,
        clone_env,
    )
    assert "`kernel_caps.ATEN_CPU_CAPABILITY`: avx2 → default" in text or not has_avx2()


def _output_hashes(repo: Path) -> dict[str, str]:
    """sha256 of every file the pipeline writes (models, the dataset, reports)."""
    files = [p for d in ("models", "data/yolo", "reports") for p in (repo / d).rglob("*")]
    return {
        str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(files)
        if p.is_file()
    }


def _stage_run(stage: str, repo: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python -m stages.<stage>`` in ``repo``, its output captured, whatever its exit status."""
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}"], cwd=repo, env=env, capture_output=True, text=True
    )


def _failed_repro(repo: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert done.returncode != 0, done.stdout[-2000:]
    return done.stdout + done.stderr


MISTAKES = [
    ("baseline.epochs", 0, "baseline.epochs = 0 is invalid: expected an integer in [1, 10000]"),
    ("imgsz", 250, "imgsz = 250 is invalid"),
    ("distill.teacher", "baselin", "distill.teacher = 'baselin' is invalid: expected one of"),
    ("sparse_train.exclude", ["model.99"], "exclude prefix 'model.99' names no BatchNorm"),
    ("device", "7", "device = '7' names CUDA device 7, but torch sees"),
]


@pytest.mark.parametrize(("key", "value", "message"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_params_mistake_under_dvc_repro_keeps_the_last_good_outputs(
    tiny_repo: tuple[Path, dict], key: str, value: object, message: str
) -> None:
    """DVC would delete a stage's outputs before the stage refuses its params; with persist the
    last good ones stay, byte for byte, and the message is one line without a traceback."""
    repo, env = tiny_repo
    _reproduced(repo, env)
    before, text = _output_hashes(repo), (repo / "params.yaml").read_text()
    params = yaml.safe_load(text)
    *parents, leaf = key.split(".")
    node = params
    for name in parents:
        node = node[name]
    node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        out = _failed_repro(repo, env)
    finally:
        (repo / "params.yaml").write_text(text)
    lines = [line for line in out.splitlines() if message in line]
    assert lines and lines[0].split(":")[0] in STAGES, out[-3000:]
    assert "Traceback" not in out
    assert _output_hashes(repo) == before
    assert "up to date" in _run([sys.executable, "-m", "dvc", "status"], repo, env)


def test_a_duplicate_params_key_is_refused_with_its_line(tiny_repo: tuple[Path, dict]) -> None:
    repo, env = tiny_repo
    _reproduced(repo, env)
    text = (repo / "params.yaml").read_text()
    doubled = text.replace("seed: 0\n", "seed: 0\nseed: 1\n", 1)
    assert doubled != text
    (repo / "params.yaml").write_text(doubled)
    try:
        done = _stage_run("prune", repo, env)
    finally:
        (repo / "params.yaml").write_text(text)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert re.search(r"params\.yaml:\d+: the key 'seed' is given twice", done.stderr)


DAMAGED = {
    "truncate": "model.int8.onnx",
    "delete": "model.int8.onnx",
    "record": "deploy.json",
    "openvino": "model_int8_openvino_model/model_int8.bin",
}


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_a_broken_deployed_artifact_is_named_in_one_line(
    tiny_repo: tuple[Path, dict], damage: str
) -> None:
    repo, env = tiny_repo
    _reproduced(repo, env)
    target = repo / "models/deploy" / DAMAGED[damage]
    if damage == "delete":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:300])
    try:
        done = _stage_run("evaluate", repo, env)
    finally:
        _run([sys.executable, "-m", "dvc", "checkout", "-f", "models/deploy"], repo, env)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "evaluate: " in done.stderr and "dvc repro -f trt_build" in done.stderr
    assert "up to date" in _run([sys.executable, "-m", "dvc", "status"], repo, env)


def test_ctrl_c_under_dvc_repro_is_one_line_and_keeps_the_outputs(
    tiny_repo: tuple[Path, dict],
) -> None:
    repo, env = tiny_repo
    _reproduced(repo, env)
    before = _output_hashes(repo)
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "-f", "-s", "distill"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group, as a terminal's Ctrl-C reaches
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (repo / ".cache/runs/distill").exists():
        time.sleep(0.5)
    time.sleep(3)  # inside training
    os.killpg(process.pid, signal.SIGINT)
    out, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "distill: interrupted; no output is half-written" in out
    assert "Traceback" not in out, out[-3000:]
    assert _output_hashes(repo) == before
    assert "up to date" in _run([sys.executable, "-m", "dvc", "status"], repo, env)


def test_the_dataset_stage_sees_its_raw_input(tiny_repo: tuple[Path, dict]) -> None:
    repo, env = tiny_repo
    _reproduced(repo, env)
    extra = repo / "data/raw/visdrone/VisDrone2019-DET-train/images/new.jpg"
    extra.parent.mkdir(parents=True)
    extra.write_bytes(b"a frame")
    try:
        status = _run([sys.executable, "-m", "dvc", "status", "dataset"], repo, env)
    finally:
        shutil.rmtree(repo / "data/raw/visdrone")
    assert "data/raw" in status and "modified" in status
    assert "up to date" in _run([sys.executable, "-m", "dvc", "status"], repo, env)


def test_a_stage_refuses_to_run_inside_another_checkout(
    tiny_repo: tuple[Path, dict], tmp_path: Path
) -> None:
    """This package (on the path) run from inside another project would read and write this
    one's files: refused, naming both."""
    repo, env = tiny_repo
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(repo / name, other / name)
    done = subprocess.run(
        [sys.executable, "-c", "import stages.prune"],
        cwd=other / "sub",
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"inside the project {other}" in done.stderr and str(repo) in done.stderr


def test_real_visdrone_frames_flow_through_every_stage(
    tmp_path: Path, visdrone_sample: Path
) -> None:
    """The real sample (1360x765 and 1920x1080 frames, up to ~250 boxes each) as a VisDrone tree:
    its one split serves as train and val, with a small budget."""
    real = {
        **TINY,
        "imgsz": 160,
        "dataset": {
            "source": "visdrone",
            "visdrone": {
                "root": str(visdrone_sample.parent),
                "train_dir": visdrone_sample.name,
                "val_dir": visdrone_sample.name,
                "max_images": 12,
            },
        },
    }
    repo, env = make_repo(tmp_path, real)
    out = _run([sys.executable, "-m", "dvc", "repro"], repo, env)
    assert [s for s in STAGES if f"Running stage '{s}'" in out] == list(STAGES)

    stats = json.loads((repo / "reports/dataset/stats.json").read_text())
    assert stats["source"] == "visdrone" and stats["val"]["images"] == 12
    assert stats["val"]["boxes_per_image"] > 50  # crowded real frames, not the synthetic scenes
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert list(metrics) == [*MODELS, *DEPLOYED_ROWS]
    assert metrics["pruned"]["params_m"] < metrics["baseline"]["params_m"]
    summary = (repo / "reports/summary.md").read_text()
    assert "| deployed |" in summary
    print(summary)  # the real-data run's table, shown with `pytest -s`
