"""Which channels to remove: tied groups ranked by their BatchNorm scales, under per-space limits.

Channels are removed in tied groups: a group is the set of conv output channels an add ties
together, ranked by the largest |gamma| among its members (a group is only as unimportant as its
most important member). ``global`` removes the lowest-ranked groups over the whole network until
``ratio`` of the prunable conv channels are gone (network slimming); ``uniform`` removes ``ratio``
of each channel space. Per space, ``min_channels`` keeps layers alive, ``max_layer_ratio`` caps
what it may lose and the kept count is rounded up to a multiple of ``round_to``. With
``macs_saved`` groups are ranked by |gamma| per MAC saved instead.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from stages.compress.pruning import budget
from stages.compress.pruning.dependency import ChannelGraph, ChannelId, UnprunableError


@dataclass
class Space:
    """Channel groups made and read by the same convs, pruned under one budget."""

    convs: tuple[str, ...]
    groups: list[list[ChannelId]]  # prunable groups, most important first after planning
    fixed: int  # channels of this space that may not be removed
    kept: int = 0
    capped: bool = False  # min_channels, max_layer_ratio or round_to kept more than asked


@dataclass
class PrunePlan:
    removed: set[ChannelId]
    spaces: list[Space]
    prunable: int  # prunable conv output channels before pruning
    removed_prunable: int


def bn_gammas(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every BatchNorm2d's scales, by module name: what :func:`plan` ranks by."""
    return {
        name: m.weight.detach().clone()
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
    }


def largest_gamma(
    graph: ChannelGraph, gammas: dict[str, torch.Tensor], channels: Iterable[ChannelId]
) -> float:
    """The largest |gamma| among ``channels`` (0 for none).

    It ranks a tied group and reports how far from zero the removed channels were.
    """
    return max((float(gammas[graph.bn_after[c]][i].abs()) for c, i in channels), default=0.0)


def channel_spaces(graph: ChannelGraph, skip_prefixes: tuple[str, ...]) -> list[Space]:
    """The graph's tied groups, gathered into spaces; groups with a blocked member, or made by a
    conv under ``skip_prefixes``, count as the space's fixed channels."""
    consumers: dict[ChannelId, set[str]] = defaultdict(set)
    for name, inputs in graph.inputs.items():
        for c in inputs:
            if c is not None:
                consumers[graph.find(c)].add(name)
    # A space is the set of groups made by the same convs and read by the same convs: the two
    # halves of a C2f split are separate spaces, so neither can be emptied.
    by_space: dict[tuple, Space] = {}
    for root, members in graph.groups().items():
        convs = tuple(sorted({c for c, _ in members}))
        key = (convs, tuple(sorted(consumers[root])))
        space = by_space.setdefault(key, Space(convs, [], 0))
        skipped = any(c.startswith(skip_prefixes) for c in convs)
        if skipped or any(m in graph.blocked for m in members):
            space.fixed += 1
        else:
            space.groups.append(members)
    return list(by_space.values())


def _wanted_global(spaces: list[Space], importance: dict[int, float], ratio: float) -> list[int]:
    """Groups to remove per space under one threshold over all groups, counted in channels."""
    prunable = sum(len(g) for s in spaces for g in s.groups)
    ranked = sorted((g for s in spaces for g in s.groups), key=lambda g: importance[id(g)])
    remaining, chosen = ratio * prunable, set()
    for g in ranked:
        if remaining <= 0:
            break
        chosen.add(id(g))
        remaining -= len(g)
    return [sum(id(g) in chosen for g in s.groups) for s in spaces]


def _keep(
    space: Space, wanted: int, min_channels: int, round_to: int, max_layer_ratio: float
) -> int:
    """How many groups ``space`` keeps when ``wanted`` are asked for, under its limits."""
    size = space.fixed + len(space.groups)
    floor = max(min(min_channels, size), budget.kept_at_least(size, max_layer_ratio), 1)
    kept = max(size - wanted, floor)
    kept = min(size, math.ceil(kept / round_to) * round_to)
    return max(kept, space.fixed)


def plan(
    graph: ChannelGraph,
    gammas: dict[str, torch.Tensor],
    ratio: float,
    method: str,
    min_channels: int,
    round_to: int,
    skip_prefixes: Iterable[str] = (),
    max_layer_ratio: float = 1.0,
    macs_saved: Mapping[ChannelId, int] | None = None,
) -> PrunePlan:
    """Decide which channel groups to remove (pure: no module is changed).

    No space loses more than ``max_layer_ratio`` of its channels. With ``macs_saved`` (the MACs
    each channel's removal saves, see budget.channel_macs) groups are ranked by |gamma| per MAC
    saved instead of |gamma|: at a FLOPs or latency budget, the expensive channels go first.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    spaces = channel_spaces(graph, tuple(skip_prefixes))
    all_groups = [g for s in spaces for g in s.groups]
    importance = {id(g): largest_gamma(graph, gammas, g) for g in all_groups}
    if macs_saved is not None:
        importance = budget.cost_aware(importance, all_groups, macs_saved)
    prunable = sum(len(g) for g in all_groups)
    if not prunable:
        raise UnprunableError(
            "no channel of this model can be pruned: every conv output feeds an operation the "
            "channel trace does not follow (a reshape, a slice, attention), an output, or has no "
            "BatchNorm scale to rank it by."
        )
    if method == "global":
        wanted = _wanted_global(spaces, importance, ratio)
    elif method == "uniform":
        wanted = [int(ratio * len(s.groups)) for s in spaces]
    else:
        raise ValueError(f"unknown method {method!r}")

    removed: set[ChannelId] = set()
    for space, asked in zip(spaces, wanted, strict=True):
        space.groups.sort(key=lambda g: importance[id(g)], reverse=True)
        space.kept = _keep(space, asked, min_channels, round_to, max_layer_ratio)
        space.capped = space.kept > space.fixed + len(space.groups) - asked
        for g in space.groups[space.kept - space.fixed :]:
            removed.update(g)
    return PrunePlan(removed, sorted(spaces, key=lambda s: s.convs), prunable, len(removed))
