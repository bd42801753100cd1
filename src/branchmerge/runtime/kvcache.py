"""KV caches kept from one ``generate`` call to the next: continuous batching without re-prefilling.

A serving engine runs a batch in segments (rows leave when they end, waiting ones join). Without this, each
segment prefilled every row's whole text again. Now a call that keeps its cache gives each row a
:class:`CachedRow` (the cache the call ended with, and which of its columns are that row's tokens); the next
call takes the rows that go on from there, prefills only the rows that join, and runs them as one batch.

Layout: a cache's columns hold, per row, its text but the last token (the last one is the next step's
input), in order, with masked columns (padding, or the gap between a shared prefix and the rest) wherever
the call that made it put them. Merging rows of several caches left-pads each to the widest; a row's cache
is used only as far as its tokens agree with the row's ids (:meth:`CachedRow.shared`), so a stale or
foreign cache is never used: the rest of the row is prefilled instead.

:class:`PrefixStore` keeps finished rows' caches for later rows that begin with the same tokens (a
conversation's next turn, a shared system prompt): they prefill only what they add.

Only full-attention ``DynamicCache`` layers are kept (sliding-window, quantized or offloaded layers keep
other state); for any other cache, :func:`keep` returns None and rows are prefilled as before.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from branchmerge.runtime.scoring import common_prefix


@dataclass(eq=False)
class SegmentCache:
    """The KV cache one call ended with: ``layers`` ``[(keys, values)]`` each ``[B, heads, W, head_dim]``;
    ``ids`` ``[B, W]`` the token in each column and ``mask`` ``[B, W]`` (1: a token of that row), on CPU."""

    layers: list[tuple[Tensor, Tensor]]
    ids: Tensor
    mask: Tensor

    @property
    def width(self) -> int:
        return self.ids.shape[1]


@dataclass(eq=False)
class CachedRow:
    """Row ``row`` of ``source``: what a later call needs to go on from this row's text without prefilling it."""

    source: SegmentCache = field(repr=False)
    row: int
    branch: str = ""  # the branch whose weights made it: another branch's rows never use it

    @property
    def size(self) -> int:
        """How many tokens the row's cache holds."""
        return int(self.source.mask[self.row].sum())

    def tokens(self) -> list[int]:
        """The row's cached tokens, in order."""
        return self.source.ids[self.row][self.source.mask[self.row].bool()].tolist()

    def shared(self, text: Sequence[int]) -> int:
        """How many of ``text``'s first tokens (never its last) the cache holds, in order: those need no
        forward; a cache that holds more (the end of an earlier answer, re-tokenized otherwise) is used up
        to there."""
        held = self.tokens()
        return common_prefix(held[:max(0, len(text) - 1)], list(text))

    def prefix(self, n: int) -> CachedRow:
        """This row with only its first ``n`` cached tokens (the later columns masked; no copy of keys and
        values, a copy of the mask)."""
        mask = self.source.mask.clone()
        real = mask[self.row].nonzero()[:, 0]
        mask[self.row, real[n:]] = 0
        return CachedRow(SegmentCache(self.source.layers, self.source.ids, mask), self.row, self.branch)


def snapshot(cache: Any, ids: Tensor, mask: Tensor) -> SegmentCache | None:
    """A cache of ``ids`` ``[B, W]`` under ``mask`` ``[B, W]`` as a :class:`SegmentCache`; None if it is not
    a plain full-attention ``DynamicCache`` of ``B`` rows and ``W`` columns."""
    if type(cache) is not DynamicCache or not getattr(cache, "layers", None):
        return None
    if any(type(layer) is not DynamicLayer or getattr(layer, "keys", None) is None for layer in cache.layers):
        return None
    if any(tuple(layer.keys.shape[:1]) + tuple(layer.keys.shape[2:3]) != tuple(ids.shape) for layer in cache.layers):
        return None
    return SegmentCache([(layer.keys, layer.values) for layer in cache.layers], ids.cpu(), mask.cpu().long())


