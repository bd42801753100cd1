"""Per-branch embeddings and heads held as another branch's with a few rows replaced or added."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RowPatched(nn.Module):
    """Another branch's embedding or output head with some rows replaced and rows added past its end (a
    fine-tune that trained a few token rows, as PEFT's trainable tokens do, or added tokens to embeddings it
    left alone): only those rows are held.

    Args:
        of: the other branch's ``nn.Embedding`` (or a subclass, such as Gemma's scaled one) or bias-free
            ``nn.Linear`` head, ``[V_of, n]`` rows; held by reference, not registered (its own branch holds it).
        rows: ``[k]`` sorted row indices (every row from ``V_of`` to ``size`` among them).
        values: ``[k, n]`` those rows.
        size: this branch's rows.
    """

    def __init__(self, of: nn.Module, rows: Tensor, values: Tensor, size: int) -> None:
        super().__init__()
        self._of = (of,)
        self.size, self.base_rows = int(size), int(of.weight.shape[0])
        self.embedding = isinstance(of, nn.Embedding)
        self.register_buffer("rows", rows.to(device=values.device, dtype=torch.long), persistent=False)
        self.register_buffer("values", values, persistent=False)
        where = torch.full((self.size,), -1, dtype=torch.long, device=values.device)  # row → its index in values
        where[self.rows] = torch.arange(self.rows.numel(), device=values.device)
        self.register_buffer("where", where, persistent=False)

    @staticmethod
    def can_patch(m: nn.Module) -> bool:
        """Whether a row patch can stand on ``m``: an embedding, or a head without a bias."""
        return isinstance(m, nn.Embedding) or (type(m) is nn.Linear and m.bias is None)

    @property
    def of(self) -> nn.Module:
        return self._of[0]

    def extra_repr(self) -> str:
        return f"rows={self.rows.numel()} of {self.size}, over {self.base_rows}"

    def forward(self, x: Tensor) -> Tensor:
        return self.over(x, self.of(x.clamp(max=self.base_rows - 1) if self.embedding else x))

    def over(self, x: Tensor, y: Tensor) -> Tensor:
        """This branch's output for input ``x`` from ``y``, the other branch's for it (ids clamped below its rows):
        embeddings ``[B, T]`` → ``[B, T, n]``, or hidden states ``[..., n]`` → logits ``[..., size]``."""
        if self.embedding:
            p = self.where[x]
            mine = F.embedding(p.clamp(min=0), self.values).to(y.dtype)
            scale = getattr(self.of, "embed_scale", None)
            if scale is not None:
                mine = mine * scale.to(y.dtype)
            return torch.where((p >= 0).unsqueeze(-1), mine, y)
        if self.size > self.base_rows:
            y = F.pad(y, (0, self.size - self.base_rows))
        return y.index_copy(-1, self.rows, F.linear(x, self.values).to(y.dtype))
