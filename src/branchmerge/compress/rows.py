"""Row patches: a matrix held as another's with a few rows replaced or added (embeddings of fine-tunes that
trained only some tokens, or added tokens to embeddings they left alone). Pure math: tensors in, tensors out."""

from __future__ import annotations

import torch
from torch import Tensor


def changed_rows(t: Tensor, base: Tensor) -> Tensor | None:
    """The rows ``[k]`` (sorted int64) where ``t`` ``[V, n]`` differs from ``base`` ``[V_b, n]``, the rows past
    ``base``'s end included; None when ``base`` cannot be patched into ``t`` (another width, more rows)."""
    if t.dim() != 2 or base.dim() != 2 or base.shape[1] != t.shape[1] or base.shape[0] > t.shape[0]:
        return None
    diff = (t[:base.shape[0]] != base.to(t.dtype)).any(1)
    return torch.cat([diff.nonzero().flatten(), torch.arange(base.shape[0], t.shape[0])])


def patch_pays(rows: int, shape: tuple[int, ...] | torch.Size, esize: int) -> bool:
    """Whether ``rows`` rows (values at ``esize`` bytes and an int64 index each) take at most half the bytes of
    the whole ``[V, n]`` matrix."""
    return rows * (shape[1] * esize + 8) * 2 <= shape[0] * shape[1] * esize
