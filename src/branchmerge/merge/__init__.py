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


def merge_adapters(base: str | Path, adapters: dict[str, str | Path], out: str | Path, *, base_name: str = "base",
                   dtype: str | None = None, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """A bundle of ``base`` (branch ``base_name``) and its PEFT LoRA ``adapters`` (branch name → adapter
    folder), each kept exactly (``lora: exact``): what ``serve BASE --lora-modules NAME=PATH`` serves, as vLLM
    serves a base with its adapters. ``dtype``: the bundle's (default: the base's own, else bfloat16).

    Raises:
        ConfigError: a bad or repeated branch name. ModelInputError: as the merge's.
    """
    import json

    from branchmerge.config import parse_config

    if dtype is None:
        try:
            cfg = json.loads((Path(base) / "config.json").read_text())
            named = cfg.get("torch_dtype") or cfg.get("dtype")
        except (OSError, ValueError, AttributeError):
            named = None
        dtype = named if named in ("float32", "float16", "bfloat16") else "bfloat16"
    branches = [{"name": base_name, "model": str(base)}] + [
        {"name": n, "model": str(p), "base": str(base)} for n, p in adapters.items()]
    config = parse_config({"branches": branches, "lora": "exact", "dtype": dtype}, "--lora-modules")
    return run_merge(config, out, force=force, progress=progress, model_card=False)


__all__ = ["merge_adapters", "run_merge"]
