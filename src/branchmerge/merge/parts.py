"""Pieces of the branch merge that both the rate merge (:mod:`.branch`) and the budget merge
(:mod:`.budget`) use: a tensor's role, its shape check, per-branch tensors stored once, the normalized
mean's pass over the N models, and one branch's factors written (in the dtype or quantized).

``g`` is a group of the merge (:class:`branchmerge.merge.branch._Group`: ``name``, ``sources``, ``arch``,
``standalone``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from branchmerge.compress import Difference, frobenius_scale, normalize
from branchmerge.compress.quant import quantize_factors
from branchmerge.compress.rows import changed_rows, patch_pays
from branchmerge.errors import ModelInputError
from branchmerge.io.bundle import key_mean, key_own, key_part, key_scales, key_shared
from branchmerge.io.writer import ShardWriter


def role_of(g, tensor: str, shape: tuple[int, ...]) -> str:
    """``compress`` or ``per_branch``: a standalone group's tensors, those transformers keeps in float32
    (routers, score-correction biases: never compressed), and under the fallback rule the weights of modules
    other than plain ``nn.Linear`` layers are kept per branch."""
    if g.standalone or g.float32(tensor):
        return "per_branch"
    role = g.arch.role(tensor, shape)
    if role == "compress" and g.linear is not None and g.arch.module_path(tensor) not in g.linear:
        return "per_branch"  # (the fallback rule: a 2-D weight of a router or another module of its own forward)
    return role


def stored_dtype(g, tensor: str, t: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a kept tensor is written in: the merge's, but float32 where transformers keeps it so, and
    integer tensors as they are."""
    if not t.is_floating_point():
        return t.dtype
    return torch.float32 if g.float32(tensor) else dtype


def check_shapes(g, tensor: str, shapes: list[tuple[int, ...]]) -> None:
    """Raise unless every branch of group ``g`` holds ``tensor`` in one shape: branches of one group run as one
    model. A per-branch tensor indexed by the vocabulary (embeddings, head) may differ in its first dimension
    when that is each branch's own ``vocab_size`` (a fine-tune that added tokens keeps its group)."""
    if all(shape == shapes[0] for shape in shapes[1:]):
        return
    if vocabulary_sized(g, tensor, shapes):
        return
    odd = [f"{s.name!r}'s config.json says vocab_size {s.hf_config.get('vocab_size')!r}"
           for s, shape in zip(g.sources, shapes) if shape[0] != s.hf_config.get("vocab_size")]
    for s, shape in zip(g.sources[1:], shapes[1:]):
        if shape != shapes[0]:
            why = f" ({'; '.join(odd)})" if odd and shape[1:] == shapes[0][1:] else ""
            raise ModelInputError(
                f"tensor {tensor} has shape {list(shape)} in branch {s.name!r} but {list(shapes[0])} in branch "
                f"{g.sources[0].name!r}{why}; branches of group {g.name!r} must have the same shapes, but for "
                f"their vocabulary (give {s.name!r} its own `group` or `standalone: true`)"
            )


def vocabulary_sized(g, tensor: str, shapes: list[tuple[int, ...]]) -> bool:
    """Whether ``tensor`` is a per-branch tensor whose first dimension is each branch's ``vocab_size`` (and
    its other dimensions the same in every branch)."""
    if role_of(g, tensor, shapes[0]) != "per_branch":
        return False
    return all(len(shape) == len(shapes[0]) and shape[1:] == shapes[0][1:]
               and shape[0] == s.hf_config.get("vocab_size") for s, shape in zip(g.sources, shapes))


