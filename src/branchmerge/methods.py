"""Merge methods registry: the branch method plus the baselines it is measured against.

Baselines collapse N models into one plain model (what branchmerge exists to avoid); they are here so
the fidelity benchmark compares like with like and users can pick them with ``method:`` in the config.
Each is a pure function over the N tensors of one name (plus the base model's, where it needs one),
registered with ``@merge_method`` like mergekit's methods, with its parameters declared as a pydantic
model: a config's ``parameters:`` are validated against it, so a misspelt ``densty`` is an error.
This module is math and a registry only; the orchestration lives in :mod:`branchmerge.merge`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor


class MethodParams(BaseModel):
    """Parameters of a merge method (none). Subclasses declare theirs; unknown keys are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class LinearParams(MethodParams):
    normalize: bool = Field(default=True, description="Divide by the sum of the weights.")


class TaskArithmeticParams(MethodParams):
    lambda_: float = Field(default=1.0, alias="lambda", description="Scale of the merged task vector.")
    normalize: bool = Field(default=False, description="Divide the task vectors' sum by the sum of weights.")


class TiesParams(MethodParams):
    density: float = Field(default=0.5, gt=0.0, le=1.0, description="Fraction of each task vector kept.")
    lambda_: float = Field(default=1.0, alias="lambda", description="Scale of the merged task vector.")
    normalize: bool = Field(default=True, description="Divide by the weights of the agreeing entries.")


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., Tensor] | None
    reference_url: str
    needs_base: bool
    description: str
    params: type[MethodParams] = MethodParams
    seeded: bool = False  # takes a ``generator`` (seeded per tensor by the orchestrator)

    def parse_params(self, data: dict[str, Any]) -> MethodParams:
        """Validate a config's ``parameters:`` for this method.

        Raises:
            ValueError: naming the parameter at fault and the ones this method takes.
        """
        try:
            return self.params.model_validate(data)
        except ValidationError as e:
            known = ", ".join(f.alias or n for n, f in self.params.model_fields.items()) or "none"
            errs = "; ".join(f"parameters.{'.'.join(map(str, x['loc']))}: "
                             f"{'unknown parameter' if x['type'] == 'extra_forbidden' else x['msg']}"
                             for x in e.errors())
            raise ValueError(f"method {self.name!r}: {errs} (parameters it takes: {known})") from None


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, reference_url: str, needs_base: bool = False,
                 params: type[MethodParams] = MethodParams, seeded: bool = False):
    """Register a pure merge function ``fn(tensors, *, weights, [base], [generator], **params) -> Tensor``."""
    if not re.match(r"^[a-z][a-z0-9_]*$", name):
        raise ValueError(f"merge method name {name!r} must be lower_snake_case")

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        METHODS[name] = MergeMethod(name, fn, reference_url, needs_base, doc[0] if doc else "", params, seeded)
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


@merge_method("linear", reference_url="https://arxiv.org/abs/2203.05482", params=LinearParams)
def linear(tensors: list[Tensor], *, weights: list[float] | None = None, normalize: bool = True) -> Tensor:
    """Weighted average of the models' weights (model soups, Wortsman et al. 2022)."""
    x = torch.stack([t.float() for t in tensors])  # [N, ...]
    w = _weights(weights, len(tensors), tensors[0])
    out = (x * w).sum(0)
    return out / w.sum() if normalize else out


@merge_method("task_arithmetic", reference_url="https://arxiv.org/abs/2212.04089", needs_base=True,
              params=TaskArithmeticParams)
def task_arithmetic(
    tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None, lambda_: float = 1.0,
    normalize: bool = False,
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


@merge_method("ties", reference_url="https://arxiv.org/abs/2306.01708", needs_base=True, params=TiesParams)
def ties(
    tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None, density: float = 0.5,
    lambda_: float = 1.0, normalize: bool = True,
) -> Tensor:
    """TIES: trim task vectors by magnitude, elect signs, merge the agreeing entries (Yadav et al. 2023)."""
    w = _weights(weights, len(tensors), tensors[0])
    tv = torch.stack([magnitude_sparsify(t.float() - base.float(), density) for t in tensors])
    return base.float() + _sign_consensus(tv * w, w, lambda_, normalize)


@merge_method("dare_ties", reference_url="https://arxiv.org/abs/2311.03099", needs_base=True, params=TiesParams,
              seeded=True)
def dare_ties(
    tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None, density: float = 0.5,
    lambda_: float = 1.0, normalize: bool = True, generator: torch.Generator | None = None,
) -> Tensor:
    """DARE random drop-and-rescale of task vectors, then TIES sign consensus (Yu et al. 2024)."""
    w = _weights(weights, len(tensors), tensors[0])
    tv = torch.stack([dare_sparsify(t.float() - base.float(), density, generator) for t in tensors])
    return base.float() + _sign_consensus(tv * w, w, lambda_, normalize)
