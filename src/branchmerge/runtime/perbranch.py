"""Per-branch copies of a module (embeddings, norms, heads, MoE routers): each row of a mixed batch runs
through its own branch's copy; copies holding the same tensors run as one."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from branchmerge.runtime.modules import BranchState, MixedPlan, _cached


def _tensors_key(m: nn.Module) -> tuple:
    """What identifies the tensors a module computes with: their storage, offset, shape and stride."""
    return tuple((n, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
                 for n, t in [*m.named_parameters(), *m.named_buffers()] if t is not None and not t.is_meta)


RMSNORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm", "OlmoRMSNorm"}


class PerBranch(nn.Module):
    """One copy of a module per branch (embeddings, norms, lm_head); rows dispatched by branch.

    Copies may share tensors (assigned by reference), so identical parts cost memory once.
    """

    def __init__(self, state: BranchState, copies: list[nn.Module]) -> None:
        super().__init__()
        self.state = state
        self.copies = nn.ModuleList(copies)
        self._copies = list(copies)  # plain list: cheaper indexing on the decode hot path
        # copies holding the same tensors (branches that left their embeddings or head alone) run as one
        keys = [_tensors_key(c) for c in copies]
        self._holder = [keys.index(k) for k in keys]
        # a copy that patches rows of another's (RowPatched) runs its rows through that one with the other's
        of = [getattr(c, "_of", None) for c in copies]
        at = [next((j for j, d in enumerate(copies) if o and d is o[0]), None) for o in of]
        self._root = [h if j is None else self._holder[j] for j, h in zip(at, self._holder)]
        self._shares, self._patched = len(set(self._holder)) < len(copies), self._root != self._holder
        c0 = copies[0]
        # Llama-style RMSNorm copies (``weight * x / rms(x)``) run inline, and gather weights for mixed rows
        self._rms_eps: float | None = None
        if type(c0).__name__ in RMSNORM_CLASSES and hasattr(c0, "variance_epsilon"):
            self._rms_eps = float(c0.variance_epsilon)
            self.register_buffer("stacked_norm", torch.stack([c.weight for c in copies]), persistent=False)  # [N, H]
            for i, c in enumerate(copies):  # held once: each copy's weight is a row of the stack
                c.weight = nn.Parameter(self.stacked_norm[i], requires_grad=False)

    def _through_roots(self, x: Tensor, groups: list[tuple[int, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Rows of patched copies (:class:`~.patched.RowPatched`) and of the copy they patch, run through that
        copy as one batch (one embedding lookup or head GEMM), then each patched copy's rows patched."""
        by_root: dict[int, list[tuple[int, Tensor]]] = {}
        for i, rows in groups:
            by_root.setdefault(self._root[i], []).append((i, rows))
        ys = []
        for r, members in by_root.items():
            root = self._copies[r]
            xr = x[torch.cat([rows for _, rows in members])] if len(members) > 1 else x[members[0][1]]
            if isinstance(root, nn.Embedding):  # (ids past the root's rows are patched rows)
                yr = root(xr.clamp(max=root.weight.shape[0] - 1))
            else:
                yr = root(xr)
            k = 0
            for i, rows in members:
                y = yr[k:k + rows.numel()]
                k += rows.numel()
                ys.append((rows, y if i == r else self._copies[i].over(x[rows], y)))
        return ys

    def _merged_groups(self, plan: MixedPlan) -> list[tuple[int, Tensor]]:
        """``plan.groups`` with the rows of copies that share their tensors together (under the first)."""
        rows: dict[int, list[Tensor]] = {}
        for i, r in plan.groups:
            rows.setdefault(self._holder[i], []).append(r)
        return [(h, torch.cat(rs).sort().values if len(rs) > 1 else rs[0]) for h, rs in rows.items()]

    def _rmsnorm(self, x: Tensor, w: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self._rms_eps)
        return w * h.to(x.dtype)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # attributes such as `weight`, `embedding_dim`, `padding_idx` read through to the active copy
            copies, state = self._modules.get("copies"), self.__dict__.get("state")
            if copies is None or state is None:  # still in __init__
                raise
            return getattr(copies[state.active], name)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        sel = self.state._sel
        if sel.rows is not None and x.shape[0] == 1 < sel.rows.numel():  # one row broadcast to the batch (GPT-
            x = x.expand(sel.rows.numel(), *x.shape[1:])  # BigCode's position ids [1, T]): one per branch's rows
        plan = sel.active if sel.rows is None else self.state.plan(x.shape[0], x.device)
        if isinstance(plan, int):
            if self._rms_eps is not None:
                return self._rmsnorm(x, self._copies[plan].weight)
            return self._copies[plan](x, *args, **kwargs)
        if self._rms_eps is not None:
            w = _cached(plan, (id(self), "w"),
                        lambda: self.stacked_norm[plan.row_ids].view(x.shape[0], *([1] * (x.ndim - 2)), -1))
            return self._rmsnorm(x, w)
        groups = _cached(plan, (id(self), "groups"), lambda: self._merged_groups(plan)) if self._shares \
            else plan.groups
        if len(groups) == 1:  # every row reads the same tensors
            return self._copies[groups[0][0]](x, *args, **kwargs)
        if self._patched:
            ys = self._through_roots(x, groups)
        else:
            n = x.shape[0]  # (other inputs of the batch's rows, e.g. OPT's position ids beside its mask, split too)
            ys = [(rows, self._copies[i](x[rows], *[_rows_of(a, rows, n) for a in args],
                                         **_kwargs_of(kwargs, rows, n))) for i, rows in groups]
        if isinstance(ys[0][1], tuple):  # several outputs (an MoE router's logits, weights and experts), by row
            per_row = x[0].numel() // x.shape[-1] if x.ndim > 2 else 1  # (or by token: a router flattens them)
            outs = []
            for j in range(len(ys[0][1])):
                k = per_row if ys[0][1][j].shape[0] == ys[0][0].numel() * per_row else 1
                steps = torch.arange(k, device=x.device)
                outs.append(_by_rows(x.shape[0] * k, [((rows[:, None] * k + steps).flatten(), y[j]) for rows, y in ys]))
            return tuple(outs)
        return _by_rows(x.shape[0], ys)


# keyword arguments that never index the batch (a T-long cache_position would pass for a batch of T rows)
_NOT_BATCH = frozenset({"cache_position", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens",
                        "max_length_q", "max_length_k"})


def _kwargs_of(kwargs: dict, rows: Tensor, n: int) -> dict:
    """``kwargs`` of a call on the batch's ``n`` rows, for a call on ``rows`` (:func:`_rows_of` each but those
    that never index the batch)."""
    return {k: a if k in _NOT_BATCH else _rows_of(a, rows, n) for k, a in kwargs.items()}


def distinct(values: list, same) -> tuple[list, list[int]]:
    """``(the distinct values in first-seen order, each value's index among them)``, ``same(a, b)`` deciding."""
    out: list = []
    holder: list[int] = []
    for v in values:
        j = next((k for k, d in enumerate(out) if same(d, v)), None)
        if j is None:
            out.append(v)
            j = len(out) - 1
        holder.append(j)
    return out, holder


def _rows_of(a: object, rows: Tensor, n: int) -> object:
    """``a[rows]`` for a tensor of the batch's ``n`` rows; anything else as it is."""
    return a[rows] if isinstance(a, Tensor) and a.ndim and a.shape[0] == n else a


def _by_rows(n: int, ys: list[tuple[Tensor, Tensor]]) -> Tensor:
    """One ``[n, ...]`` tensor from each group's ``(rows, output)``; outputs narrower in their last dimension
    (heads of branches with smaller vocabularies) padded with -inf: a row's tokens past its own are impossible."""
    width = max(y.shape[-1] for _, y in ys)
    y0 = ys[0][1]
    if all(y.shape[-1] == width for _, y in ys):
        out = y0.new_empty((n, *y0.shape[1:]))
    else:
        out = y0.new_full((n, *y0.shape[1:-1], width), float("-inf"))
    for rows, y in ys:
        out[rows, ..., :y.shape[-1]] = y
    return out
