"""Channel-Wise Knowledge Distillation (Shu et al., ICCV 2021), on feature maps alone.

For each distilled level, the student's feature map goes through a learned aligner (1x1 conv +
BN) to the teacher's channel count; every channel of both maps becomes a distribution over its
H*W positions by softmax(x / tau); the loss is KL(teacher || student) summed over positions,
times tau^2, averaged over N*C, and weighted per level.

Each aligner can start as the least-squares linear map from the student's to the teacher's map
(:func:`fit_aligner`): with a random aligner the first CWD gradients pull the student's features
toward a random projection of the teacher's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """Channel-wise distillation loss of two N x C x H x W maps (the student already aligned).

    tau^2 / (N*C) * sum over n, c of KL(softmax(t_nc / tau) || softmax(s_nc / tau)), each softmax
    over the H*W positions of one channel.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student map {tuple(student.shape)} != teacher map {tuple(teacher.shape)}"
        )
    n, c = student.shape[:2]
    log_p_s = F.log_softmax(student.reshape(n * c, -1).float() / tau, dim=1)
    log_p_t = F.log_softmax(teacher.reshape(n * c, -1).float() / tau, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl * tau**2 / (n * c)


def multi_level_cwd(
    student_maps: Sequence[torch.Tensor],
    teacher_maps: Sequence[torch.Tensor],
    aligners: nn.ModuleList,
    tau: float,
    level_weights: Sequence[float],
) -> torch.Tensor:
    """sum over levels l of level_weight_l * CWD(align_l(student_l), teacher_l)."""
    return sum(
        w * cwd_loss(align(s), t, tau)
        for w, align, s, t in zip(level_weights, aligners, student_maps, teacher_maps, strict=True)
    )


def make_aligners(
    student_channels: Sequence[int], teacher_channels: Sequence[int]
) -> nn.ModuleList:
    """One 1x1 conv + BN per level, from the student's to the teacher's channel count."""
    return nn.ModuleList(
        nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct))
        for cs, ct in zip(student_channels, teacher_channels, strict=True)
    )


def fit_aligner(aligner: nn.Sequential, student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Set a 1x1 conv + BN aligner to the least-squares map from student to teacher channels.

    Over every position of the N x C x H x W maps, W minimises |W (s - mean s) - (t - mean t)|^2;
    the BN then passes W s through with its own statistics and adds mean t, so the aligner outputs
    W (s - mean s) + mean t, in train mode on this batch and in eval mode alike.
    """
    conv, bn = aligner
    s = student.permute(0, 2, 3, 1).reshape(-1, student.shape[1]).double()
    t = teacher.permute(0, 2, 3, 1).reshape(-1, teacher.shape[1]).double()
    w = torch.linalg.lstsq(s - s.mean(0), t - t.mean(0)).solution  # C_s x C_t
    y = s @ w
    var = y.var(0, unbiased=False)
    with torch.no_grad():
        conv.weight.copy_(w.T.reshape(conv.weight.shape))
        bn.running_mean.copy_(y.mean(0))
        bn.running_var.copy_(var)
        bn.weight.copy_((var + bn.eps).sqrt())
        bn.bias.copy_(t.mean(0))
