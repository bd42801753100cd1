"""Task-vector merge methods: the baselines that collapse N fine-tunes of one base into one plain model
(what branchmerge exists to avoid; here so the fidelity benchmark compares like with like and users can
pick them with ``method:``). Each is pure math over the N tensors of one name and the base model's, as
mergekit's methods of the same names compute them.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from branchmerge.methods.registry import MethodParams, merge_method


class LinearParams(MethodParams):
    normalize: bool = Field(default=True, description="Divide by the sum of the weights.")


class TaskArithmeticParams(MethodParams):
    lambda_: float = Field(default=1.0, alias="lambda", description="Scale of the merged task vector.")
    normalize: bool = Field(default=False, description="Divide the task vectors' sum by the sum of weights.")


class TiesParams(MethodParams):
    per_model: ClassVar[frozenset[str]] = frozenset({"density"})
    density: float = Field(default=0.5, gt=0.0, le=1.0, description="Fraction of each task vector kept.")
    lambda_: float = Field(default=1.0, alias="lambda", description="Scale of the merged task vector.")
    normalize: bool = Field(default=True, description="Divide by the weights of the agreeing entries.")
    rescale: bool = Field(default=False, description="Rescale each trimmed task vector to its L1 norm.")


DareRescale = bool | Literal["density"]


class DareTiesParams(TiesParams):
    normalize: bool = Field(default=False, description="Divide by the weights of the agreeing entries.")
    rescale: DareRescale = Field(default=True, description="Bring each pruned task vector back to its L1 norm "
                                 "(true, mergekit's), divide the kept entries by density (\"density\", DARE's "
                                 "paper) or neither (false).")





PerModel = float | list[float]  # one value for every model, or one per model (mergekit's per-model parameters)


def each(value: PerModel, n: int) -> list[float]:
    """A per-model parameter as ``n`` values.

    Raises:
        ValueError: a list of another length.
    """
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise ValueError(f"{len(value)} per-model values for {n} models")
        return [float(v) for v in value]
    return [float(value)] * n


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


class PassthroughParams(MethodParams):
    per_model: ClassVar[frozenset[str]] = frozenset({"scale"})
    scale: float | None = Field(default=None, description="Multiply the tensor by this (none: unchanged).")


@merge_method("passthrough", reference_url="https://github.com/arcee-ai/mergekit (passthrough)",
              params=PassthroughParams, max_models=1)
def passthrough(tensors: list[Tensor], *, weights: list[float] | None = None, scale: float | None = None) -> Tensor:
    """One model's tensor as it is (times ``scale``): with `slices`, layers stacked from several models
    (frankenmerges, depth up-scaling)."""
    if len(tensors) != 1:
        raise ValueError(f"passthrough takes one model per tensor, got {len(tensors)}")
    return tensors[0].float() if scale is None else tensors[0].float() * scale


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


def l1_rescaled(tv: Tensor, kept: Tensor) -> Tensor:
    """``kept`` (a pruned ``tv``) scaled back to ``tv``'s L1 norm (unchanged when either is ~0)."""
    before, after = tv.abs().sum(), kept.abs().sum()
    return kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept


def magnitude_sparsify(tv: Tensor, density: float, rescale: bool = False) -> Tensor:
    """Keep the ``density`` fraction of largest-magnitude entries of ``tv`` (at least one; TIES' trim step);
    ``rescale`` brings them back to ``tv``'s L1 norm."""
    if density >= 1.0:
        return tv
    if tv.numel() == 0:
        return tv
    k = max(1, int(density * tv.numel()))
    flat = tv.abs().flatten()
    topk = torch.topk(flat, k, largest=True, sorted=False).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[topk] = True
    out = tv * mask.view_as(tv)
    return l1_rescaled(tv, out) if rescale else out


def dare_sparsify(tv: Tensor, density: float, generator: torch.Generator | None = None,
                  rescale: DareRescale = "density") -> Tensor:
    """Drop entries at random with probability ``1 − density`` (DARE), then rescale the rest: by
    ``1/density`` (``"density"``, the paper's), to ``tv``'s L1 norm (``True``, mergekit's) or not at all."""
    if density >= 1.0:
        return tv
    keep = torch.rand(tv.shape, generator=generator, device=tv.device) < density
    out = tv * keep
    if rescale == "density":
        return out / density
    return l1_rescaled(tv, out) if rescale else out


def sign_consensus_mask(deltas: Tensor) -> Tensor:
    """TIES' sign election for weighted task vectors ``deltas`` ``[N, ...]``: where each entry agrees with the
    sign of their sum (a zero sum counts as positive, as mergekit's ``get_mask``), ``[N, ...]`` bool."""
    majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    return torch.sign(deltas) == majority


def _sign_consensus(deltas: Tensor, w: Tensor, lambda_: float, normalize: bool) -> Tensor:
    """``λ ·`` the sum of the weighted task vectors ``deltas`` ``[N, ...]`` that agree with the elected sign
    (over the agreeing entries' weights with ``normalize``)."""
    mask = sign_consensus_mask(deltas).to(deltas.dtype)
    mixed = (deltas * mask).sum(0)
    if normalize:
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return lambda_ * mixed


