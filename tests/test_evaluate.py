"""evaluate's COCO size AP, ground truth and summary table, against hand computations."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from stages import baseline, evaluate
from stages.datasets.visdrone import convert_split
from stages.evaluate import SCHEMA, coco_ground_truth, coco_size_ap, summary_table, teacher_verdict
from stages.pipeline.cli import UserError
from stages.pipeline.params import load
from tests.conftest import VISDRONE_SAMPLE


def _truth(boxes: list[tuple[float, float, float, float, int]]) -> dict:
    """One 640x640 image holding ``boxes`` (left, top, width, height, category id)."""
    return {
        "images": [{"id": 0, "file_name": "a.jpg", "width": 640, "height": 640}],
        "annotations": [
            {
                "id": i + 1,
                "image_id": 0,
                "category_id": c,
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": 0,
            }
            for i, (x, y, w, h, c) in enumerate(boxes)
        ],
        "categories": [{"id": 1}, {"id": 2}],
    }


def _detections(boxes: list[tuple[float, float, float, float, int]], scores: list[float]) -> list:
    return [
        {"file_name": "a.jpg", "category_id": c, "bbox": [x, y, w, h], "score": s}
        for (x, y, w, h, c), s in zip(boxes, scores, strict=True)
    ]


SMALL_A, SMALL_B = (10, 10, 10, 10, 1), (100, 100, 12, 12, 1)
MEDIUM = (300, 300, 50, 50, 2)  # 2500 px²: between 32² and 96²


def test_exact_detections_score_one_and_an_absent_size_is_none() -> None:
    truth = _truth([SMALL_A, SMALL_B, MEDIUM])
    ap = coco_size_ap(truth, _detections([SMALL_A, SMALL_B, MEDIUM], [0.9, 0.8, 0.7]))
    assert ap == {"ap_small": 1.0, "ap_medium": 1.0, "ap_large": None}


def test_a_missed_size_scores_zero_without_touching_the_others() -> None:
    truth = _truth([SMALL_A, SMALL_B, MEDIUM])
    ap = coco_size_ap(truth, _detections([SMALL_A, SMALL_B], [0.9, 0.8]))
    assert ap["ap_small"] == 1.0 and ap["ap_medium"] == 0.0


def test_a_false_positive_ranked_first_matches_the_hand_computed_ap() -> None:
    # Ranked: a false positive (precision 0 at recall 0), then one of the two objects (precision
    # 0.5 at recall 0.5); the other object is never found. COCO's interpolated precision is 0.5
    # at the 51 recall points 0, 0.01, ..., 0.5 and 0 at the other 50: AP = 0.5 * 51 / 101 at
    # every IoU threshold, since the one match is exact.
    truth = _truth([SMALL_A, SMALL_B])
    far_away = (500, 500, 10, 10, 1)
    ap = coco_size_ap(truth, _detections([far_away, SMALL_A], [0.95, 0.9]))
    assert ap["ap_small"] == pytest.approx(round(0.5 * 51 / 101, 4), abs=1e-9)


def test_no_detections_at_all_is_zero_not_an_error() -> None:
    assert coco_size_ap(_truth([SMALL_A, MEDIUM]), [])["ap_small"] == 0.0


@pytest.fixture(scope="module")
def real_truth(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """COCO ground truth of the real sample after our converter."""
    if not (VISDRONE_SAMPLE / "images").is_dir():
        pytest.skip(f"the real VisDrone sample is not at {VISDRONE_SAMPLE}")
    converted = tmp_path_factory.mktemp("converted")
    convert_split(VISDRONE_SAMPLE, converted, "val")
    return coco_ground_truth(converted / "images" / "val", converted / "labels" / "val", 10)


def test_ground_truth_from_converted_real_labels_is_in_original_pixels(real_truth: dict) -> None:
    """Boxes that lie inside their image come back exactly as the raw annotation drew them."""
    truth = real_truth
    assert len(truth["images"]) == 137 and len(truth["annotations"]) == 10_122

    image = truth["images"][0]
    raw = (VISDRONE_SAMPLE / "annotations" / f"{Path(image['file_name']).stem}.txt").read_text()
    inside = []
    for line in raw.splitlines():
        left, top, w, h, _score, category = (int(f) for f in line.rstrip(",").split(",")[:6])
        if 1 <= category <= 10 and left + w <= image["width"] and top + h <= image["height"]:
            inside.append((left, top, w, h, category))
    got = [(*a["bbox"], a["category_id"]) for a in truth["annotations"] if a["image_id"] == 0]
    assert len(inside) > 20
    for box in inside:
        assert any(all(abs(g - b) < 0.01 for g, b in zip(g_box, box, strict=True)) for g_box in got)


def test_crowded_real_frames_need_more_than_100_detections(real_truth: dict) -> None:
    """Perfect detections score 1 only when every object of a crowded frame may be kept."""
    truth = real_truth
    assert (
        max(sum(a["image_id"] == i["id"] for a in truth["annotations"]) for i in truth["images"])
        > 100
    )
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1}
        for a in truth["annotations"]
    ]
    assert coco_size_ap(truth, perfect) == {"ap_small": 1.0, "ap_medium": 1.0, "ap_large": 1.0}
    assert coco_size_ap(truth, perfect, max_detections=100)["ap_small"] < 1.0


def test_summary_table_compares_speed_on_the_same_runtime_and_end_to_end() -> None:
    def model(params: float, gflops: float, ap50: float, ms: float | None) -> dict:
        row = {"params_m": params, "gflops": gflops, "gmacs": gflops / 2, "ap50": ap50}
        row |= {"map50_95": 0.3, "ap_small": 0.2, "ap_medium": 0.4, "ap_large": None}
        return row | ({} if ms is None else {"cpu_latency_ms": ms, "cpu_fps": 1000 / ms})

    metrics = {
        "baseline": model(4.0, 2.0, 0.80, 10.0),
        "pruned": model(1.0, 1.5, 0.60, 4.0),
        "distilled": model(1.0, 1.5, 0.78, 4.0),
        "baseline_deployed": model(4.0, 2.0, 0.80, 8.0),
        "deployed": model(1.0, 1.5, 0.78, 2.0),
        "deployed_fp32": model(1.0, 1.5, 0.785, 2.5),
        "baseline_deployed_openvino": model(4.0, 2.0, 0.79, 6.0),
        "deployed_openvino": model(1.0, 1.5, 0.775, 1.5),
        "baseline_deployed_openvino_fp32": model(4.0, 2.0, 0.80, 5.0),
    }
    runtimes = {name: "PyTorch" for name in ("baseline", "pruned", "distilled")}
    runtimes |= {"baseline_deployed": "ONNX Runtime int8", "deployed": "ONNX Runtime int8"}
    runtimes |= {"deployed_fp32": "ONNX Runtime fp32"}
    runtimes |= {
        "baseline_deployed_openvino": "OpenVINO int8",
        "deployed_openvino": "OpenVINO int8",
    }
    runtimes |= {"baseline_deployed_openvino_fp32": "OpenVINO fp32"}
    sources = {name: name for name in ("baseline", "pruned", "distilled")}
    sources |= {"baseline_deployed": "baseline", "deployed": "distilled"}
    sources |= {"deployed_fp32": "distilled", "deployed_openvino": "distilled"}
    sources |= {"baseline_deployed_openvino": "baseline"}
    sources |= {"baseline_deployed_openvino_fp32": "baseline"}
    table = summary_table(metrics, 256, runtimes, sources, "The teacher is converged: ...")
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert table.splitlines()[0] == "The teacher is converged: ..."
    # PyTorch rows: against the PyTorch baseline (10 / 4), the same figure end to end.
    assert rows["pruned"].endswith("| 75.0% | 4.00 | 250.0 | -75.0% | -25.0% | 2.50x | 2.50x |")
    # Deployed: 8 / 2 against the baseline on its own runtime, 10 / 2 end to end.
    assert rows["deployed"].endswith("| -75.0% | -25.0% | 4.00x | 5.00x |")
    assert rows["deployed"].startswith("| deployed | ONNX Runtime int8 |")
    # No baseline runs in fp32 on ONNX Runtime: no same-runtime speedup; 10 / 2.5 end to end.
    assert rows["deployed_fp32"].endswith("| -75.0% | -25.0% | – | 4.00x |")
    assert "| 0.200 | 0.400 | – |" in rows["baseline"]  # AP large: no such objects
    first = table.splitlines()[2]
    assert "keeps **97.5%** of the baseline's test AP50 (0.780 vs 0.800)" in first
    # The pruned row before fine-tuning: 0.60 / 0.80.
    assert "pruning alone, before fine-tuning, kept 75.0% (0.600)" in first
    assert "**75.0% fewer params** and **25.0% fewer FLOPs**" in first
    assert "4.00x as fast as the baseline deployed the same way, and 5.00x end to end" in first
    # INT8 against fp32 of the same model on the same runtime: 0.780 - 0.785, 2.5 / 2.
    assert "changes test AP50 by **-0.0050** and is **1.25x** as fast" in first
    # The fastest CPU row of the model is OpenVINO int8 (1.5 ms): 6 / 1.5 against the baseline on
    # OpenVINO int8, 5 / 1.5 against the baseline's own fastest CPU row (OpenVINO fp32, 5 ms).
    assert (
        "The fastest CPU runtime measured for it is **OpenVINO int8** (`deployed_openvino`, 1.50 "
        "ms, test AP50 0.775): **4.00x** as fast as the baseline deployed the same way, and "
        "**3.33x** as fast as the baseline on its own fastest CPU runtime (OpenVINO fp32, 5.00 ms)."
    ) in first
    assert rows["deployed_openvino"].endswith("| -75.0% | -25.0% | 4.00x | 6.67x |")


def test_the_teacher_verdict_follows_the_curve_measured_with_the_teachers_settings() -> None:
    params = load(SCHEMA)
    # As the teacher_curve tool records it: JSON, with every setting but the epoch budget.
    settings = json.loads(json.dumps(baseline.teacher_settings(params)))
    assert "epochs" not in settings["baseline"]
    points = [{"epochs": e, "test_ap50": a} for e, a in ((20, 0.70), (40, 0.80), (60, 0.805))]

    def verdict(epochs: int, converged_at: int | None, seen: int = 0, **changed: object) -> str:
        mine = copy.deepcopy(params)
        mine["baseline"] |= {"epochs": epochs, **changed}
        curve = {"settings": settings, "plateau": 0.01, "converged_at": converged_at}
        return teacher_verdict(mine, curve | {"points": points}, 0.76, seen)

    assert verdict(40, 40).startswith("The teacher is converged: it trained 40 epochs")
    assert "no budget above 40 epochs adds 0.01 test AP50." in verdict(60, 40)
    assert verdict(20, 40).startswith("**The teacher is not converged**: it trained 20 epochs")
    assert verdict(20, 40).endswith(
        "converges from 40 epochs on, so retention against it means nothing."
    )
    assert "does not converge within its budgets" in verdict(60, None)
    # The student saw 40 epochs in all: the curve's 40-epoch teacher is the control (0.76 / 0.80).
    matched = verdict(20, 40, seen=40)
    assert "retention against it overstates what compression keeps." in matched
    assert matched.endswith(
        "Against a budget-matched control, the teacher trained 40 epochs (as many as the "
        "distilled model saw in all), test AP50 0.800: the distilled model keeps **95.0%**."
    )
    assert "keeps **94.4%**" in verdict(40, 40, seen=60)  # 0.76 / 0.805, also when converged
    # The last point under two seeds (JSON keys are strings): 0.76 / mean(0.805, 0.795) = 95.0%.
    mine = copy.deepcopy(params)
    mine["baseline"]["epochs"] = 40
    noisy = {"settings": settings, "plateau": 0.01, "converged_at": 40, "points": points}
    noisy["last_point_seeds"] = {"0": 0.805, "1": 0.795}
    assert teacher_verdict(mine, noisy, 0.76, 60).endswith(
        "Seed noise: the control scores 0.805 (seed 0), 0.795 (seed 1); against their mean, "
        "0.800, the distilled model keeps 95.0%."
    )
    assert "Seed noise" not in teacher_verdict(mine, noisy, 0.76, 40)  # not the noisy point
    # A curve of other settings (one learning rate) says nothing about this teacher.
    other = verdict(40, 40, lr0=params["baseline"]["lr0"] * 2)
    assert other.startswith("**The teacher's convergence is not measured for these settings**")
    assert teacher_verdict(params, None, 0.76, 40) == other


def test_a_teacher_curve_record_is_read_whole_or_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "curve.json"
    monkeypatch.setattr(evaluate, "TEACHER_CURVE", record)
    assert evaluate.read_teacher_curve() is None  # never measured
    whole = {"settings": {}, "converged_at": None, "plateau": 0.01, "points": []}
    record.write_text(json.dumps(whole))
    assert evaluate.read_teacher_curve() == whole
    for broken, lacks in (
        ({k: v for k, v in whole.items() if k != "plateau"}, "plateau"),
        ([1, 2], "a JSON mapping (AttributeError)"),
    ):
        record.write_text(json.dumps(broken))
        with pytest.raises(UserError, match=re.escape(f"lacks {lacks}): re-run")) as err:
            evaluate.read_teacher_curve()
        assert "\n" not in str(err.value)
    record.write_text("{not json")
    with pytest.raises(UserError, match="JSONDecodeError"):
        evaluate.read_teacher_curve()
