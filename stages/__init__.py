"""YOLOv8 compression pipeline: one module per DVC stage (see dvc.yaml), beside the layers they
use, each importing only the ones below it:

- ``compress``: the paper's method in pure torch (sparsity, pruning, CWD, INT8 Q/DQ);
- ``yolo`` and ``deploy``: adapters to ultralytics and to the deploy runtimes;
- ``datasets``: the VisDrone converter and the synthetic scene generator;
- ``pipeline``: plumbing (entry points, params, runtime, outputs).

Importing the package prepares the runtime first (offline ultralytics, caches inside the project,
all CPU cores), so no stage can import ultralytics before that is done.
"""

from stages.pipeline.cli import one_line_interrupts, user_errors_as_messages
from stages.pipeline.runtime import configure_environment

one_line_interrupts()
with user_errors_as_messages("stages"):
    configure_environment()