def digest(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


def keep_tensor(g, tensor: str, writer: ShardWriter, dtype: torch.dtype) -> dict[str, Any]:
    """Per-branch tensor, each distinct value stored once: by the group when every branch holds the same
    values (``shared``), else per branch, a branch equal to an earlier one pointing at it (``same_as``,
    e.g. embeddings that two of three fine-tunes left alone). Equality is exact (a digest, then
    ``torch.equal``)."""
    src = g.sources
    first = src[0].get(tensor)
    target = stored_dtype(g, tensor, first, dtype)
    esize = torch.empty((), dtype=target).element_size()
    digests = [digest(first)] + [digest(s.get(tensor)) for s in src[1:]]
    if not g.standalone and len(set(digests)) == 1 and all(torch.equal(first, s.get(tensor)) for s in src[1:]):
        writer.add(key_shared(g.name, tensor), first.to(target))
        return {"role": "shared", "shape": list(first.shape), "bytes": first.numel() * esize}
    same_as: dict[str, str] = {}
    patches: dict[str, str] = {}
    nbytes = 0
    for i, s in enumerate(src):
        t = first if i == 0 else s.get(tensor)
        holder = next((j for j in range(i) if digests[j] == digests[i] and src[j].name not in same_as
                       and torch.equal(t, src[j].get(tensor))), None)
        if holder is not None:  # (a standalone group has one branch: never here)
            same_as[s.name] = src[holder].name
            continue
        whole = [src[j] for j in range(i) if src[j].name not in same_as and src[j].name not in patches]
        patch = fewest_changed_rows(t, whole, tensor) if t.dim() == 2 and t.is_floating_point() else None
        if patch is not None and patch_pays(patch[1].numel(), t.shape, esize):
            of, rows = patch  # at most half the bytes: the changed (and added) rows only
            patches[s.name] = of
            writer.add(key_part(s.name, tensor, "rows"), rows)
            writer.add(key_part(s.name, tensor, "values"), t[rows].to(target))
            nbytes += rows.numel() * (t.shape[1] * esize + 8)
            continue
        writer.add(key_own(s.name, tensor), t.to(target))
        nbytes += t.numel() * esize
    rec: dict[str, Any] = {"role": "per_branch", "shape": list(first.shape), "bytes": nbytes}
    if same_as:
        rec["same_as"] = same_as
    if patches:
        rec["patches"] = patches
    shapes = {s.name: list(s.shape(tensor)) for s in src[1:] if tuple(s.shape(tensor)) != tuple(first.shape)}
    if shapes:  # a vocabulary of another size (checked by check_shapes)
        rec["shapes"] = shapes
    return rec


def fewest_changed_rows(t: torch.Tensor, earlier: list, tensor: str) -> tuple[str, torch.Tensor] | None:
    """The earlier model (of ``earlier``, stored whole) whose ``tensor`` differs from ``t`` ``[V, n]`` in the
    fewest rows (:func:`~branchmerge.compress.rows.changed_rows`), and those rows; None when none fits."""
    best: tuple[str, torch.Tensor] | None = None
    for m in earlier:
        rows = changed_rows(t, m.get(tensor))
        if rows is not None and (best is None or rows.numel() < best[1].numel()):
            best = (m.name, rows)
    return best


def write_mean(g, tensor: str, shape: tuple[int, ...], writer: ShardWriter, dtype: torch.dtype,
               device: torch.device) -> dict[str, Any] | tuple[list[float], torch.Tensor, torch.Tensor]:
    """The first pass over the N models for a compressed tensor: scales ``s_i`` and the normalized mean.

    Returns the ``shared`` record when every branch holds the same values (a frozen layer, or a group of
    one: nothing to compress, stored once); else ``(scales, W̄ in float32 [m, n], W̄ in dtype)``, with
    ``W̄`` and the scales written.
    """
    first = g.sources[0].get(tensor)
    identical = True
    scales: list[float] = []
    mean = torch.zeros(shape, dtype=torch.float32, device=device)  # [m, n]
    for s in g.sources:
        w = first if s is g.sources[0] else s.get(tensor)
        identical = identical and torch.equal(w, first)
        scales.append(frobenius_scale(w))
        mean += normalize(w.to(device), scales[-1])
        del w
    if identical:
        writer.add(key_shared(g.name, tensor), first.to(dtype))
        esize = torch.empty((), dtype=dtype).element_size()
        return {"role": "shared", "shape": list(shape), "bytes": first.numel() * esize}
    mean /= len(g.sources)
    mean_q = mean.to(dtype)
    writer.add(key_mean(g.name, tensor), mean_q)
    writer.add(key_scales(g.name, tensor), torch.tensor(scales, dtype=torch.float32))
    return scales, mean, mean_q


def store_factors(writer: ShardWriter, branch: str, tensor: str, u: torch.Tensor, v: torch.Tensor,
                  bits: list[tuple[int, int]], group_size: int, dtype: torch.dtype) -> tuple[int, Difference]:
    """Write one branch's factors ``U [m, k]``, ``V [k, n]`` — in ``dtype`` when ``bits`` is ``[(16, k)]``,
    else quantized as ``bits`` says — and return the bytes written and the difference as a reader will
    see it (float32)."""
    if u.shape[1] == 0:
        return 0, Difference()
    if bits[0][0] == 16:
        uq, vq = u.to(dtype).contiguous(), v.to(dtype).contiguous()
        writer.add(key_part(branch, tensor, "U"), uq)
        writer.add(key_part(branch, tensor, "V"), vq)
        return (uq.numel() + vq.numel()) * uq.element_size(), Difference(u=uq.float(), v=vq.float())
    q = quantize_factors(u, v, bits, group_size)
    writer.add(key_part(branch, tensor, "sigma"), q.sigma.float().contiguous())
    for (b, _), (qu, qv) in zip([x for x in bits if x[1] > 0], q.parts):
        for f, rows in (("U", qu), ("V", qv)):
            writer.add(key_part(branch, tensor, f"{f}.q{b}"), rows.q.contiguous())
            writer.add(key_part(branch, tensor, f"{f}.s{b}"), rows.scales.contiguous())
    du, dv = q.dequantize()
    return q.nbytes, Difference(u=du, v=dv)
