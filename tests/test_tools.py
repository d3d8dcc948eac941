"""The tools: Pareto front and experiment parsing, the PR comment's Markdown, profile switching."""

from __future__ import annotations

import importlib
import random

import pytest
import yaml

from stages.pipeline.cli import UserError
from stages.pipeline.params import validate
from stages.tools.distill_ablation import choose_cwd, interval, markdown, paired
from stages.tools.finetune_curve import knee
from stages.tools.pareto import decision, experiments, fastest_within, pareto_front, sweep_rows
from stages.tools.pr_comment import (
    build_comment,
    changed_stages,
    environment_diff,
    metric_stages,
    split_metrics,
)
from stages.tools.profile import apply_profile, load_profile, profiles
from stages.tools.teacher_curve import converged_at, seed_noise, with_settings
from tests.conftest import PROJECT_ROOT, STAGES


def test_pareto_front_by_hand() -> None:
    # (cost, accuracy): b is cheaper and better than c; d ties a on cost but is worse.
    costs = [1.0, 2.0, 3.0, 1.0, 4.0]
    accuracies = [0.5, 0.7, 0.6, 0.4, 0.9]
    assert pareto_front(costs, accuracies) == [True, True, False, False, True]
    assert pareto_front([1.0, 1.0], [0.5, 0.5]) == [True, True]  # equal points dominate nothing


def test_pareto_front_matches_a_reference_by_cost_levels() -> None:
    """Independent formulation: a point is on the front iff it beats every strictly cheaper
    point and is the best of the points of its own cost."""
    rng = random.Random(0)
    for _ in range(200):
        points = [(rng.randint(1, 5), rng.randint(1, 5)) for _ in range(rng.randint(1, 9))]
        expected = [
            a > max((a2 for c2, a2 in points if c2 < c), default=0)
            and a == max(a2 for c2, a2 in points if c2 == c)
            for c, a in points
        ]
        got = pareto_front([c for c, _ in points], [a for _, a in points])
        assert got == expected, points


def _rev(
    name: str | None, rev: str, ratio: float, ap50: float, ms: float, twin_ms: float = 12.0
) -> dict:
    metrics = {"deployed": {"ap50": ap50, "map50_95": ap50 / 2, "params_m": ratio, "gflops": 1.0}}
    metrics["deployed"]["cpu_latency_ms"] = ms
    metrics["baseline_deployed"] = {"cpu_latency_ms": twin_ms}  # timed in the same run
    metrics["baseline"] = {"gflops": 1.0 + ratio}
    return {
        "rev": rev,
        "name": name,
        "error": None,
        "data": {
            "params": {"params.yaml": {"data": {"seed": 0, "prune": {"ratio": ratio}}}},
            "metrics": {
                "reports/metrics.json": {"data": metrics},
                "reports/distill/distill.json": {"data": {"ap50": ap50 + 0.01}},
            },
        },
    }


def test_experiments_flatten_dvc_exp_show_and_keep_only_varying_params() -> None:
    # The shape of `dvc exp show --json` (DVC 3): commits, each with experiments with revs.
    failed = {"rev": "f" * 40, "name": "broken", "error": {"msg": "failed"}, "data": {}}
    shown = [
        {**_rev(None, "workspace", 0.6, 0.7, 9.0), "experiments": None},
        {
            **_rev("main", "a" * 40, 0.6, 0.7, 9.0),
            "experiments": [
                {"name": "r7", "revs": [_rev("r7", "b" * 40, 0.7, 0.65, 8.0)]},
                {"name": None, "revs": [_rev(None, "c" * 40, 0.5, 0.6, 9.5)]},
                {"name": "broken", "revs": [failed]},
                {  # a running experiment shows its base's metrics until it is done
                    "name": "busy",
                    "executor": {"state": "running"},
                    "revs": [_rev("busy", "d" * 40, 0.9, 0.9, 1.0)],
                },
            ],
        },
    ]
    found = experiments(shown)
    assert [e["name"] for e in found] == ["main", "r7", "ccccccc", "broken", "busy"]
    assert found[1]["params"]["prune.ratio"] == 0.7 and found[3]["error"]
    assert found[4]["error"] == "experiment running"
    rows = sweep_rows(found, "deployed")
    assert [r["experiment"] for r in rows] == ["main", "r7", "ccccccc"]
    assert {k for k in rows[0] if "." in k} == {"prune.ratio"}  # seed never varies
    assert [r["front_latency"] for r in rows] == [True, True, False]
    # r7: 1 GFLOPs out of 1.7 unpruned is a 41.2% cut; its distilled val AP50 is 0.66.
    assert (rows[1]["val_ap50"], rows[1]["flops_cut"]) == (0.66, round(1 - 1 / 1.7, 4))
    # val decides, not test: within 3% of 0.70 (>= 0.679) only main (val 0.71, 9 ms) is left;
    # within 3% of 0.65 (>= 0.6305) r7 (0.66, 8 ms) joins it and is faster; none keeps 0.7275.
    assert fastest_within(rows, 0.70, 0.03)["experiment"] == "main"
    assert fastest_within(rows, 0.65, 0.03)["experiment"] == "r7"
    assert fastest_within(rows, 0.75, 0.03) is None
    assert decision(rows, 0.65, 0.03).startswith(
        "Decided on val: **r7** is the fastest (8.00 ms, 1.50x its run's baseline)"
    )
    # Speed is the ratio within each run: r7's lower latency came from a faster run (its
    # baseline took 8.8 ms, main's 12), so main, 1.33x its own baseline, is the faster model.
    fast_run = {"name": "r7", "revs": [_rev("r7", "b" * 40, 0.7, 0.65, 8.0, twin_ms=8.8)]}
    shown[1]["experiments"] = [fast_run]
    assert fastest_within(sweep_rows(experiments(shown), "deployed"), 0.65, 0.03)["experiment"] == (
        "main"
    )
    assert decision(rows, 0.75, 0.03) == "No experiment keeps 97% of val AP50 0.7500."