@merge_method("ties", reference_url="https://arxiv.org/abs/2306.01708", needs_base=True, params=TiesParams)
def ties(
    tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None, density: PerModel = 0.5,
    lambda_: float = 1.0, normalize: bool = True, rescale: bool = False,
) -> Tensor:
    """TIES: trim task vectors by magnitude, elect signs, merge the agreeing entries (Yadav et al. 2023)."""
    w = _weights(weights, len(tensors), tensors[0])
    tv = torch.stack([magnitude_sparsify(t.float() - base.float(), d, rescale)
                      for t, d in zip(tensors, each(density, len(tensors)))])
    return base.float() + _sign_consensus(tv * w, w, lambda_, normalize)


@merge_method("dare_ties", reference_url="https://arxiv.org/abs/2311.03099", needs_base=True,
              params=DareTiesParams, seeded=True)
def dare_ties(
    tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None, density: PerModel = 0.5,
    lambda_: float = 1.0, normalize: bool = False, rescale: DareRescale = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE random drop-and-rescale of task vectors, then TIES sign consensus (Yu et al. 2024)."""
    return _dare(tensors, base, weights, density, lambda_, normalize, rescale, generator, ties=True)


def _dare(tensors: list[Tensor], base: Tensor, weights: list[float] | None, density: PerModel, lambda_: float,
          normalize: bool, rescale: DareRescale, generator: torch.Generator | None, ties: bool) -> Tensor:
    w = _weights(weights, len(tensors), tensors[0])
    tv = torch.stack([dare_sparsify(t.float() - base.float(), d, generator, rescale)
                      for t, d in zip(tensors, each(density, len(tensors)))]) * w
    return base.float() + (_sign_consensus(tv, w, lambda_, normalize) if ties else _combine(tv, w, lambda_, normalize))


class DareLinearParams(MethodParams):
    per_model: ClassVar[frozenset[str]] = frozenset({"density"})
    density: float = Field(default=0.5, gt=0.0, le=1.0, description="Fraction of each task vector kept.")
    lambda_: float = Field(default=1.0, alias="lambda", description="Scale of the merged task vector.")
    normalize: bool = Field(default=False, description="Divide the task vectors' sum by the sum of weights.")
    rescale: DareRescale = Field(default=True, description="As dare_ties': true (L1 norm), \"density\" or false.")


class BreadcrumbsParams(MethodParams):
    per_model: ClassVar[frozenset[str]] = frozenset({"density", "gamma"})
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
    tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None, density: PerModel = 0.5,
    lambda_: float = 1.0, normalize: bool = False, rescale: DareRescale = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE random drop-and-rescale of task vectors, then their weighted sum (Yu et al. 2024)."""
    return _dare(tensors, base, weights, density, lambda_, normalize, rescale, generator, ties=False)


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
    return l1_rescaled(tv, out) if rescale else out


def _breadcrumbs(tensors: list[Tensor], base: Tensor, weights: list[float] | None, density: PerModel,
                 gamma: PerModel, lambda_: float, normalize: bool, rescale: bool, ties: bool) -> Tensor:
    w = _weights(weights, len(tensors), tensors[0])
    n = len(tensors)
    tv = torch.stack([outlier_sparsify(t.float() - base.float(), d, g, rescale)
                      for t, d, g in zip(tensors, each(density, n), each(gamma, n))]) * w
    if not ties:
        return base.float() + _combine(tv, w, lambda_, normalize)
    return base.float() + _sign_consensus(tv, w, lambda_, normalize)


@merge_method("breadcrumbs", reference_url="https://arxiv.org/abs/2312.06795", needs_base=True,
              params=BreadcrumbsParams)
def breadcrumbs(
    tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None, density: PerModel = 1.0,
    gamma: PerModel = 0.01, lambda_: float = 1.0, normalize: bool = False, rescale: bool = False,
) -> Tensor:
    """Model Breadcrumbs: task vectors trimmed of their largest and smallest entries, summed (Davari & Belilovsky
    2023)."""
    return _breadcrumbs(tensors, base, weights, density, gamma, lambda_, normalize, rescale, ties=False)


@merge_method("breadcrumbs_ties", reference_url="https://arxiv.org/abs/2312.06795", needs_base=True,
              params=BreadcrumbsParams)
def breadcrumbs_ties(
    tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None, density: PerModel = 1.0,
    gamma: PerModel = 0.01, lambda_: float = 1.0, normalize: bool = False, rescale: bool = False,
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


class DellaParams(MethodParams):
    per_model: ClassVar[frozenset[str]] = frozenset({"density", "epsilon"})
    density: float = Field(default=0.5, gt=0.0, le=1.0, description="Mean fraction of each task vector kept.")
    epsilon: float = Field(default=0.15, ge=0.0, lt=1.0, description="Spread of the keep probabilities: "
                           "density ± epsilon from each row's smallest to its largest entry.")
    lambda_: float = Field(default=1.0, alias="lambda", description="Scale of the merged task vector.")
    normalize: bool = Field(default=True, description="Divide by the (agreeing) weights.")
    rescale: bool = Field(default=True, description="Rescale each pruned task vector to its L1 norm.")

    @model_validator(mode="after")
    def _probabilities(self) -> DellaParams:
        if self.density < 1.0 and not (0.0 < self.density - self.epsilon and self.density + self.epsilon < 1.0):
            raise ValueError(f"epsilon {self.epsilon} with density {self.density}: density ± epsilon must lie "
                             f"inside (0, 1)")
        return self


class DellaLinearParams(DellaParams):
    normalize: bool = Field(default=False, description="Divide the task vectors' sum by the sum of weights.")


def della_sparsify(tv: Tensor, density: float, epsilon: float, rescale: bool = True,
                   generator: torch.Generator | None = None) -> Tensor:
    """DELLA's MagPrune: keep each entry with probability ``density − ε`` (the smallest of its row) rising to
    ``density + ε`` (the largest), ranked by magnitude along each row of ``tv`` ``[out, in]`` (a vector is
    one row); ``rescale`` brings the kept entries back to the task vector's L1 norm (mergekit's ``della``;
    DELLA's paper rescales by ``1/p`` per entry instead)."""
    if density >= 1.0:
        return tv
    rows = tv if tv.dim() >= 2 else tv.unsqueeze(0)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).float() + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)  # (a one-entry row: 0/0 → nan → clamp → the smallest)
    probs = (density - epsilon) + torch.nan_to_num(norm) * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator).to(rows.dtype)
    out = rows * mask
    return (l1_rescaled(rows, out) if rescale else out).reshape(tv.shape)


