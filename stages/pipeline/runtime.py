"""The one place that prepares the runtime of every stage and test.

Importing the ``stages`` package calls :func:`configure_environment` before any stage module can
import torch or ultralytics, so these settings hold everywhere:

- ultralytics never touches the network: no connectivity probes (``YOLO_OFFLINE``), no pip
  auto-install of missing packages (``YOLO_AUTOINSTALL``), and the fonts its plotting wants are
  copied from matplotlib instead of downloaded;
- every config, cache and temp file goes below ``<project>/.cache/`` (git- and DVC-ignored), never
  into the user's home directory;
- torch uses every CPU core (ultralytics would leave one idle, which makes CPU training ~1.7x
  slower on a 2-core machine);
- on x86 CPUs with AVX2, torch, oneDNN and MKL are capped to their AVX2 kernels
  (:data:`KERNEL_CAPS`), so that a CPU with AVX-512 runs the same kernels, with the same float
  summation order, as one without: training amplifies the last-bit differences of other kernels
  into different models (see docs/reproducibility.md). A value the user set is kept. (OpenVINO
  compiles with the cap lifted: stages/deploy/openvino.py);
- OpenVINO and NNCF send no telemetry: importing openvino sends a usage event to Google Analytics
  and writes a client id under ~/intel, and NNCF does so on every call, unless their telemetry
  package cannot be imported; :func:`block_telemetry` makes it so, and both use their own stubs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from stages.pipeline.cli import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = PROJECT_ROOT / ".cache"
ULTRALYTICS_CONFIG_DIR = CACHE_DIR / "ultralytics"  # YOLO_CONFIG_DIR
# ultralytics keeps its settings, fonts and multi-GPU worker scripts in YOLO_CONFIG_DIR/Ultralytics.
ULTRALYTICS_USER_DIR = ULTRALYTICS_CONFIG_DIR / "Ultralytics"
TMP_DIR = CACHE_DIR / "tmp"

# ultralytics' plotting looks for these names in its user dir and downloads them when missing.
_FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")


# Read by torch (ATen), oneDNN and MKL when they pick kernels for this CPU.
KERNEL_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def has_avx2() -> bool:
    """Whether this CPU has AVX2 (torch would crash forced to AVX2 kernels on one without)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return False
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return "avx2" in line.split()
    return False


# Overrides the thread count: the number of threads changes how reductions are split, and so
# the trained models; set it to reproduce metrics made on a machine with another core count.
THREADS_VARIABLE = "PIPELINE_THREADS"


def cpu_threads() -> int:
    """Number of threads torch should use: $PIPELINE_THREADS, or every core this process may
    run on."""
    value = os.environ.get(THREADS_VARIABLE, "")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise UserError(f"${THREADS_VARIABLE} = {value!r}: expected a positive integer")
        return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def check_project_root(root: Path = PROJECT_ROOT) -> None:
    """Refuse a root without dvc.yaml and params.yaml: the package was installed on its own (a
    non-editable ``pip install .``), and the pipeline would write models and caches into
    site-packages."""
    missing = [name for name in ("dvc.yaml", "params.yaml") if not (root / name).is_file()]
    if missing:
        raise UserError(
            f"{root} has no {' or '.join(missing)}: the stages package is not running from a "
            f"checkout of this project (a non-editable install?), and would write its models and "
            f"caches there. Install it from the checkout with `pip install -e .` and run it there."
        )


def enclosing_project(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` that holds dvc.yaml and params.yaml, or None."""
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    return None


def check_working_directory(root: Path = PROJECT_ROOT, cwd: Path | None = None) -> None:
    """Refuse to run inside another checkout than the one this package belongs to: its
    params.yaml and data/ would be silently ignored, and this one's written instead."""
    here = enclosing_project((cwd or Path.cwd()).resolve())
    if here is not None and here != root.resolve():
        raise UserError(
            f"this is the stages package of {root}, but the current directory is inside the "
            f"project {here}: its params.yaml and data/ would be ignored and {root}'s used. Run "
            f"from {root}, or run {here}'s own code (from its root, `python -m` takes the "
            f"package beside it; or `pip install -e {here}`)."
        )


def configure_environment() -> None:
    """Set the process environment for offline, self-contained runs (idempotent); refuse to run
    outside a checkout of the project, or inside another one."""
    check_project_root()
    check_working_directory()
    for path in (CACHE_DIR, ULTRALYTICS_USER_DIR, TMP_DIR):
        path.mkdir(parents=True, exist_ok=True)
    threads = str(cpu_threads())
    os.environ.update(
        {
            "YOLO_OFFLINE": "1",
            "YOLO_AUTOINSTALL": "false",
            "YOLO_VERBOSE": os.environ.get("YOLO_VERBOSE", "true"),
            "YOLO_CONFIG_DIR": str(ULTRALYTICS_CONFIG_DIR),
            "MPLCONFIGDIR": str(CACHE_DIR / "matplotlib"),
            "TORCH_HOME": str(CACHE_DIR / "torch"),
            "XDG_CACHE_HOME": str(CACHE_DIR),
            "TMPDIR": str(TMP_DIR),
            # Read by torch at import; ultralytics sets it to 1 unless it is already set.
            "OMP_NUM_THREADS": threads,
            "MPLBACKEND": "Agg",
        }
    )
    if has_avx2():
        for name, value in KERNEL_CAPS.items():
            os.environ.setdefault(name, value)
    tempfile.tempdir = str(TMP_DIR)
    block_telemetry()
    _install_fonts()


TELEMETRY_MODULE = "openvino_telemetry"


def block_telemetry() -> None:
    """Make ``import openvino_telemetry`` fail in this process (None in sys.modules does that), so
    that openvino and nncf fall back to their no-op telemetry."""
    sys.modules.setdefault(TELEMETRY_MODULE, None)


def _install_fonts() -> None:
    """Copy matplotlib's DejaVuSans under the names ultralytics would otherwise download."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        return
    source = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in _FONT_NAMES:
        target = ULTRALYTICS_USER_DIR / name
        if source.exists() and not target.exists():
            shutil.copyfile(source, target)
