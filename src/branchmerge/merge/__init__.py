"""Merge orchestration: input folders → a branched bundle (:mod:`.branch`), or → one collapsed HF folder
with a baseline method (:mod:`.collapse`). Both stream one tensor (across N models) at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from branchmerge.config import MergeConfig


def run_merge(config: MergeConfig, out: str | Path, *, force: bool = False, progress: bool = True,
              check_load: bool = True, model_card: bool = True) -> dict[str, Any]:
    """Merge the config's models into ``out``: a bundle for method ``branch``, else one HF folder; with
    ``model_card``, a ``README.md`` in it saying what it is and how to use it (:mod:`branchmerge.io.card`).

    Returns the bundle's manifest as a dict (or a summary for baseline methods).
    """
    if config.method != "branch":
        from branchmerge.merge.collapse import run_baseline_merge

        return run_baseline_merge(config, out, force=force, progress=progress, model_card=model_card)
    from branchmerge.merge.branch import run_branch_merge

    return run_branch_merge(config, out, force=force, progress=progress, check_load=check_load,
                            model_card=model_card)


__all__ = ["run_merge"]
