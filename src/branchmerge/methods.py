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


_SCALAR = (bool, int, float, str)


def evaluate_setting(setting: Any, tensor: str, t: float) -> Any:
    """A parameter's value for one tensor, as mergekit resolves its settings: a scalar; a list of numbers, a
    gradient interpolated at ``t`` (0 at the first layer, 1 at the last; embeddings and the head take 0);
    ``{filter, value}`` rules (or a list of them), the first whose ``filter`` is in the tensor's name (or is
    absent or ``*``) giving the value. None when no rule applies (the parameter's default then).

    Raises:
        ValueError: a setting of another shape.
    """
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, _SCALAR):
        return setting
    if not isinstance(setting, list):
        raise ValueError(f"a setting is a value, a list of values (a gradient) or {{filter, value}} rules, got "
                         f"{setting!r}")
    if not setting:
        return None
    if all(isinstance(e, _SCALAR) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        return (1 - (scaled - i0)) * setting[i0] + (scaled - i0) * setting[i1]
    for rule in setting:
        if not isinstance(rule, dict) or "value" not in rule or set(rule) - {"filter", "value"}:
            raise ValueError(f"a rule is {{filter: TEXT, value: SETTING}} (filter optional), got {rule!r}")
        f = rule.get("filter")
        if f is None or f == "*" or (tensor and isinstance(f, str) and f in tensor):
            return evaluate_setting(rule["value"], tensor, t)
    return None


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., Tensor] | None
    reference_url: str
    needs_base: bool
    description: str
    params: type[MethodParams] = MethodParams
    seeded: bool = False  # takes a ``generator`` (seeded per tensor by the orchestrator)
    pairwise: bool = False  # the base model and exactly one other (slerp)
    min_models: int = 1  # fine-tunes (besides the base) it needs

    def check_settings(self, data: dict[str, Any]) -> None:
        """Validate a config's ``parameters:`` whose values may be mergekit settings (gradients, filters):
        each is resolved at the first, middle and last layer and under each of its filters, and validated.

        Raises:
            ValueError: naming the parameter at fault.
        """
        names: set[str] = {""}

        def filters(v: Any) -> None:
            for r in v if isinstance(v, list) else [v]:
                if isinstance(r, dict):
                    if isinstance(r.get("filter"), str):
                        names.add(r["filter"])
                    filters(r.get("value"))

        for v in data.values():
            filters(v)
        for tensor in names:
            for t in (0.0, 0.5, 1.0):
                self.params_for(data, tensor, t)

    def params_for(self, data: dict[str, Any], tensor: str, t: float) -> dict[str, Any]:
        """The validated parameters of ``tensor`` at layer position ``t`` (see :func:`evaluate_setting`)."""
        try:
            values = {k: evaluate_setting(v, tensor, t) for k, v in data.items()}
        except ValueError as e:
            raise ValueError(f"method {self.name!r}: parameters: {e}") from None
        return self.parse_params({k: v for k, v in values.items() if v is not None}).model_dump()

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
                 params: type[MethodParams] = MethodParams, seeded: bool = False, pairwise: bool = False,
                 min_models: int = 1):
    """Register a pure merge function ``fn(tensors, *, weights, [base], [generator], **params) -> Tensor``."""
    if not re.match(r"^[a-z][a-z0-9_]*$", name):
        raise ValueError(f"merge method name {name!r} must be lower_snake_case")

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        METHODS[name] = MergeMethod(name, fn, reference_url, needs_base, doc[0] if doc else "", params, seeded,
                                    pairwise, min_models)
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


class SlerpParams(MethodParams):
    t: float = Field(ge=0.0, le=1.0, description="Where between the base model (0) and the other model (1).")


@merge_method("slerp", reference_url="https://en.wikipedia.org/wiki/Slerp", needs_base=True, params=SlerpParams,
              pairwise=True)