def _lock(ratio: float, code: str = "a1", baseline_model: str = "m1") -> dict:
    """A three-stage dvc.lock: baseline -> prune -> evaluate (models flow as outs -> deps)."""
    return {
        "stages": {
            "baseline": {
                "cmd": "python -m stages.baseline",
                "deps": [{"path": "stages/baseline.py", "md5": "b1"}],
                "params": {"params.yaml": {"baseline": {"epochs": 5}}},
                "outs": [{"path": "models/baseline.pt", "md5": baseline_model}],
            },
            "prune": {
                "cmd": "python -m stages.prune",
                "deps": [
                    {"path": "models/baseline.pt", "md5": baseline_model},
                    {"path": "stages/prune.py", "md5": code},
                ],
                "params": {"params.yaml": {"prune": {"ratio": ratio}}},
                "outs": [{"path": "models/pruned.pt", "md5": f"p{ratio}{baseline_model}"}],
            },
            "evaluate": {
                "cmd": "python -m stages.evaluate",
                "deps": [{"path": "models/pruned.pt", "md5": f"p{ratio}{baseline_model}"}],
                "outs": [{"path": "reports/summary.md", "md5": "s"}],
            },
        }
    }


def test_changed_stages_follow_own_inputs_not_upstream_noise() -> None:
    # Another machine retrained the baseline (new model hash), nothing else changed: no stage
    # is the PR's, although every downstream dep hash differs.
    assert changed_stages(_lock(0.6), _lock(0.6, baseline_model="m2")) == (set(), set())
    # A param or a code change is the PR's, and so is everything downstream of it.
    assert changed_stages(_lock(0.6), _lock(0.7, baseline_model="m2")) == (
        {"prune"},
        {"prune", "evaluate"},
    )
    assert changed_stages(_lock(0.6), _lock(0.6, code="a2"))[1] == {"prune", "evaluate"}
    assert changed_stages({}, _lock(0.6))[0] == {"baseline", "prune", "evaluate"}  # no base lock


def test_metrics_are_split_into_the_prs_and_noise() -> None:
    files = metric_stages(
        {"stages": {"prune": {"metrics": [{"reports/prune/prune.json": {"cache": False}}]}}}
    )
    assert files == {"reports/prune/prune.json": "prune"}
    files["reports/metrics.json"] = "evaluate"
    diff = {
        "reports/metrics.json": {
            "baseline.cpu_latency_ms": {"old": 19.0, "new": 20.0, "diff": 1.0},
            "pruned.ap50": {"old": 0.6, "new": 0.5, "diff": -0.1},
            "deployed.ap50": {"old": 0.6, "new": 0.5, "diff": -0.1},
        },
        "reports/prune/prune.json": {"ratio_requested": {"old": 0.6, "new": 0.7, "diff": 0.1}},
    }
    caused, noise = split_metrics(diff, files, {"prune"}, {"prune", "distill", "trt_build"})
    assert [r[1] for r in caused] == ["pruned.ap50", "deployed.ap50", "ratio_requested"]
    assert [r[1] for r in noise] == ["baseline.cpu_latency_ms"]
    # A change to evaluate itself (e.g. its batch) makes every model's metrics the PR's.
    caused, noise = split_metrics(diff, files, {"evaluate"}, {"evaluate"})
    assert len(caused) == 3 and [r[1] for r in noise] == ["ratio_requested"]


