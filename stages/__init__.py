"""YOLOv8 compression pipeline: one module per DVC stage (see dvc.yaml), shared helpers in common/.

Importing the package prepares the runtime first (offline ultralytics, caches inside the project,
all CPU cores), so no stage can import ultralytics before that is done.
"""

from stages.common.cli import user_errors_as_messages
from stages.common.runtime import configure_environment

with user_errors_as_messages("stages"):
    configure_environment()
