"""Branched modules: one shared weight, per-branch low-rank terms, one forward for mixed-branch batches.

A :class:`BranchState` shared by every branched module of a model says which branch each batch row
uses (``rows``) or, for a whole batch, which branch is active (``active``). Mixed batches follow PEFT's
``_mixed_batch_forward``: the shared product ``x W̄ᵀ`` runs once over all rows, the per-branch terms
over each branch's rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BranchState:
    """Which branch each row of the next forward passes uses.

    Attributes:
        names: branch names of the group, in bundle order (index = branch id).
        active: branch id used for a whole batch when ``rows`` is None.
        rows: ``[B]`` long tensor of branch ids, one per batch row, or None.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.active = 0
        self._rows: Tensor | None = None
        self._plan: dict[int, list[tuple[int, Tensor]] | int] = {}

    @property
    def rows(self) -> Tensor | None:
        return self._rows

    def set_rows(self, rows: Tensor | list[int] | None) -> None:
        self._rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long).cpu()
        self._plan = {}

    def index(self, name: str) -> int:
        return self.names.index(name)

    def plan(self, batch: int, device: torch.device) -> int | list[tuple[int, Tensor]]:
        """A single branch id for the whole batch, or ``[(branch id, row indices [R]), ...]``.

        Batches that grow by a whole factor (beam search, ``num_return_sequences``) repeat each row's id.
        """
        if self._rows is None:
            return self.active
        cached = self._plan.get(batch)
        if cached is not None:
            return cached
        rows = self._rows
        if batch != rows.numel():
            if batch % rows.numel():
                raise ValueError(f"batch of {batch} rows does not match the {rows.numel()} branch ids set")
            rows = rows.repeat_interleave(batch // rows.numel())
        ids = rows.unique().tolist()
        plan: int | list[tuple[int, Tensor]]
        if len(ids) == 1:
            plan = int(ids[0])
        else:
            plan = [(int(i), (rows == i).nonzero().flatten().to(device)) for i in ids]
        self._plan[batch] = plan
        return plan


class BranchedLinear(nn.Module):
    """``y = s_i · (x W̄ᵀ + (x V_iᵀ) U_iᵀ) + b_i`` for the branch ``i`` of each row.

    ``s_i`` is folded into the per-branch terms at load time (``U_i ← s_i U_i``, ``Δ_i ← s_i Δ_i``) and
    into ``addmm``'s ``alpha`` for the shared term, so a single-branch forward is three kernels:
    ``t = (x V_iᵀ)(s_i U_i)ᵀ + b_i`` then ``y = t + s_i · x W̄ᵀ``. A dense per-branch weight is built
    only when a branch is made hot (:meth:`materialize`).

    Args:
        state: the model's shared branch selector.
        mean: ``W̄``, ``[out, in]``.
        scales: ``s_i`` per branch.
        diffs: per branch ``("lowrank", U [out,k], V [k,in])``, ``("dense", Δ [out,in])`` or ``None``.
        biases: per branch ``b_i`` ``[out]`` or None; a single shared tensor may be repeated.
    """

    def __init__(
        self,
        state: BranchState,
        mean: Tensor,
        scales: list[float],
        diffs: list[tuple | None],
        biases: list[Tensor | None] | None = None,
    ) -> None:
        super().__init__()
        self.state = state
        self.out_features, self.in_features = mean.shape
        self.weight_mean = nn.Parameter(mean, requires_grad=False)  # [out, in]
        self.scales = list(map(float, scales))
        self.u = nn.ParameterDict()
        self.v = nn.ParameterDict()
        self.delta = nn.ParameterDict()
        self.bias_ = nn.ParameterDict()
        self.hot = nn.ParameterDict()
        for i, (s, d) in enumerate(zip(self.scales, diffs)):
            if d is None:
                continue
            if d[0] == "lowrank":
                self.u[str(i)] = nn.Parameter((d[1].float() * s).to(mean.dtype), requires_grad=False)
                self.v[str(i)] = nn.Parameter(d[2].to(mean.dtype), requires_grad=False)
            else:
                self.delta[str(i)] = nn.Parameter((d[1].float() * s).to(mean.dtype), requires_grad=False)
        for i, b in enumerate(biases or []):
            if b is not None:
                self.bias_[str(i)] = nn.Parameter(b.to(mean.dtype), requires_grad=False)

    def extra_repr(self) -> str:
        ranks = [self.v[k].shape[0] if k in self.v else ("dense" if k in self.delta else 0)
                 for k in map(str, range(len(self.scales)))]
        return f"in={self.in_features}, out={self.out_features}, branches={len(self.scales)}, ranks={ranks}"

    def _branch_term(self, x2: Tensor, i: int) -> Tensor | None:
        """``(x V_iᵀ)(s_i U_i)ᵀ + b_i`` (or ``x (s_i Δ_i)ᵀ + b_i``) for ``x2`` ``[R, in]`` → ``[R, out]``."""
        k = str(i)
        b = self.bias_[k] if k in self.bias_ else None
        if k in self.u:
            return F.linear(F.linear(x2, self.v[k]), self.u[k], b)
        if k in self.delta:
            return F.linear(x2, self.delta[k], b)
        return None if b is None else b.expand(x2.shape[0], -1)

    def _single(self, x2: Tensor, i: int) -> Tensor:
        k = str(i)
        if k in self.hot:
            return F.linear(x2, self.hot[k], self.bias_[k] if k in self.bias_ else None)
        t = self._branch_term(x2, i)
        if t is None:
            return F.linear(x2, self.weight_mean) * self.scales[i]
        return torch.addmm(t, x2, self.weight_mean.t(), alpha=self.scales[i])

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [B*T, in]
        plan = self.state.plan(x.shape[0], x.device)
        if isinstance(plan, int):
            return self._single(x2, plan).view(*lead, self.out_features)
        seq = x2.shape[0] // x.shape[0]
        shared = F.linear(x2, self.weight_mean).view(x.shape[0], seq, self.out_features)  # [B, T, out]
        xb = x2.view(x.shape[0], seq, self.in_features)
        out = torch.empty_like(shared)
        for i, rows in plan:  # rows: [R] batch indices of branch i
            y = shared[rows] * self.scales[i]
            t = self._branch_term(xb[rows].reshape(-1, self.in_features), i)
            if t is not None:
                y = y + t.view(rows.numel(), seq, self.out_features)
            out[rows] = y
        return out.view(*lead, self.out_features)

    def dense_weight(self, i: int) -> Tensor:
        """``s_i (W̄ + U_i V_i)`` for branch ``i``, ``[out, in]`` (for export and hot branches)."""
        k = str(i)
        w = self.weight_mean.float() * self.scales[i]
        if k in self.u:
            w = w + self.u[k].float() @ self.v[k].float()
        elif k in self.delta:
            w = w + self.delta[k].float()
        return w.to(self.weight_mean.dtype)

    def materialize(self, i: int) -> None:
        self.hot[str(i)] = nn.Parameter(self.dense_weight(i), requires_grad=False)

    def dematerialize(self, i: int) -> None:
        if str(i) in self.hot:
            del self.hot[str(i)]


class PerBranch(nn.Module):
    """One copy of a module per branch (embeddings, norms, lm_head); rows dispatched by branch.

    Copies may share tensors (assigned by reference), so identical parts cost memory once.
    """

    def __init__(self, state: BranchState, copies: list[nn.Module]) -> None:
        super().__init__()
        self.state = state
        self.copies = nn.ModuleList(copies)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # attributes such as `weight`, `embedding_dim`, `padding_idx` read through to the active copy
            copies = super().__getattr__("copies")
            state = super().__getattr__("state")
            return getattr(copies[state.active], name)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        plan = self.state.plan(x.shape[0], x.device)
        if isinstance(plan, int):
            return self.copies[plan](x, *args, **kwargs)
        out: Tensor | None = None
        for i, rows in plan:
            y = self.copies[i](x[rows], *args, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[rows] = y
        assert out is not None
        return out