def test_environment_diff_names_what_differs() -> None:
    a = {"packages": {"torch": "2.14.1", "numpy": "2.4"}, "threads": 2}
    b = {"packages": {"torch": "2.14.1", "numpy": "2.3"}, "threads": 2, "gpu": None}
    assert environment_diff(a, a) == []
    assert environment_diff(a, b) == ["`packages.numpy`: 2.4 → 2.3"]
    assert environment_diff(None, {"threads": 2}) == ["`threads`: None → 2"]


def test_pr_comment_has_every_section_and_says_when_nothing_changed() -> None:
    row = ("reports/metrics.json", "pruned.ap50", 0.6, 0.7, 0.1)
    noise = ("reports/metrics.json", "baseline.cpu_latency_ms", 19.0, 20.5, 1.5)
    comment = build_comment(
        "origin/main",
        "| Path | Param | main | workspace | Change |\n|---|---|---|---|---|\n",
        [row],
        [noise],
        {"prune", "evaluate"},
        ["`packages.numpy`: 2.4 → 2.3"],
        "| model |\n|---|\n| baseline |",
        {"Accuracy": "reports/evaluate/accuracy.png"},
    )
    assert comment.startswith("## Compression pipeline: this PR vs `origin/main`")
    assert "No params changed." in comment
    assert "Stages whose inputs this PR changed: `evaluate`, `prune`." in comment
    caused_part, noise_part = comment.split("### Metrics that moved without a cause")
    assert "| reports/metrics.json | pruned.ap50 | 0.6 | 0.7 | 0.1 |" in caused_part
    assert "baseline.cpu_latency_ms" in noise_part and "baseline" not in caused_part
    assert "- `packages.numpy`: 2.4 → 2.3" in comment
    assert "| baseline |" in comment
    assert "![Accuracy](reports/evaluate/accuracy.png)" in comment
    bare = build_comment("HEAD", "", [], [], set(), [], "", {})
    assert "No metric of these stages changed." in bare and "did `dvc repro` run?" in bare
    assert "None: every stage this PR did not change kept its metrics." in bare
    assert "Same environment record as the base." in bare and "Plots" not in bare


def test_profile_switch_and_back_restores_params_yaml_byte_for_byte() -> None:
    original = (PROJECT_ROOT / "params.yaml").read_text()
    paper, changes = apply_profile(original, load_profile("visdrone"))
    changed = {key: new for key, _, new in changes}
    assert changed["baseline.model"] == "data/raw/yolov8m.pt" and changed["imgsz"] == 640
    assert changed["prune.method"] == "uniform" and changed["dataset.source"] == "visdrone"
    assert "device: '0'" in paper  # a string that must stay a string
    assert "# square input size" in paper  # comments survive
    back, _ = apply_profile(paper, load_profile("default"))
    assert back == original


def test_default_profile_is_what_params_yaml_holds_and_covers_every_other_profile() -> None:
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    default = load_profile("default")

    def keys(tree: dict, prefix: str = "") -> set[str]:
        found = set()
        for k, v in tree.items():
            found |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
        return found

    def value(tree: dict, dotted: str) -> object:
        for part in dotted.split("."):
            tree = tree[part]
        return tree

    for key in keys(default):
        assert value(default, key) == value(params, key), key
    for name in profiles():
        assert keys(load_profile(name)) <= keys(default), name


