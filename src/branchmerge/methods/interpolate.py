"""Interpolation merge methods: spherical paths between models' weights (slerp, nuslerp, multislerp, the
Karcher mean) and the pairwise ones that take entries of one model into the base (nearswap, Arcee Fusion).
Pure math over the tensors of one name, as mergekit's methods of the same names compute them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from branchmerge.methods.registry import MethodParams, merge_method


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




def _nuslerp(t: float, v0: Tensor, v1: Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8) -> Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


class NuSlerpParams(MethodParams):
    nuslerp_flatten: bool = Field(default=True, description="Each tensor as one vector (else per row or column).")
    nuslerp_row_wise: bool = Field(default=False, description="Without flatten: interpolate columns of dim 0 "
                                   "(else the rows, along the last dimension).")


@merge_method("nuslerp", reference_url="https://github.com/arcee-ai/mergekit (nuslerp)", params=NuSlerpParams,
              min_models=2, max_models=2, optional_base=True)
def nuslerp(tensors: list[Tensor], *, weights: list[float] | None = None, base: Tensor | None = None,
            nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False) -> Tensor:
    """Spherical interpolation of two models (of their task vectors when there is a base) at
    ``t = w₂ / (w₁ + w₂)`` from their weights (mergekit's ``nuslerp``)."""
    if len(tensors) != 2:
        raise ValueError(f"nuslerp interpolates two models (besides the base), got {len(tensors)}")
    w = [1.0, 1.0] if weights is None else weights
    t = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
    a, b = tensors[0].float(), tensors[1].float()
    if base is None:
        return _nuslerp(t, a, b, nuslerp_row_wise, nuslerp_flatten)
    return base.float() + _nuslerp(t, a - base.float(), b - base.float(), nuslerp_row_wise, nuslerp_flatten)


class MultiSlerpParams(MethodParams):
    normalize_weights: bool = Field(default=True, description="Divide the weights by their sum.")
    eps: float = Field(default=1e-8, gt=0.0, description="Guard against dividing by zero norms.")


@merge_method("multislerp", reference_url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
              params=MultiSlerpParams, optional_base=True)
def multislerp(tensors: list[Tensor], *, weights: list[float] | None = None, base: Tensor | None = None,
               normalize_weights: bool = True, eps: float = 1e-8) -> Tensor:
    """Weighted interpolation of any number of models on the hypersphere (of task vectors with a base): the
    unit vectors' tangent-space mean at their weighted mean direction, mapped back and given the weighted
    mean norm (mergekit's ``multislerp``).

    Raises:
        ValueError: the weighted unit vectors cancel out (antipodal models of equal weight, three or more).
    """
    if len(tensors) == 1:
        return tensors[0].float()
    x = torch.stack([t.float() for t in tensors])  # [N, ...]
    if base is not None:
        x = x - base.float()
    flat = x.reshape(len(tensors), -1)
    w = torch.tensor([1.0] * len(tensors) if weights is None else weights, dtype=flat.dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise ValueError("the models' weighted directions cancel out (antipodal models with balancing "
                             "weights); give them different weights")
        out = (x[0] * w[0] + x[1] * w[1])
    else:
        mean = mean / mean_norm
        tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * w.view(-1, 1)).sum(0)
        tn = torch.norm(tangent) + eps
        out = (mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)) * (norms.squeeze(-1) * w).sum()
        out = out.view(x.shape[1:])
    return out if base is None else out + base.float()


class KarcherParams(MethodParams):
    max_iter: int = Field(default=10, ge=1, le=1000, description="Iterations of the fixed-point update.")
    tol: float = Field(default=1e-5, gt=0.0, description="Stop when the tangent step is below this.")


@merge_method("karcher", reference_url="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean", params=KarcherParams)
def karcher(tensors: list[Tensor], *, weights: list[float] | None = None, max_iter: int = 10,
            tol: float = 1e-5) -> Tensor:
    """Karcher (Riemannian) mean of the models' directions on the unit sphere, scaled by their weighted mean
    norm (mergekit's ``karcher``, which weighs the models equally: equal ``weights`` give its result)."""
    if len(tensors) == 1:
        return tensors[0].float()
    xs = [t.float().reshape(-1) for t in tensors]
    w = [1.0] * len(xs) if weights is None else [float(v) for v in weights]
    alphas = [v / sum(w) for v in w]
    norms = [torch.linalg.vector_norm(x) for x in xs]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0], dtype=torch.float32)
    units = [xs[i] / norms[i] for i in valid]
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    mean = sum(ai * u for ai, u in zip(a, units))
    mn = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mn.item() < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, units):
            dot = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() >= tol:
                tangent += ai * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = torch.linalg.vector_norm(tangent)
        if tn.item() < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = torch.linalg.vector_norm(mean)
        if un.item() > tol:
            mean = mean / un
    scale = sum(ai * n for ai, n in zip(alphas, norms))
    return (scale * mean).view(tensors[0].shape)


class NearSwapParams(MethodParams):
    t: float = Field(gt=0.0, description="Entries closer than t take the other model's value (farther ones "
                     "move t of the way).")


@merge_method("nearswap", reference_url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
              needs_base=True, params=NearSwapParams, pairwise=True)
def nearswap(tensors: list[Tensor], *, base: Tensor, t: float, weights: list[float] | None = None) -> Tensor:
    """NearSwap: the base's entries that are within ``t`` of the other model's take its value; the others move
    toward it by ``t / |a − b|`` (mergekit's ``nearswap``)."""
    if len(tensors) != 1:
        raise ValueError(f"nearswap takes the base and one other model, got {len(tensors)} others")
    a, b = base.float(), tensors[0].float()
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


QUANTILE_SAMPLE = 1_000_000


@merge_method("arcee_fusion", reference_url="https://arcee.ai (mergekit's arcee_fusion)", needs_base=True,
              pairwise=True, seeded=True)
def arcee_fusion(tensors: list[Tensor], *, base: Tensor, weights: list[float] | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """Arcee Fusion: take the other model's entries whose importance (|Δ| times the rows' KL divergence of
    softmaxed weights) is an upper outlier (above the median plus 1.5 interquartile ranges), keep the
    base's elsewhere. Quantiles of tensors over a million entries come from a seeded sample."""
    if len(tensors) != 1:
        raise ValueError(f"arcee_fusion takes the base and one other model, got {len(tensors)} others")
    a, b = base.float(), tensors[0].float()
    p, q = F.softmax(b, dim=-1) + 1e-8, F.softmax(a, dim=-1) + 1e-8
    importance = (b - a).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator, device=flat.device)]
    ordered = torch.sort(flat).values
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
    mask = (importance >= median + 1.5 * (q3 - q1)).to(a.dtype)
    return a + (b - a) * mask