def _della(tensors: list[Tensor], base: Tensor, weights: list[float] | None, density: PerModel, epsilon: PerModel,
           lambda_: float, normalize: bool, rescale: bool, generator: torch.Generator | None, ties: bool) -> Tensor:
    w = _weights(weights, len(tensors), tensors[0])
    n = len(tensors)
    tv = torch.stack([della_sparsify(t.float() - base.float(), d, e, rescale, generator)
                      for t, d, e in zip(tensors, each(density, n), each(epsilon, n))]) * w
    merged = _sign_consensus(tv, w, lambda_, normalize) if ties else _combine(tv, w, lambda_, normalize)
    return base.float() + merged


@merge_method("della", reference_url="https://arxiv.org/abs/2406.11617", needs_base=True, params=DellaParams,
              seeded=True)
def della(
    tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None, density: PerModel = 0.5,
    epsilon: PerModel = 0.15, lambda_: float = 1.0, normalize: bool = True, rescale: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DELLA: task vectors pruned at random, larger entries kept more often, then TIES' sign election (Deep et
    al. 2024)."""
    return _della(tensors, base, weights, density, epsilon, lambda_, normalize, rescale, generator, ties=True)


@merge_method("della_linear", reference_url="https://arxiv.org/abs/2406.11617", needs_base=True,
              params=DellaLinearParams, seeded=True)
def della_linear(
    tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None, density: PerModel = 0.5,
    epsilon: PerModel = 0.15, lambda_: float = 1.0, normalize: bool = False, rescale: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DELLA's pruning, then the task vectors' weighted sum."""
    return _della(tensors, base, weights, density, epsilon, lambda_, normalize, rescale, generator, ties=False)


class SceParams(MethodParams):
    select_topk: float = Field(default=1.0, ge=0.0, le=1.0, description="Fraction of the entries kept: those "
                               "whose task vectors vary most across the models.")


@merge_method("sce", reference_url="https://arxiv.org/abs/2408.07990", needs_base=True, params=SceParams)
def sce(tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None,
        select_topk: float = 1.0) -> Tensor:
    """SCE: select the entries where the task vectors vary most, weight each model by its task vector's mean
    square, erase entries against the elected sign (Wan et al. 2024; FuseChat). ``weights`` are unused."""
    tv = torch.stack([t.float() - base.float() for t in tensors])  # [N, ...]
    if select_topk < 1.0:
        var = torch.var(tv, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var).item() * select_topk)
        mask = torch.zeros(var.numel(), dtype=tv.dtype, device=tv.device)
        if k > 0:
            mask[torch.topk(var.abs().reshape(-1), k=k, largest=True).indices] = 1
        tv = tv * mask.view_as(var)
    erase = sign_consensus_mask(tv).to(tv.dtype)
    sq = tv.square().reshape(len(tensors), -1).mean(dim=1)
    total = sq.sum().item()
    mw = torch.full_like(sq, 1 / len(tensors)) if abs(total) < 1e-6 else sq / total
    kept = mw.view(-1, *([1] * (tv.dim() - 1))) * erase
    return base.float() + (tv * kept).sum(0) / kept.sum(0).clamp(min=1e-6)
