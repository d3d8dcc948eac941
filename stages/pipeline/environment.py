"""What machine and software produced a set of metrics.

Training on the CPU is deterministic on one machine, but not across machines: a different CPU
makes torch and oneDNN pick other kernels (other float summation orders), other package versions
change augmentation or training code, another thread count changes how reductions are split.
Any of these moves the metrics. The evaluate stage writes this record beside its metrics, so a
diff can tell "the model changed" from "the machine changed".
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

import torch

from stages.pipeline.runtime import KERNEL_CAPS, cpu_threads

# The distributions whose versions change numbers (training, augmentation, export, evaluation).
PACKAGES = (
    "torch",
    "torchvision",
    "ultralytics",
    "numpy",
    "opencv-python",
    "pillow",
    "onnx",
    "onnxruntime",
    "onnxslim",
    "openvino",
    "pycocotools",
    "dvc",
)
# CPU features that decide which kernels torch, oneDNN and ONNX Runtime run.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_description() -> dict[str, Any]:
    """The CPU model and its kernel-relevant flags (from /proc/cpuinfo where there is one)."""
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        fields = dict(
            line.split(":", 1) for line in cpuinfo.read_text().splitlines() if ":" in line
        )
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["model"] = fields.get("model name", info["model"])
        flags = set(fields.get("flags", "").split())
        info["flags"] = [f for f in CPU_FLAGS if f in flags]
    return info


def describe_environment(device: str) -> dict[str, Any]:
    """Versions, torch build, CPU, threads, kernel caps and device of this process."""
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_build": f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU",
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernel_caps": {name: os.environ.get(name) for name in KERNEL_CAPS},
        "cpu": cpu_description(),
        "threads": {"torch": torch.get_num_threads(), "cores_usable": cpu_threads()},
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }
