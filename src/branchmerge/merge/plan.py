"""What a merge would write, from tensor shapes alone (``branchmerge merge --dry-run``): per tensor its
role and rank, per group the bytes of each part, and the bundle's size against the inputs.

Nothing is read beyond the safetensors headers. Sizes are upper bounds: tensors that turn out identical
across branches are stored once by the real merge. Under a ``budget`` the ranks come from the spectra at
merge time; the plan shows the bytes left for factors (negative: the budget is too small).
"""

from __future__ import annotations

import math
from typing import Any

from branchmerge.common import DTYPES
from branchmerge.compress import rank_for, stored_bytes
from branchmerge.config import MergeConfig
from branchmerge.merge.branch import open_groups
from branchmerge.merge.lora import lora_ranks
from branchmerge.merge.parts import check_shapes, role_of


def plan_merge(config: MergeConfig) -> dict[str, Any]:
    """The merge's plan as plain data (see the module docstring).

    Raises:
        ModelInputError, ConfigError: as the merge itself would, before any tensor is read.
    """
    esize = DTYPES[config.dtype].itemsize
    groups: dict[str, Any] = {}
    for g in open_groups(config):
        parts = {"mean": 0, "factors": 0, "dense_deltas": 0, "per_branch": 0}
        ranks: set[int] = set()
        n = len(g.sources)
        counts = {"compressed": 0, "per_branch": 0}
        for tensor in g.sources[0].names():
            shapes = [s.shape(tensor) for s in g.sources]
            check_shapes(g, tensor, shapes)
            shape = shapes[0]
            numel = math.prod(shape)
            if role_of(g, tensor, shape) != "compress" or n == 1:
                kept = 4 if g.float32(tensor) else esize
                parts["per_branch"] += sum(math.prod(sh) for sh in shapes) * kept  # (vocabularies may differ)
                counts["per_branch"] += 1
                continue
            counts["compressed"] += 1
            if config.budget is not None:  # ranks are allocated at merge time from the spectra
                parts["mean"] += numel * esize + 4 * n
                continue
            rank = rank_for(shape, config.rate_for(tensor))
            if g.lora_base is not None:  # adapters' factors kept exactly (merge.lora): their ranks, from headers
                lr = lora_ranks(g.sources, tensor)
                if lr is None:  # no adapter changes it: stored once
                    parts["mean"] += numel * esize
                    continue
                rank = max([r or 0 for r in lr] + [rank if None in lr else 0])
            ranks.add(rank)
            mean, factors, dense = stored_bytes(shape, rank, n, esize)
            parts["mean"] += mean
            parts["factors"] += factors
            parts["dense_deltas"] += dense
        inputs = sum(s.nbytes() for s in g.sources)
        inputs_at = sum(s.numel() for s in g.sources) * esize
        groups[g.name] = {"branches": [s.name for s in g.sources], "architecture": g.arch.name,
                          "standalone": g.standalone, **counts, "ranks": sorted(ranks), "parts": parts,
                          "bytes": sum(parts.values()), "input_bytes": inputs, "input_bytes_at_dtype": inputs_at}
    budget = None
    if config.budget is not None:
        fixed = sum(g["bytes"] for g in groups.values())
        if config.budget.total_bytes is not None:
            budget = config.budget.total_bytes - fixed
        else:
            comp = [g for g in groups.values() if not g["standalone"] and g["compressed"]]
            budget = int(config.budget.branch_bytes * sum(g["input_bytes_at_dtype"] for g in comp)) - sum(
                g["parts"]["per_branch"] for g in comp)
        for g in groups.values():  # shown once, on the first compressed group
            if g["compressed"] and not g["standalone"]:
                g["parts"]["factors"] = max(budget, 0)
                g["bytes"] += max(budget, 0)
                break
    total = sum(g["bytes"] for g in groups.values())
    inputs = sum(g["input_bytes"] for g in groups.values())
    at = sum(g["input_bytes_at_dtype"] for g in groups.values())
    return {"dtype": config.dtype, "compress_rate": None if config.budget else config.compress_rate,
            "factor_budget_bytes": budget, "groups": groups, "bundle_bytes": total,
            "input_bytes": inputs, "input_bytes_at_dtype": at, "ratio": total / inputs if inputs else None,
            "ratio_at_dtype": total / at if at else None}
