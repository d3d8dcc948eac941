"""Run ultralytics' generated DDP worker script for our two custom trainers, in this project.

For multi-GPU training ultralytics starts every worker with a generated script that unpickles the
trainer class, its arguments and the model, builds the trainer and trains. This writes that script
for the configured SparseTrainer and DistillTrainer exactly as ultralytics does
(``generate_ddp_file``) and runs it in a fresh Python process as one CPU worker: the worker must
import our classes and train with the settings the stage gave them. Prints one JSON line per
trainer: the settings it was configured with and the last row of the worker's results.csv.

Usage, in a project where `dvc repro` has run: python -m tests.ddp_launch
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from typing import Any

import stages  # noqa: F401  (the offline runtime, before ultralytics)

# isort: split
from ultralytics import YOLO
from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file

from stages import distill, sparse_train
from stages.pipeline.params import load
from stages.yolo.models import load_detector
from stages.yolo.training import run_args, training_args


def run_worker(trainer_class: type, model: YOLO, run_name: str, args: dict[str, Any]) -> dict:
    """Build the trainer as ultralytics 8.4's Model.train does, write its DDP worker script, run
    the script in a new process, and return the last row of that run's results.csv."""
    overrides = {**model.overrides, "task": model.task, **run_args(run_name, **args)}
    trainer = trainer_class(overrides={**overrides, "mode": "train"}, _callbacks=model.callbacks)
    trainer.model = trainer.get_model(weights=model.model, cfg=model.model.yaml)
    script = generate_ddp_file(trainer)
    try:
        subprocess.run([sys.executable, script], check=True)
    finally:
        ddp_cleanup(trainer, script)
    with (trainer.save_dir / "results.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    return {key.strip(): float(value) for key, value in last.items()}


def main() -> None:
    params = load(sparse_train.SCHEMA)
    section = params["sparse_train"]
    model = load_detector(sparse_train.BASELINE)
    _, groups, weights = sparse_train.penalty_layout(model, section, params["imgsz"])
    trainer = sparse_train.sparse_trainer(section, 0.0, groups, weights)
    worker = run_worker(
        trainer,
        model,
        "ddp-sparse_train",
        training_args(params, section),
    )
    print(json.dumps({"trainer": "sparse_train", "coefficient": section["coefficient"], **worker}))

    params = load(distill.SCHEMA)
    # Random aligners: a CWD term large enough to show in results.csv's five decimals.
    section = {**params["distill"], "aligner_fit_images": 0}
    student = load_detector(distill.STUDENT)
    teacher = load_detector(distill.TEACHERS[section["teacher"]])
    trainer = distill.trainer_for(section, student, teacher, params["imgsz"])
    worker = run_worker(trainer, student, "ddp-distill", training_args(params, section))
    print(json.dumps({"trainer": "distill", "weight": section["weight"], **worker}))


if __name__ == "__main__":
    main()
