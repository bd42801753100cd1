"""The merge under a byte budget: ranks (and bit widths) allocated across tensors by their spectra.

Three passes, each streaming one tensor (across N models) at a time:

0. tensors that are not compressed (embeddings, norms, biases, standalone models) are written; with
   them and the shapes of the rest, the bytes the budget must cover before any factor are known, and a
   budget below them is refused (naming the smallest budget that fits) before any rSVD runs;
1. each compressed tensor: scales and ``W̄`` written; one rSVD per branch at a cap rank (a few times the
   rank a uniform rate would give); the factors spilled to a scratch file in the output's temp folder
   (the dense tensors are not kept); its spectrum (and each triplet's quantization error) kept;
2. the greedy allocation over all spectra (:func:`branchmerge.compress.allocate.allocate`); then each
   tensor's factors are cut to their rank, quantized as allocated, written, and their real error
   measured against the input read once more.

One rank per tensor is shared by the group's branches, so the runtime keeps its uniform fast paths for
single- and mixed-branch batches (per-branch ranks would force the per-branch loop; ``bench/compact.py``
reports what they would buy).
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from branchmerge.compress import Difference, low_rank_factors, normalize, relative_error, tensor_seed
from branchmerge.compress.allocate import allocate, cap_rank, spectrum, uniform_share
from branchmerge.compress.quant import triplet_bytes, triplet_errors
from branchmerge.config import MergeConfig
from branchmerge.errors import ConfigError
from branchmerge.io.bundle import key_part
from branchmerge.io.writer import ShardWriter
from branchmerge.merge.parts import check_shapes, keep_tensor, role_of, store_factors, write_mean

logger = logging.getLogger(__name__)


def widths_of(factor_bits: int | str) -> tuple[int, ...]:
    """Bit widths the allocator chooses among: ``(16,)``, ``(8,)``, ``(4,)`` or ``(8, 4)`` for mixed."""
    return (8, 4) if factor_bits == "mixed" else (int(factor_bits),)


@dataclass
class _Pending:
    group: Any  # merge.branch._Group
    tensor: str
    shape: tuple[int, int]
    scales: list[float]
    scratch: Path
    spectrum_key: str


def _size(n: int) -> str:
    return f"{n:,} bytes ({n / 1e6:.2f} MB)"


def factor_budget(config: MergeConfig, groups: list, kept: dict[str, dict[str, Any]],
                  compressed: list[tuple[Any, str, tuple[int, int]]], esize: int) -> tuple[int, dict[str, Any]]:
    """Bytes left for factors, and the accounting shown by ``inspect``.

    ``kept`` holds the records already written (per group); ``compressed`` lists ``(group, tensor, shape)``.

    Raises:
        ConfigError: the budget does not cover what the bundle needs before any factor (saying how much).
    """
    b = config.budget
    assert b is not None
    mean_bytes = sum(math.prod(shape) * esize for _, _, shape in compressed)
    scale_bytes = sum(4 * len(g.sources) for g, _, _ in compressed)
    kept_bytes = sum(r["bytes"] for recs in kept.values() for r in recs.values())
    acct: dict[str, Any] = {"mean_bytes": mean_bytes, "scale_bytes": scale_bytes, "kept_bytes": kept_bytes}
    if b.total_bytes is not None:
        fixed = mean_bytes + scale_bytes + kept_bytes
        acct.update(requested_total_bytes=b.total_bytes, fixed_bytes=fixed)
        if b.total_bytes < fixed:
            raise ConfigError(f"`budget.total_bytes` {_size(b.total_bytes)} is below what the bundle needs before any "
                              f"factor: {_size(fixed)} (shared means {_size(mean_bytes)}, scales {_size(scale_bytes)}, "
                              f"uncompressed tensors {_size(kept_bytes)})")
        return b.total_bytes - fixed, acct
    members = [g for g in groups if not g.standalone and any(c[0] is g for c in compressed)]
    dense = sum(s.numel() for g in members for s in g.sources) * esize
    own = sum(r["bytes"] for g in members for r in kept[g.name].values() if r["role"] == "per_branch")
    allowed = int(b.branch_bytes * dense)
    need = own + scale_bytes
    acct.update(branch_bytes=b.branch_bytes, allowed_branch_bytes=allowed, per_branch_fixed_bytes=need,
                dense_branch_bytes=dense)
    if allowed < need:
        raise ConfigError(f"`budget.branch_bytes` {b.branch_bytes} allows {_size(allowed)} for the "
                          f"{sum(len(g.sources) for g in members)} compressed branches, but their own uncompressed "
                          f"tensors (embeddings, norms, lm_head the fine-tunes changed) and scales already take "
                          f"{_size(need)}: the smallest branch_bytes this merge can meet is "
                          f"{math.ceil(need / dense * 1e4) / 1e4}")
    return allowed - need, acct


def merge_with_budget(groups: list, config: MergeConfig, writer: ShardWriter, dtype: torch.dtype,
                      device: torch.device, tmp: Path, bar) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Passes 0–2 of the module docstring. Returns per-group tensor records (in input order) and the
    allocation summary for the manifest."""
    esize = torch.empty((), dtype=dtype).element_size()
    widths = widths_of(config.factor_bits)
    gs = config.group_size
    kept: dict[str, dict[str, Any]] = {g.name: {} for g in groups}
    compressed: list[tuple[Any, str, tuple[int, int]]] = []
    order: dict[str, list[str]] = {}
    for g in groups:  # pass 0
        order[g.name] = list(g.sources[0].names())
        for tensor in order[g.name]:
            shapes = [s.shape(tensor) for s in g.sources]
            check_shapes(g, tensor, shapes)
            if role_of(g, tensor, shapes[0]) == "compress":
                compressed.append((g, tensor, tuple(shapes[0])))
                continue
            bar.set_postfix_str(f"{g.name}: {tensor}", refresh=False)
            kept[g.name][tensor] = keep_tensor(g, tensor, writer, dtype)
            bar.update()
    budget, acct = factor_budget(config, groups, kept, compressed, esize)
    cost = {w: (lambda m, n, w=w: triplet_bytes(m, n, w, gs, esize)) for w in widths}
    dense_all = sum(len(g.sources) * math.prod(shape) * esize for g, _, shape in compressed)
    exact = budget >= dense_all
    share = uniform_share([(m, n, len(g.sources)) for g, _, (m, n) in compressed], budget, cost[widths[-1]])
    logger.info("budget: %.2f MB for factors (a uniform rate would keep %.1f%% of each rank%s)%s", budget / 1e6,
                100 * share, ", more than there is: factors stop at the rank where they are no longer smaller than "
                "the difference" if share > 1 else "", "; it covers every difference dense (exact)" if exact else "")
    scratch_dir = tmp / ".scratch"
    scratch_dir.mkdir()
    records: dict[str, dict[str, Any]] = {g.name: {} for g in groups}
    pending: list[_Pending] = []
    spectra = []
    for idx, (g, tensor, shape) in enumerate(compressed):  # pass 1
        bar.set_postfix_str(f"{g.name}: {tensor} (spectrum)", refresh=False)
        m, n = shape
        first = write_mean(g, tensor, shape, writer, dtype, device)
        if isinstance(first, dict):  # every branch holds the same values: stored once
            records[g.name][tensor] = first
            bar.update(2)
            continue
        scales, mean, mean_q = first
        cap = min(m, n) if exact else cap_rank(m, n, share, config.budget.max_rank_factor)
        spill: dict[str, torch.Tensor] = {"mean": mean_q.cpu()}
        sigma2 = torch.zeros(cap)
        qerr = {w: torch.zeros(cap) for w in widths if w != 16}
        total = 0.0
        for s, scale in zip(g.sources, scales):
            delta = normalize(s.get(tensor).to(device), scale) - mean  # [m, n]
            total += float(delta.pow(2).sum())
            if exact:
                spill[s.name + "|delta"] = delta.cpu()
                continue
            gen = torch.Generator(device=device).manual_seed(tensor_seed(config.rsvd.seed, s.name, tensor))
            u, v = low_rank_factors(delta, cap, oversample=config.rsvd.oversample, n_iter=config.rsvd.n_iter,
                                    generator=gen)
            del delta
            sigma2 += u.pow(2).sum(0).cpu()
            for w in qerr:
                qerr[w] += triplet_errors(u.cpu(), v.cpu(), w, gs)
            spill[s.name + "|U"], spill[s.name + "|V"] = u.cpu().contiguous(), v.cpu().contiguous()
        path = scratch_dir / f"{idx:06d}.safetensors"
        save_file(spill, str(path))
        key = f"{g.name}|{tensor}"
        if not exact:
            # objective "delta": each tensor's error relative to its own difference; "weight": to the weight
            wt = 1.0 / total if config.budget.objective == "delta" and total > 0 else 1.0
            spectra.append(spectrum(key, sigma2 * wt, total * wt,
                                    {w: len(g.sources) * cost[w](m, n) for w in widths}, {k: v * wt for k, v in qerr.items()}))
        pending.append(_Pending(g, tensor, shape, scales, path, key))
        bar.update()
    alloc = allocate(spectra, budget, widths) if not exact else None
    factor_bytes = 0
    for p in pending:  # pass 2
        bar.set_postfix_str(f"{p.group.name}: {p.tensor} (factors)", refresh=False)
        rec = records[p.group.name][p.tensor] = _finish(p, alloc, writer, dtype, device, config, esize)
        factor_bytes += rec["bytes"] - math.prod(p.shape) * esize - 4 * len(p.scales)  # less W̄ and the scales
        p.scratch.unlink()
        bar.update()
    shutil.rmtree(scratch_dir)
    acct.update(factor_budget_bytes=budget, exact=exact, widths=list(widths), group_size=gs, uniform_share=share,
                factor_bytes=factor_bytes, summed_sq_error=None if alloc is None else alloc.error)
    ordered = {g.name: {t: (kept[g.name].get(t) or records[g.name][t]) for t in order[g.name]} for g in groups}
    return ordered, acct