@pytest.mark.parametrize("stage", STAGES)
def test_the_paper_profile_passes_every_stage_validation(
    stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the GPU machine it is for: its device '0' is checked against the machine, here one
    that has a single CUDA device."""
    monkeypatch.setattr("stages.pipeline.params.cuda_devices", lambda: 1)
    paper, _ = apply_profile((PROJECT_ROOT / "params.yaml").read_text(), load_profile("visdrone"))
    schema = importlib.import_module(f"stages.{stage}").SCHEMA
    validate(schema, yaml.safe_load(paper))


def test_a_profile_key_params_yaml_lacks_is_refused() -> None:
    with pytest.raises(UserError, match=r"prune\.ratoi"):
        apply_profile((PROJECT_ROOT / "params.yaml").read_text(), {"prune": {"ratoi": 0.5}})


def test_ablation_chooses_on_val_and_pairs_each_seed_on_test() -> None:
    def arm(name: str, val: tuple, test: tuple) -> list[dict]:
        return [
            {"arm": name, "seed": s, "val_ap50": v, "test_ap50": t, "test_map50_95": t / 2}
            for s, (v, t) in enumerate(zip(val, test, strict=True))
        ]

    rows = (
        arm("plain", (0.60, 0.60, 0.60), (0.70, 0.72, 0.74))
        # best on test, worst on val: must not be chosen
        + arm("cwd w1 tau1", (0.50, 0.50, 0.50), (0.90, 0.90, 0.90))
        + arm("cwd w0.1 tau1", (0.61, 0.62, 0.63), (0.71, 0.71, 0.76))
        + arm("ultralytics", (0.60, 0.60, 0.60), (0.69, 0.70, 0.71))
    )
    assert choose_cwd(rows, [0, 1, 2]) == "cwd w0.1 tau1"
    # Screened on seeds 0 and 1 (all a second candidate ran on): its seed 2 does not count.
    screen = arm("cwd w0.1 tau1", (0.60, 0.62, 0.70), (0.7,) * 3) + arm(
        "cwd w1 tau4", (0.63, 0.61), (0.7,) * 2
    )
    assert choose_cwd(screen, [0, 1]) == "cwd w1 tau4"  # 0.62 against 0.61, not 0.64
    assert "| cwd w1 tau4 (chosen) | 0.6200 ± 0.1271 |" in markdown(
        screen, "cwd w1 tau4", {"teacher": "baseline", "epochs": 4}, [0, 1]
    )
    # Paired differences by hand: +0.01, -0.01, +0.02 -> mean 0.00667, sd 0.0152753; the 95%
    # t quantile with 2 degrees of freedom is 4.302653.
    d = paired(rows, "cwd w0.1 tau1", "plain")
    assert d["mean"] == pytest.approx(0.02 / 3)
    assert d["half"] == pytest.approx(4.302653 * 0.0152753 / 3**0.5, abs=1e-6)
    assert (d["wins"], d["seeds"]) == (2, 3)
    assert interval([1.0, 1.0, 1.0]) == (1.0, 0.0)
    cfg = {"teacher": "baseline", "epochs": 4}
    table = markdown(rows, "cwd w0.1 tau1", cfg, [0, 1, 2])
    assert "| cwd w0.1 tau1 (chosen) |" in table
    assert "| cwd w0.1 tau1 − plain | +0.0067 ± 0.0379 | 2/3 seeds |" in table
    assert "| ultralytics | 0.7000 ± 0.0248 |" in table
    assert "0.9000" not in table.split("**Reported on test**")[1]  # the unchosen arm stays out


def test_teacher_curve_settings_change_one_key_and_refuse_unknown_ones() -> None:
    raw = {"seed": 0, "baseline": {"batch": 8, "lr0": 0.004}}
    changed = with_settings(raw, ["baseline.batch=2", "baseline.lr0=0.002", "seed=1"])
    assert changed == {"seed": 1, "baseline": {"batch": 2, "lr0": 0.002}}
    assert raw == {"seed": 0, "baseline": {"batch": 8, "lr0": 0.004}}  # the input is untouched
    for bad in ("baseline.batchsize=2", "baseline.batch", "nothing.batch=2", "seed.x=1"):
        with pytest.raises(UserError, match="expected KEY=VALUE"):
            with_settings(raw, [bad])


def test_teacher_curve_converges_where_no_larger_budget_adds_the_plateau() -> None:
    def points(*test_ap50: float) -> list[dict]:
        return [{"epochs": 10 * (i + 1), "test_ap50": a} for i, a in enumerate(test_ap50)]

    assert converged_at(points(0.50, 0.70, 0.795, 0.80), 0.01) == 30  # +0.005 after 30
    assert converged_at(points(0.50, 0.70, 0.705, 0.72), 0.01) is None  # 40 adds 0.015 over 30
    assert converged_at(points(0.70, 0.72, 0.715), 0.01) == 20  # a dip is not a gain
    assert converged_at(points(0.50, 0.70), 0.01) is None  # the largest budget is never enough
    noise = {0: {"epochs": 60, "test_ap50": 0.80}, 1: {"epochs": 60, "test_ap50": 0.7925}}
    assert seed_noise(noise) == (
        "Seed noise of the last point (60 epochs): test AP50 0.8000 (seed 0), 0.7925 (seed 1); "
        "spread 0.0075."
    )
    assert seed_noise({0: noise[0]}) == ""


def test_finetune_knee_is_the_shortest_budget_near_the_best_on_val() -> None:
    def points(*val_ap50: float) -> list[dict]:
        return [{"epochs": e, "val_ap50": a} for e, a in zip((0, 2, 4, 8), val_ap50, strict=True)]

    assert knee(points(0.1, 0.60, 0.702, 0.705), 0.005) == 4  # 0.705 - 0.702 < 0.005
    assert knee(points(0.1, 0.60, 0.690, 0.705), 0.005) == 8
    assert knee(points(0.1, 0.71, 0.700, 0.705), 0.005) == 2  # the best is the shortest
