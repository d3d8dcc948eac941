"""Latency of one image, measured fairly: runners for each runtime, timed in turns.

Used by evaluate (every model of the pipeline), the benchmark tool and prune's latency budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stages.deploy import openvino
from stages.deploy.onnxrt import onnx_session


def torch_runner(model: torch.nn.Module, imgsz: int, device: str) -> Callable[[], object]:
    """One fp32 forward pass of a single image, synchronised on a GPU so wall time is the GPU's."""
    model = model.float().to(device).eval()
    x = torch.rand(1, 3, imgsz, imgsz, device=device)

    def run() -> None:
        model(x)
        if device != "cpu":
            torch.cuda.synchronize()

    return run


def onnx_runner(path: Path, shape: list[int]) -> Callable[[], object]:
    """One ONNX Runtime (CPU) pass at the exported, static input shape (an INT8 Q/DQ model runs
    as :func:`stages.deploy.onnxrt.onnx_session` prepares it for this CPU)."""
    session = onnx_session(path)
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).random(shape, np.float32)}
    return lambda: session.run(None, feed)


def openvino_runner(folder: Path, shape: list[int]) -> Callable[[], object]:
    """One OpenVINO (CPU) pass of the IR in ``folder``, compiled as validation compiles it."""
    request = openvino.compiled(folder).create_infer_request()
    x = np.random.default_rng(0).random(shape, np.float32)
    return lambda: request.infer({0: x})


def engine_runner(path: Path, shape: list[int]) -> Callable[[], object]:
    """One TensorRT pass on the GPU, synchronised so that the wall time is the GPU's."""
    from ultralytics.nn.autobackend import AutoBackend

    backend = AutoBackend(str(path), device=torch.device("cuda:0"))
    x = torch.rand(shape, device="cuda:0")

    def run() -> None:
        backend(x)
        torch.cuda.synchronize()

    return run


def latency_ms(
    runners: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Wall times (ms) of each runner's pass.

    The runners take turns pass by pass, so drift in the machine's speed (other load, clock
    changes) hits all of them alike and their ratios stay fair. Each pass takes them in a new
    (seeded) order: a runtime whose idle threads still spin after its pass (OpenVINO's, torch's)
    slows whichever runner comes next, and that must not always be the same one.
    """
    times: dict[str, list[float]] = {name: [] for name in runners}
    names, order = list(runners), np.random.default_rng(0)
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name in (names[j] for j in order.permutation(len(names))):
                start = time.perf_counter()
                runners[name]()
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1000)
    return times