def keep(cache: Any, sequences: Tensor, input_mask: Tensor, new_tokens: Sequence[int]) -> SegmentCache | None:
    """The cache a ``generate`` call ended with (:func:`snapshot`), each row's columns after its own
    ``new_tokens`` masked (the padding ``generate`` gave a row it ended before the others, and the last
    token kept: a later call feeds it again).

    Args:
        cache: ``generate``'s output cache (``out.cache`` / ``out.past_key_values``).
        sequences: ``[B, T]`` its output ids (the input's ``W₀`` columns, then the new tokens).
        input_mask: ``[B, W₀]`` the attention mask it was given.
        new_tokens: per row, how many of its new tokens are its text.
    """
    width = sequences.shape[1] - 1  # the last token was sampled, never fed
    steps = width - input_mask.shape[1]
    if steps < 0 or len(new_tokens) != sequences.shape[0]:
        return None
    real = (torch.arange(steps)[None, :] < torch.tensor(list(new_tokens))[:, None] - 1).long()
    return snapshot(cache, sequences[:, :width], torch.cat([input_mask.cpu().long(), real], 1))


def merge(parts: Sequence[tuple[SegmentCache, Sequence[int], Sequence[int]]], rows: int
          ) -> tuple[DynamicCache, Tensor, Tensor]:
    """One batch of ``rows`` rows from rows of several caches: each part ``(cache, its rows, their rows in
    the batch)`` left-padded to the widest; batch rows no part fills have no cached token. Columns no row
    uses are dropped.

    Returns:
        ``(cache, ids [rows, W], mask [rows, W])``; ``ids``/``mask`` on CPU.
    """
    if not parts:
        raise ValueError("merge needs at least one cache")
    n_layers = len(parts[0][0].layers)
    if any(len(p.layers) != n_layers for p, _, _ in parts):
        raise ValueError(f"caches of {sorted({len(p.layers) for p, _, _ in parts})} layers cannot be merged")
    width = max(p.width for p, _, _ in parts)
    ids = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for src, src_rows, dest in parts:
        ids[list(dest), width - src.width:] = src.ids[list(src_rows)]
        mask[list(dest), width - src.width:] = src.mask[list(src_rows)]
    used = mask.any(0).nonzero()
    first = int(used[0]) if used.numel() else width - 1  # (one column at least: a cache is never empty)
    w = width - first
    data = []
    for layer in range(n_layers):
        k0, v0 = parts[0][0].layers[layer]
        keys = k0.new_zeros(rows, k0.shape[1], w, k0.shape[3])
        values = v0.new_zeros(rows, v0.shape[1], w, v0.shape[3])
        for src, src_rows, dest in parts:
            k, v = src.layers[layer]
            lo = max(0, src.width - w)  # the columns of this part that stay (the dropped ones are masked)
            sel = torch.as_tensor(list(src_rows), dtype=torch.long, device=k.device)
            at = torch.as_tensor(list(dest), dtype=torch.long, device=k.device)
            keys[at, :, w - (src.width - lo):] = k.index_select(0, sel)[:, :, lo:]
            values[at, :, w - (src.width - lo):] = v.index_select(0, sel)[:, :, lo:]
        data.append((keys, values))
    return DynamicCache(data), ids[:, first:], mask[:, first:]


def layout(texts: Sequence[Sequence[int]], ids: Tensor, mask: Tensor, pad: int) -> tuple[Tensor, Tensor]:
    """``generate``'s input for rows whose texts but their last token are cached as ``ids``/``mask``
    ``[B, W]``: ``(input_ids [B, W+1], attention_mask [B, W+1])``, each row's last token in the last column.
    The cached columns keep their tokens (penalties and stop strings read them); masked ones get ``pad``."""
    last = torch.tensor([[t[-1]] for t in texts], dtype=torch.long)
    body = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    return torch.cat([body, last], 1), torch.cat([mask, torch.ones_like(last)], 1)