def slerp(tensors: list[Tensor], *, base: Tensor, t: float, weights: list[float] | None = None,
          dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation from the base model (t=0) to one other model (t=1), each tensor as one vector
    (mergekit's ``slerp``; linear where the two are nearly collinear)."""
    if len(tensors) != 1:
        raise ValueError(f"slerp interpolates the base and one other model, got {len(tensors)} others")
    a, b = base.float().flatten(), tensors[0].float().flatten()
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na, nb = torch.where(na > eps, na, 1.0), torch.where(nb > eps, nb, 1.0)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        ca, cb = 1 - t, t
    else:
        theta = torch.acos(dot)
        ca, cb = torch.sin((1 - t) * theta) / torch.sin(theta), torch.sin(t * theta) / torch.sin(theta)
    return (ca * a + cb * b).view(base.shape)


class DareLinearParams(MethodParams):
    density: float = Field(default=0.5, gt=0.0, le=1.0, description="Fraction of each task vector kept.")
    lambda_: float = Field(default=1.0, alias="lambda", description="Scale of the merged task vector.")
    normalize: bool = Field(default=False, description="Divide the task vectors' sum by the sum of weights.")


class BreadcrumbsParams(MethodParams):
    density: float = Field(default=1.0, gt=0.0, le=1.0, description="Fraction of each task vector kept.")
    gamma: float = Field(default=0.01, ge=0.0, lt=1.0, description="Fraction of largest-magnitude entries "
                         "dropped first (outliers).")
    lambda_: float = Field(default=1.0, alias="lambda", description="Scale of the merged task vector.")
    normalize: bool = Field(default=False, description="Divide by the (agreeing) weights.")
    rescale: bool = Field(default=False, description="Rescale each trimmed task vector to its L1 norm.")


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(default=False, description="One interpolation ratio per output row, not per tensor.")


def _combine(deltas: Tensor, w: Tensor, lambda_: float, normalize: bool) -> Tensor:
    """``λ · Σ w_i Δ_i`` (over the weights' sum with ``normalize``) for weighted ``deltas`` ``[N, ...]``."""
    mixed = deltas.sum(0)
    if normalize:
        divisor = w.sum(0)
        mixed = mixed / (divisor if divisor.abs().item() >= 1e-8 else 1.0)
    return lambda_ * mixed


@merge_method("dare_linear", reference_url="https://arxiv.org/abs/2311.03099", needs_base=True,
              params=DareLinearParams, seeded=True)
def dare_linear(
    tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None, density: float = 0.5,
    lambda_: float = 1.0, normalize: bool = False, generator: torch.Generator | None = None,
) -> Tensor:
    """DARE random drop-and-rescale of task vectors, then their weighted sum (Yu et al. 2024)."""
    w = _weights(weights, len(tensors), tensors[0])
    tv = torch.stack([dare_sparsify(t.float() - base.float(), density, generator) for t in tensors])
    return base.float() + _combine(tv * w, w, lambda_, normalize)


def outlier_sparsify(tv: Tensor, density: float, gamma: float, rescale: bool = False) -> Tensor:
    """Model Breadcrumbs' trim: drop the ``gamma`` fraction of largest-magnitude entries, then the smallest, so
    that ``density`` of them stay (fewer outliers dropped where both do not fit); ``rescale`` brings the
    result back to the task vector's L1 norm."""
    if density >= 1.0:
        return tv
    n = tv.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.sort(tv.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(n, dtype=tv.dtype, device=tv.device)
    mask[order[bottom:bottom + keep]] = 1
    out = tv * mask.view_as(tv)
    if rescale:
        before, after = tv.abs().sum(), out.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            out = out * (before / after)
    return out


def _breadcrumbs(tensors: list[Tensor], base: Tensor, weights: list[float] | None, density: float, gamma: float,
                 lambda_: float, normalize: bool, rescale: bool, ties: bool) -> Tensor:
    w = _weights(weights, len(tensors), tensors[0])
    tv = torch.stack([outlier_sparsify(t.float() - base.float(), density, gamma, rescale) for t in tensors]) * w
    if not ties:
        return base.float() + _combine(tv, w, lambda_, normalize)
    majority = torch.where(tv.sum(0) >= 0, 1.0, -1.0)  # (ties at zero count as positive, as mergekit's)
    mask = (torch.sign(tv) == majority).to(tv.dtype)
    mixed = (tv * mask).sum(0)
    if normalize:
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return base.float() + lambda_ * mixed


@merge_method("breadcrumbs", reference_url="https://arxiv.org/abs/2312.06795", needs_base=True,
              params=BreadcrumbsParams)
def breadcrumbs(
    tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None, density: float = 1.0,
    gamma: float = 0.01, lambda_: float = 1.0, normalize: bool = False, rescale: bool = False,
) -> Tensor:
    """Model Breadcrumbs: task vectors trimmed of their largest and smallest entries, summed (Davari & Belilovsky
    2023)."""
    return _breadcrumbs(tensors, base, weights, density, gamma, lambda_, normalize, rescale, ties=False)


@merge_method("breadcrumbs_ties", reference_url="https://arxiv.org/abs/2312.06795", needs_base=True,
              params=BreadcrumbsParams)
def breadcrumbs_ties(
    tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None, density: float = 1.0,
    gamma: float = 0.01, lambda_: float = 1.0, normalize: bool = False, rescale: bool = False,
) -> Tensor:
    """Model Breadcrumbs' trim, then TIES' sign election over the trimmed task vectors."""
    return _breadcrumbs(tensors, base, weights, density, gamma, lambda_, normalize, rescale, ties=True)


@merge_method("model_stock", reference_url="https://arxiv.org/abs/2403.19522", needs_base=True,
              params=ModelStockParams, min_models=2)
def model_stock(tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None,
                filter_wise: bool = False) -> Tensor:
    """Model Stock: the fine-tunes' average pulled toward the base by how much their task vectors agree
    (mean pairwise cosine), per tensor or per output row (Jang et al. 2024)."""
    if len(tensors) < 2:
        raise ValueError(f"model_stock needs at least two fine-tunes besides the base, got {len(tensors)}")
    w0 = base.float()
    ws = [t.float() for t in tensors]
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [x.unsqueeze(0) for x in ws]
    else:
        w0, ws = w0.reshape(-1), [x.reshape(-1) for x in ws]
    off = [x - w0 for x in ws]
    cos = []
    for i, a in enumerate(off):
        for b in off[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6  # no finite ratio: the base, rather than opposing updates amplified
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(base.shape)
