"""Module classes that pruned checkpoints contain.

They live here, not in a stage module, because a stage runs as ``__main__`` and pickle would
record the class under that name; from here every process that loads a checkpoint finds them.
"""

from __future__ import annotations

import torch
from ultralytics.nn.modules import C2f


class C2fSplit(C2f):
    """C2f that splits cv1's output at stored sizes: pruning may keep halves of unequal width."""

    split_sizes: list[int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).split(self.split_sizes, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))

    forward_split = forward
