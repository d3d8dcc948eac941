"""Shared fixtures. Importing `stages` first prepares the offline runtime for every test."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import stages  # noqa: F401  (configures the environment before anything imports ultralytics)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VISDRONE_SAMPLE = PROJECT_ROOT.parent / "shared" / "visdrone-sample"
# The pipeline's stages in DAG order: names of dvc.yaml stages and of stages/ modules alike.
STAGES = ("dataset", "baseline", "sparse_train", "prune", "distill", "trt_build", "evaluate")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that tries to reach a host other than this machine."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else str(address)
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in (
            "127.0.0.1",
            "::1",
            "localhost",
        ):
            raise AssertionError(f"test tried to reach the network: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def visdrone_sample() -> Path:
    if not (VISDRONE_SAMPLE / "images").is_dir():
        pytest.skip(f"the real VisDrone sample is not at {VISDRONE_SAMPLE}")
    return VISDRONE_SAMPLE
