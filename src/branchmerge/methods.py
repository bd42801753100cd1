"""Merge methods registry: the branch method plus the baselines it is measured against.

Baselines collapse N models into one plain model (what branchmerge exists to avoid); they are here so
the fidelity benchmark compares like with like and users can pick them with ``method:`` in the config.
Each is a pure function over the N tensors of one name (plus the base model's, where it needs one),
registered with ``@merge_method`` like mergekit's methods.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from branchmerge.config import MergeConfig
from branchmerge.errors import ConfigError, ModelInputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., Tensor] | None
    reference_url: str
    needs_base: bool
    description: str


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, reference_url: str, needs_base: bool = False):
    """Register a pure merge function ``fn(tensors, *, base, weights, **params) -> Tensor``."""
    if not re.match(r"^[a-z][a-z0-9_]*$", name):
        raise ValueError(f"merge method name {name!r} must be lower_snake_case")

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        METHODS[name] = MergeMethod(name, fn, reference_url, needs_base, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


METHODS["branch"] = MergeMethod(
    "branch",
    None,
    "https://llm-merging.github.io/ (NeurIPS 2024 LLM-Merging competition; Fang, Mo & Gao)",
    False,
    "Shared normalized average plus per-branch rSVD low-rank differences; keeps every model as a branch.",
)


def _weights(weights: list[float] | None, n: int, like: Tensor) -> Tensor:
    w = torch.ones(n) if weights is None else torch.tensor(weights, dtype=torch.float32)
    return w.to(like.device).view(n, *([1] * like.ndim))


@merge_method("linear", reference_url="https://arxiv.org/abs/2203.05482")
def linear(tensors: list[Tensor], *, weights: list[float] | None = None, normalize: bool = True, **_: Any) -> Tensor:
    """Weighted average of the models' weights (model soups, Wortsman et al. 2022)."""
    x = torch.stack([t.float() for t in tensors])  # [N, ...]
    w = _weights(weights, len(tensors), tensors[0])
    out = (x * w).sum(0)
    return out / w.sum() if normalize else out


@merge_method("task_arithmetic", reference_url="https://arxiv.org/abs/2212.04089", needs_base=True)
def task_arithmetic(
    tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None, lambda_: float = 1.0,
    normalize: bool = False, **_: Any,
) -> Tensor:
    """Base plus the weighted sum of task vectors (Ilharco et al. 2023)."""
    tv = torch.stack([t.float() - base.float() for t in tensors])  # [N, ...]
    w = _weights(weights, len(tensors), tensors[0])
    mixed = (tv * w).sum(0)
    if normalize:
        mixed = mixed / w.sum()
    return base.float() + lambda_ * mixed


def magnitude_sparsify(tv: Tensor, density: float) -> Tensor:
    """Keep the ``density`` fraction of largest-magnitude entries of ``tv`` (TIES' trim step)."""
    if density >= 1.0:
        return tv
    k = int(density * tv.numel())
    if k <= 0:
        return torch.zeros_like(tv)
    flat = tv.abs().flatten()
    topk = torch.topk(flat, k, largest=True, sorted=False).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[topk] = True
    return tv * mask.view_as(tv)


