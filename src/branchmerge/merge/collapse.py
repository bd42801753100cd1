"""Baseline merges: collapse N models into one plain HF folder with a registered method, one tensor at
a time (what branchmerge exists to avoid; here to be measured against)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from branchmerge.common import resolve_dtype
from branchmerge.compress import tensor_seed
from branchmerge.config import MergeConfig
from branchmerge.errors import ConfigError, ModelInputError
from branchmerge.io.card import CARD, merged_card
from branchmerge.io.hf import finish_hf_shards, write_hf_config
from branchmerge.io.adapters import open_model
from branchmerge.io.models import ModelSource
from branchmerge.io.writer import ShardWriter, atomic_output_dir, check_output, copy_side_files
from branchmerge.methods import METHODS
from branchmerge.methods.registry import model_weight

logger = logging.getLogger(__name__)


def run_baseline_merge(config: MergeConfig, out: str | Path, *, force: bool = False, progress: bool = True,
                       model_card: bool = True) -> dict:
    """Collapse the config's models into one HF folder with ``config.method``.

    Raises:
        ConfigError: unknown method, missing ``base_model`` for a method that needs one, standalone branches.
        ModelInputError: tensors missing from a model or of different shapes.
    """
    method = METHODS.get(config.method)
    if method is None or method.fn is None:
        raise ConfigError(f"unknown merge method {config.method!r}; known: {', '.join(METHODS)}")
    if any(b.standalone for b in config.branches):
        raise ConfigError(f"method {method.name!r} collapses models into one; standalone branches need method 'branch'")
    if method.needs_base and not config.base_model:
        raise ConfigError(f"method {method.name!r} needs `base_model` (the model the fine-tunes started from)")
    try:
        method.check_settings(config.parameters)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    inputs = config.inputs()
    check_output(out, force=force, inputs=inputs)
    sources = [open_model(b.name, b.model, b.revision, b.base, default_base=config.base_model) for b in config.branches]
    base = ModelSource.open("base_model", config.base_model) if config.base_model else None
    specs = list(config.branches)
    takes_base = base is not None and (method.needs_base or method.optional_base)
    if takes_base:  # the base listed among the branches too is the base, no fine-tune (as mergekit's)
        kept = [i for i, s in enumerate(sources) if s.path.resolve() != base.path.resolve()]
        sources, specs = [sources[i] for i in kept], [specs[i] for i in kept]
    own = [b.parameters for b in specs]
    if method.pairwise and len(sources) != 1:
        raise ConfigError(f"method {method.name!r} interpolates `base_model` and one other model; the branches "
                          f"list {len(sources)} models besides the base")
    if len(sources) < method.min_models or len(sources) > (method.max_models or len(sources)):
        count = (f"exactly {method.min_models}" if method.min_models == method.max_models else
                 f"at least {method.min_models}" if method.max_models is None else
                 f"{method.min_models} to {method.max_models}")
        raise ConfigError(f"method {method.name!r} needs {count} models besides the base, got {len(sources)}")
    layers = _layer_count(sources[0].hf_config)
    by_name = any(map(_mentions_filter, [config.parameters, *own]))  # (else they depend on the layer alone)
    resolved: dict[tuple, dict[str, Any]] = {}
    dtype = resolve_dtype(config.dtype)
    names = sources[0].names()
    for s in [*sources[1:], *([base] if base else [])]:
        missing = set(names) ^ set(s.names())
        if missing:
            raise ModelInputError(f"tensor {sorted(missing)[0]} is not in every model ({s.name!r} differs)")
    with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
        writer = ShardWriter(tmp, config.max_shard_bytes, prefix="model")
        for name in tqdm(names, desc=f"merging ({method.name})", disable=not progress):
            ts = [s.get(name) for s in sources]
            for s, t in zip(sources[1:], ts[1:]):
                if t.shape != ts[0].shape:
                    raise ModelInputError(f"tensor {name} has shape {list(t.shape)} in branch {s.name!r} but "
                                          f"{list(ts[0].shape)} in {sources[0].name!r}")
            t = _position(name, layers)
            key = (name if by_name else "", t)
            if key not in resolved:
                weights = [model_weight(b.parameters["weight"], name, t, b.weight) if "weight" in b.parameters
                           else b.weight for b in specs]
                resolved[key] = {"weights": weights, **method.model_params(config.parameters, own, name, t)}
            kw: dict[str, Any] = dict(resolved[key])
            if takes_base:
                kw["base"] = base.get(name)
                if kw["base"].shape != ts[0].shape:
                    raise ModelInputError(f"tensor {name} has shape {list(kw['base'].shape)} in base_model but "
                                          f"{list(ts[0].shape)} in {sources[0].name!r}")
            if method.seeded:
                kw["generator"] = torch.Generator().manual_seed(tensor_seed(config.rsvd.seed, name))
            try:
                merged = method.fn(ts, **kw) if ts[0].is_floating_point() else ts[0]
            except ValueError as e:
                raise ModelInputError(f"tensor {name}: method {method.name!r}: {e}") from None
            writer.add(name, merged.to(dtype) if merged.is_floating_point() else merged)
        writer.close()
        finish_hf_shards(tmp, writer)
        copy_side_files(sources[0].side_files(), tmp)
        write_hf_config(tmp, sources[0].hf_config, config.dtype)
        if model_card:
            (tmp / CARD).write_text(merged_card(Path(out).name, method.name, config.model_dump(mode="json")))
    return {"method": method.name, "out": str(out)}


_LAYER = re.compile(r"\.(\d+)\.")


def _layer_count(cfg: dict) -> int:
    n = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    return n if isinstance(n, int) and n > 0 else 1


def _position(tensor: str, layers: int) -> float:
    """Where ``tensor`` sits for a gradient, as mergekit places it: layer ``i`` of ``L`` at ``i / (L - 1)``
    (1 for a one-layer model); tensors outside the layers (embeddings, final norm, head) at 0."""
    m = _LAYER.search(tensor)
    if m is None:
        return 0.0
    return int(m.group(1)) / (layers - 1) if layers > 1 else 1.0


def _mentions_filter(parameters: dict[str, Any]) -> bool:
    return "filter" in str(parameters)
