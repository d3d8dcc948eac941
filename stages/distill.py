"""Stage `distill`: fine-tune the pruned student with Channel-Wise Knowledge Distillation.

The loss and the aligners are stages/compress/cwd.py; the trainer is stages/yolo/distill_trainer.py
(``DistillTrainer``). The total training loss is the detection loss plus ``weight`` * sum_l
level_weight_l * CWD_l over the maps the Detect head receives (the neck outputs, one per level:
strides 8, 16, 32 for most models, 4 to 32 with a P2 head, 8 to 64 with P6). ``level_weights``
gives one weight per level, as a list in stride order or a mapping stride -> weight. The teacher
(baseline or sparse model) is frozen; the saved model is the pruned student alone, with exactly
its pruned size. ``weight: 0`` is plain fine-tuning with the same budget (the ablation). Each
aligner starts as the least-squares map fitted on ``aligner_fit_images`` training images (0: the
usual random init).

Reads: models/pruned.pt, the teacher, data/yolo. Writes: models/distilled.pt,
reports/distill/results.csv (per-epoch losses incl. cwd_loss, val metrics), distill.json.
"""

from __future__ import annotations

from ultralytics import YOLO

from stages.compress.pruning import replay  # noqa: F401  (the pruned student runs its hooks)
from stages.pipeline import cli
from stages.pipeline.images import TRAIN_IMAGES, calibration_batch
from stages.pipeline.outputs import print_summary, write_json, written
from stages.pipeline.params import COMMON, Choice, Float, Int, ParamsError, PerLevel, Section, load
from stages.pipeline.runtime import PROJECT_ROOT
from stages.yolo.distill_trainer import DistillTrainer, distill_trainer
from stages.yolo.models import load_detector
from stages.yolo.training import TRAINING, train, training_args
from stages.yolo.validation import val_ap50

STUDENT = PROJECT_ROOT / "models" / "pruned.pt"
TEACHERS = {name: PROJECT_ROOT / "models" / f"{name}.pt" for name in ("baseline", "sparse")}
MODEL_OUT = PROJECT_ROOT / "models" / "distilled.pt"
REPORT_DIR = PROJECT_ROOT / "reports" / "distill"

SCHEMA = {
    **COMMON,
    "distill": Section(
        {
            **TRAINING,
            "teacher": Choice(*TEACHERS),
            "temperature": Float(0, 100, open_lo=True),
            "weight": Float(0, 1000),
            "level_weights": PerLevel(),
            "aligner_fit_images": Int(0, 10_000),
        }
    ),
}


def weights_per_level(given: list[float] | dict[int, float], strides: list[int]) -> list[float]:
    """distill.level_weights as one weight per Detect level of a model with these strides."""
    if isinstance(given, dict):
        if sorted(given) != strides:
            raise ParamsError(
                f"params.yaml: distill.level_weights gives strides {sorted(given)}, but the "
                f"student's Detect levels have strides {strides}: give a weight for each of them."
            )
        return [given[s] for s in strides]
    if len(given) != len(strides):
        raise ParamsError(
            f"params.yaml: distill.level_weights has {len(given)} values, but the student has "
            f"{len(strides)} Detect levels (strides {strides}): give one weight per level in "
            f"stride order, or a mapping stride -> weight."
        )
    return given


def trainer_for(section: dict, student: YOLO, teacher: YOLO, imgsz: int) -> type[DistillTrainer]:
    """The trainer for a validated ``distill`` section; level weights that do not fit the
    student's Detect levels fail here, before any training."""
    strides = [int(s) for s in student.model.stride]
    level_weights = weights_per_level(section["level_weights"], strides)
    count = section["aligner_fit_images"]
    images = calibration_batch(TRAIN_IMAGES, count, imgsz) if count else None
    return distill_trainer(
        student, teacher, section["temperature"], section["weight"], level_weights, images, imgsz
    )


def main() -> None:
    params = load(SCHEMA)
    section = params["distill"]
    args = training_args(params, section)
    student = load_detector(STUDENT)
    teacher = load_detector(TEACHERS[section["teacher"]])
    trainer = trainer_for(section, student, teacher, params["imgsz"])
    student_params = sum(p.numel() for p in student.model.parameters())
    distilled = train(
        student, "distill", MODEL_OUT, REPORT_DIR / "results.csv", trainer=trainer, **args
    )
    saved_params = sum(p.numel() for p in distilled.model.parameters())
    if saved_params != student_params:
        raise RuntimeError(
            f"the distilled model has {saved_params} params, the pruned student "
            f"{student_params}: the pruned structure was not kept"
        )
    ap50 = val_ap50(distilled, "distill-end", params)
    metrics = {
        "ap50": round(ap50, 4),
        "params_m": round(saved_params / 1e6, 4),
        "teacher": section["teacher"],
        "weight": section["weight"],
        "temperature": section["temperature"],
    }
    write_json(REPORT_DIR / "distill.json", metrics)
    print_summary(
        f"distill (teacher {section['teacher']}, weight {section['weight']:g}, "
        f"tau {section['temperature']:g})",
        [
            ("student params", f"{saved_params / 1e6:.3f} M unfused, as pruned (structure kept)"),
            ("val AP50", f"{ap50:.3f}"),
            written(MODEL_OUT, REPORT_DIR),
        ],
    )


if __name__ == "__main__":
    cli.run(main, __doc__)
