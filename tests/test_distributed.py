"""Multi-GPU support that runs here: the collectives our trainers add to DDP, on two real CPU
processes (gloo), and the configured trainer classes ultralytics ships to its DDP workers."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stages.compress.sparsity import PenaltySchedule
from stages.yolo import distributed
from stages.yolo.sparse_trainer import SparseTrainer
from stages.yolo.training import configured_trainer


def _worker(rank: int, world: int, init_file: str, results: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Rank 0 alone knows the adapted coefficient (it alone validates).
        coefficient = distributed.broadcast_float(0.25 if rank == 0 else None)
        with_grad = torch.nn.Parameter(torch.zeros(3))
        with_grad.grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)
        without_grad = torch.nn.Parameter(torch.zeros(2))
        distributed.average_gradients([with_grad, without_grad])
        torch.save(
            {
                "world": distributed.world_size(),
                "coefficient": coefficient,
                "grad": with_grad.grad,
                "none": without_grad.grad,
            },
            results / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_collectives_agree_across_two_real_processes(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), tmp_path), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["world"] == 2
        assert got["coefficient"] == 0.25  # rank 0's value everywhere
        # Mean of [1,2,3] and [2,4,6], by hand: [1.5, 3, 4.5]; the same on both ranks.
        assert torch.equal(got["grad"], torch.tensor([1.5, 3.0, 4.5]))
        assert torch.equal(got["none"], torch.zeros(2))  # took part with zeros, no deadlock


def test_in_one_process_the_collectives_change_nothing() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([1.0, -1.0])
    distributed.average_gradients([param])
    assert distributed.world_size() == 1
    assert torch.equal(param.grad, torch.tensor([1.0, -1.0]))
    assert distributed.broadcast_float(0.5) == 0.5


_UNPICKLE = """
import pickle, sys
cls = pickle.loads(sys.stdin.buffer.read())
base = cls.__mro__[1]
print(cls.schedule.base, cls.near_zero, f"{base.__module__}.{base.__qualname__}")
"""


def test_configured_trainers_carry_their_own_settings_by_value() -> None:
    strong = configured_trainer(
        SparseTrainer, schedule=PenaltySchedule("constant", 0.1, 3), near_zero=0.05
    )
    weak = configured_trainer(SparseTrainer, schedule=PenaltySchedule("constant", 0.001, 3))
    assert issubclass(strong, SparseTrainer) and strong.__module__ == "stages.yolo.sparse_trainer"
    assert strong.schedule.base == 0.1 and weak.schedule.base == 0.001  # no shared state
    assert weak.near_zero == SparseTrainer.near_zero == 0.01 and strong.near_zero == 0.05
    assert not hasattr(SparseTrainer, "schedule")  # the importable class stays bare

    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(strong)  # plain pickle can only refer to a class by its importable name
    # What ultralytics writes for its DDP workers, unpickled in a fresh process as a worker does:
    # the class with its settings, its base imported by name.
    shipped = subprocess.run(
        [sys.executable, "-c", _UNPICKLE],
        input=cloudpickle.dumps(strong),
        capture_output=True,
        check=True,
    )
    assert shipped.stdout.decode().split() == [
        "0.1",
        "0.05",
        "stages.yolo.sparse_trainer.SparseTrainer",
    ]


def test_an_undeclared_setting_is_refused() -> None:
    with pytest.raises(TypeError, match="declares no setting"):
        configured_trainer(SparseTrainer, shedule=PenaltySchedule("constant", 0.1, 3))
