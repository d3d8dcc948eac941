"""Adapters to ultralytics: loading and checking detectors, training, validation, and what the
algorithms need to know about YOLO's Detect head.

Importing this package finishes the runtime set-up that needs ultralytics itself: integrations
and sync are switched off, its run/weight/dataset dirs point into the project's .cache/, and torch
uses every core (ultralytics resets torch to cpu_count - 1 threads whenever it selects the CPU).
"""

import torch
import ultralytics.utils as ul_utils
import ultralytics.utils.torch_utils as ul_torch_utils

from stages.pipeline.runtime import CACHE_DIR, PROJECT_ROOT, cpu_threads

RUNS_DIR = CACHE_DIR / "runs"

ul_utils.SETTINGS.update(
    {
        "sync": False,
        "runs_dir": str(RUNS_DIR),
        "weights_dir": str(CACHE_DIR / "weights"),
        "datasets_dir": str(PROJECT_ROOT / "data"),
        **{
            k: False
            for k in ("clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
        },
    }
)
ul_utils.NUM_THREADS = ul_torch_utils.NUM_THREADS = cpu_threads()
torch.set_num_threads(cpu_threads())