def dare_sparsify(tv: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """Drop entries at random with probability ``1 − density`` and rescale the rest (DARE)."""
    if density >= 1.0:
        return tv
    keep = torch.rand(tv.shape, generator=generator, device=tv.device) < density
    return tv * keep / density


def _sign_consensus(deltas: Tensor, w: Tensor, lambda_: float, normalize: bool) -> Tensor:
    sign = torch.sign(deltas.sum(0))
    mask = torch.sign(deltas) == sign  # [N, ...]
    mixed = (deltas * mask).sum(0)
    if normalize:
        divisor = (w * mask).sum(0)
        divisor[divisor.abs() < 1e-8] = 1.0
        mixed = mixed / divisor
    return lambda_ * mixed


@merge_method("ties", reference_url="https://arxiv.org/abs/2306.01708", needs_base=True)
def ties(
    tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None, density: float = 0.5,
    lambda_: float = 1.0, normalize: bool = True, **_: Any,
) -> Tensor:
    """TIES: trim task vectors by magnitude, elect signs, merge the agreeing entries (Yadav et al. 2023)."""
    w = _weights(weights, len(tensors), tensors[0])
    tv = torch.stack([magnitude_sparsify(t.float() - base.float(), density) for t in tensors])
    return base.float() + _sign_consensus(tv * w, w, lambda_, normalize)


@merge_method("dare_ties", reference_url="https://arxiv.org/abs/2311.03099", needs_base=True)
def dare_ties(
    tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None, density: float = 0.5,
    lambda_: float = 1.0, normalize: bool = True, generator: torch.Generator | None = None, **_: Any,
) -> Tensor:
    """DARE random drop-and-rescale of task vectors, then TIES sign consensus (Yu et al. 2024)."""
    w = _weights(weights, len(tensors), tensors[0])
    tv = torch.stack([dare_sparsify(t.float() - base.float(), density, generator) for t in tensors])
    return base.float() + _sign_consensus(tv * w, w, lambda_, normalize)


def run_baseline_merge(config: MergeConfig, out: str | Path, *, force: bool = False, progress: bool = True) -> dict:
    """Collapse the config's models into one HF folder with a baseline method, one tensor at a time.

    Raises:
        ConfigError: unknown method, missing ``base_model`` for a method that needs one, standalone branches.
    """
    from branchmerge.compress import tensor_seed
    from branchmerge.export import _finish_hf_shards
    from branchmerge.io.models import ModelSource
    from branchmerge.io.writer import ShardWriter, atomic_output_dir, copy_side_files
    from branchmerge.merge import DTYPES, json_dumps

    method = METHODS.get(config.method)
    if method is None or method.fn is None:
        raise ConfigError(f"unknown merge method {config.method!r}; known: {', '.join(METHODS)}")
    if any(b.standalone for b in config.branches):
        raise ConfigError(f"method {method.name!r} collapses models into one; standalone branches need method 'branch'")
    if method.needs_base and not config.base_model:
        raise ConfigError(f"method {method.name!r} needs `base_model` (the model the fine-tunes started from)")
    sources = [ModelSource.open(b.name, b.model, b.revision) for b in config.branches]
    base = ModelSource.open("base_model", config.base_model) if config.base_model else None
    weights = [b.weight for b in config.branches]
    params = {k: v for k, v in config.parameters.items()}
    if "lambda" in params:
        params["lambda_"] = params.pop("lambda")
    dtype = DTYPES[config.dtype]
    names = sources[0].names()
    for s in sources[1:]:
        missing = set(names) ^ set(s.names())
        if missing:
            raise ModelInputError(f"tensor {sorted(missing)[0]} is not in every model (branch {s.name!r} differs)")
    with atomic_output_dir(out, force=force) as tmp:
        writer = ShardWriter(tmp, config.max_shard_bytes, prefix="model")
        for name in tqdm(names, desc=f"merging ({method.name})", disable=not progress):
            ts = [s.get(name) for s in sources]
            for s, t in zip(sources[1:], ts[1:]):
                if t.shape != ts[0].shape:
                    raise ModelInputError(f"tensor {name} has shape {list(t.shape)} in branch {s.name!r} but {list(ts[0].shape)} in {sources[0].name!r}")
            kw: dict[str, Any] = {"weights": weights, **params}
            if base is not None:
                kw["base"] = base.get(name)
            if method.name == "dare_ties":
                kw["generator"] = torch.Generator().manual_seed(tensor_seed(config.rsvd.seed, name))
            merged = method.fn(ts, **kw) if ts[0].is_floating_point() else ts[0]
            writer.add(name, merged.to(dtype) if merged.is_floating_point() else merged)
        writer.close()
        _finish_hf_shards(tmp, writer)
        copy_side_files(sources[0].side_files(), tmp)
        cfg = dict(sources[0].hf_config)
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = cfg["dtype"] = config.dtype
        (tmp / "config.json").write_text(json_dumps(cfg))
    return {"method": method.name, "out": str(out)}
