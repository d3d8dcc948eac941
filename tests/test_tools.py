"""The tools: Pareto front and experiment parsing, the PR comment's Markdown, profile switching."""

from __future__ import annotations

import importlib
import random

import pytest
import yaml

from stages.common import params as P
from stages.tools.distill_ablation import markdown, summarize
from stages.tools.pareto import experiments, pareto_front, sweep_rows
from stages.tools.pr_comment import build_comment
from stages.tools.profile import apply_profile, load_profile, profiles
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


def _rev(name: str | None, rev: str, ratio: float, ap50: float, ms: float) -> dict:
    metrics = {"deployed": {"ap50": ap50, "map50_95": ap50 / 2, "params_m": ratio, "gflops": 1.0}}
    metrics["deployed"]["cpu_latency_ms"] = ms
    return {
        "rev": rev,
        "name": name,
        "error": None,
        "data": {
            "params": {"params.yaml": {"data": {"seed": 0, "prune": {"ratio": ratio}}}},
            "metrics": {"reports/metrics.json": {"data": metrics}},
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
            ],
        },
    ]
    found = experiments(shown)
    assert [e["name"] for e in found] == ["main", "r7", "ccccccc", "broken"]
    assert found[1]["params"]["prune.ratio"] == 0.7 and found[3]["error"]
    rows = sweep_rows(found, "deployed")
    assert [r["experiment"] for r in rows] == ["main", "r7", "ccccccc"]
    assert {k for k in rows[0] if "." in k} == {"prune.ratio"}  # seed never varies
    assert [r["front_latency"] for r in rows] == [True, True, False]


def test_pr_comment_has_every_section_and_says_when_nothing_changed() -> None:
    header_only = "| Path | Metric | main | workspace | Change |\n|---|---|---|---|---|\n"
    changed = header_only + "| reports/metrics.json | pruned.ap50 | 0.6 | 0.7 | 0.1 |\n"
    comment = build_comment(
        "origin/main",
        header_only,
        changed,
        "| model |\n|---|\n| baseline |",
        {"Accuracy": "reports/evaluate/accuracy.png"},
    )
    assert comment.startswith("## Compression pipeline: this PR vs `origin/main`")
    assert "No params changed." in comment
    assert "| reports/metrics.json | pruned.ap50 | 0.6 | 0.7 | 0.1 |" in comment
    assert "| baseline |" in comment
    assert "![Accuracy](reports/evaluate/accuracy.png)" in comment
    bare = build_comment("HEAD", "", "", "", {})
    assert "No metric changed." in bare and "did `dvc repro` run?" in bare and "###" in bare
    assert "Plots" not in bare


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
def test_the_paper_profile_passes_every_stage_validation(stage: str) -> None:
    paper, _ = apply_profile((PROJECT_ROOT / "params.yaml").read_text(), load_profile("visdrone"))
    schema = importlib.import_module(f"stages.{stage}").SCHEMA
    P.validate(schema, yaml.safe_load(paper))


def test_a_profile_key_params_yaml_lacks_is_refused() -> None:
    with pytest.raises(KeyError, match=r"prune\.ratoi"):
        apply_profile((PROJECT_ROOT / "params.yaml").read_text(), {"prune": {"ratoi": 0.5}})


def test_ablation_summary_pairs_each_seed_with_plain_fine_tuning() -> None:
    rows = [
        {"weight": w, "seed": seed, "ap50": ap50, "map50_95": ap50 / 2}
        for w, results in ((0.0, (0.70, 0.72, 0.74)), (1.0, (0.71, 0.71, 0.76)))
        for seed, ap50 in enumerate(results)
    ]
    plain, cwd = summarize(rows)
    assert plain["weight"] == 0 and "ap50_gain" not in plain
    assert plain["ap50"] == pytest.approx(0.72) and plain["ap50_std"] == pytest.approx(0.02)
    assert plain["map50_95"] == pytest.approx(0.36)
    # Paired differences by hand: +0.01, -0.01, +0.02.
    assert cwd["ap50_gain"] == pytest.approx(0.02 / 3)
    assert cwd["ap50_gain_std"] == pytest.approx(0.0152753, abs=1e-6)
    assert cwd["wins"] == 2 and cwd["seeds"] == 3
    cfg = {"teacher": "baseline", "temperature": 1.0, "level_weights": [1, 1, 0.5], "epochs": 4}
    table = markdown([plain, cwd], cfg)
    assert "| 1 | 3 | 0.7267 ± 0.0289 |" in table and "+0.0067 ± 0.0153 | 2/3 seeds |" in table
