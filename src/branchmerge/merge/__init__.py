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
    from branchmerge.io.adapters import is_adapter

    if dtype is None:
        try:
            cfg = json.loads((Path(base) / "config.json").read_text())
            named = cfg.get("torch_dtype") or cfg.get("dtype")
        except (OSError, ValueError, AttributeError):
            named = None
        dtype = named if named in ("float32", "float16", "bfloat16") else "bfloat16"
    base_src = None
    if any(is_adapter(Path(p)) for p in adapters.values()):
        from branchmerge.io.models import ModelSource

        base_src = ModelSource.open(f"{base_name} (base)", str(base))
    branches = [{"name": base_name, "model": str(base)}] + [
        {"name": n, "model": str(p), "base": str(base), **_own_group(n, Path(p), base_src)}
        for n, p in adapters.items()]
    config = parse_config({"branches": branches, "lora": "exact", "dtype": dtype}, "--lora-modules")
    return run_merge(config, out, force=force, progress=progress, model_card=False)


def _own_group(name: str, adapter: Path, base_src: Any) -> dict[str, str]:
    """``{"group": name}`` for an adapter that resizes the vocabulary of ``base_src`` (the opened base; it cannot
    share the base's group: it is kept as its own merged model), else nothing."""
    from branchmerge.io.adapters import LoraSource, is_adapter

    if not is_adapter(adapter):
        return {}
    src = LoraSource.over(name, adapter, LoraSource.read_config(name, adapter), base_src)
    return {"group": name} if src.hf_config.get("vocab_size") != base_src.hf_config.get("vocab_size") else {}


__all__ = ["merge_adapters", "run_merge"]