def _finish(p: _Pending, alloc, writer: ShardWriter, dtype: torch.dtype, device: torch.device,
            config: MergeConfig, esize: int) -> dict[str, Any]:
    spill = load_file(str(p.scratch))
    mean_q = spill["mean"].to(device)
    m, n = p.shape
    nbytes = mean_q.numel() * esize + 4 * len(p.scales)
    errors: dict[str, float] = {}
    parts = None if alloc is None else alloc.ranks[p.spectrum_key]
    rank = min(m, n) if parts is None else sum(c for _, c in parts)
    for s, scale in zip(p.group.sources, p.scales):
        if parts is None:  # the budget covers every difference dense
            d = spill[s.name + "|delta"].to(dtype)
            writer.add(key_part(s.name, p.tensor, "delta"), d)
            diff, b = Difference(dense=d.float()), d.numel() * esize
        else:
            u, v = spill[s.name + "|U"][:, :rank], spill[s.name + "|V"][:rank]
            b, diff = store_factors(writer, s.name, p.tensor, u, v, parts, config.group_size, dtype)
        nbytes += b
        w_hat = normalize(s.get(p.tensor).to(device), scale)
        errors[s.name] = relative_error(diff.apply(mean_q.to(device)), w_hat) if scale > 0 else 0.0
    rec: dict[str, Any] = {"role": "compressed", "shape": [m, n], "rank": rank, "dense": parts is None,
                           "rel_error": errors, "bytes": nbytes}
    if parts is not None and parts[0][0] != 16 and rank > 0:
        rec["bits"] = [[b, c] for b, c in parts]
        rec["group_size"] = config.group_size
    return rec