@dataclass(eq=False)
class _Stored:
    branch: str
    salt: str
    tokens: list[int]
    seg: SegmentCache  # one row, every column a token


class PrefixStore:
    """Finished rows' KV caches, kept for later rows whose ids begin the same way (a conversation's next
    turn, one system prompt before many questions): vLLM's automatic prefix caching, per finished row
    rather than per block. A new row takes the stored cache sharing the most of its first tokens (at least
    ``min_tokens``), cut there, and prefills only the rest (:meth:`BatchGeneration._carry`).

    Bounded by ``max_tokens`` cached tokens in all, the least recently used out first; a row that extends
    a stored one replaces it. A ``salt`` (vLLM's ``cache_salt``) keeps rows apart: a lookup finds only
    rows added with the same one, so tenants who must not learn whether others sent a prompt (its answer
    comes sooner when cached) each give their own. Not thread-safe: one engine thread uses it.
    """

    def __init__(self, max_tokens: int, min_tokens: int = 16) -> None:
        self.max_tokens, self.min_tokens = max_tokens, min_tokens
        self._rows: OrderedDict[int, _Stored] = OrderedDict()
        self._ids = itertools.count()
        self.tokens = 0  # cached tokens held now

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, row: CachedRow, salt: str = "") -> None:
        """Keep a copy of ``row``'s cached tokens (its own columns only, not the rest of its batch)."""
        tokens = row.tokens()
        if not self.min_tokens <= len(tokens) <= self.max_tokens:
            return
        for key, got in list(self._rows.items()):
            if (got.branch, got.salt) != (row.branch, salt):
                continue
            if tokens[:len(got.tokens)] == got.tokens:  # this row extends it: it goes
                self._drop(key)
            elif got.tokens[:len(tokens)] == tokens:  # it holds all of this row already
                self._rows.move_to_end(key)
                return
        real = row.source.mask[row.row].nonzero()[:, 0]
        layers = []
        for k, v in row.source.layers:
            at = real.to(k.device)
            layers.append((k[row.row:row.row + 1][:, :, at].clone(), v[row.row:row.row + 1][:, :, at].clone()))
        n = len(tokens)
        seg = SegmentCache(layers, torch.tensor([tokens], dtype=torch.long), torch.ones(1, n, dtype=torch.long))
        self._rows[next(self._ids)] = _Stored(row.branch, salt, tokens, seg)
        self.tokens += n
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self._rows)))

    def forget(self, branch: str) -> None:
        """Drop every stored row of ``branch`` (an adapter unloaded: a later one of that name computes otherwise)."""
        for key in [k for k, got in self._rows.items() if got.branch == branch]:
            self._drop(key)

    def _drop(self, key: int) -> None:
        self.tokens -= len(self._rows.pop(key).tokens)

    def lookup(self, branch: str, ids: Sequence[int], salt: str = "") -> CachedRow | None:
        """The stored cache of ``branch`` (added with ``salt``) sharing the most of ``ids``' first tokens
        (never its last), cut to them (views, no copy); None when none shares ``min_tokens``."""
        best, best_n, head = None, 0, list(ids[:max(0, len(ids) - 1)])
        for key, got in self._rows.items():
            if got.branch == branch and got.salt == salt:
                n = common_prefix(got.tokens, head)
                if n > best_n:
                    best, best_n = key, n
        if best is None or best_n < self.min_tokens:
            return None
        self._rows.move_to_end(best)
        seg = self._rows[best].seg
        if best_n < seg.width:
            seg = SegmentCache([(k[:, :, :best_n], v[:, :, :best_n]) for k, v in seg.layers], seg.ids[:, :best_n],
                               seg.mask[:, :best_n])
        return CachedRow(seg, 0, branch)
