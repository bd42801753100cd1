"""Branched modules: one shared weight, per-branch low-rank terms, one forward for mixed-branch batches.

A :class:`BranchState` shared by every branched module of a model says which branch each batch row
uses (``rows``) or, for a whole batch, which branch is active (``active``). Mixed batches follow
PEFT's ``_mixed_batch_forward`` for the shared product — ``x W̄ᵀ`` runs once over all rows. For the
per-branch terms, while ``N·k`` is small next to the layer, every row meets every branch's ``V`` and a
0/1 row mask keeps its own (fewest kernels); past that, Punica/S-LoRA's gathered layout: rows are
gathered into a padded ``[N, R_max, …]`` layout so each row meets only its own branch's factors in one
batched matmul (FLOPs independent of ``N``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class MixedPlan:
    """Rows of a mixed batch.

    Attributes:
        groups: ``(branch id, row indices [R_i])`` for each branch present.
        row_ids: branch id of every row, ``[B]``.
        pad_idx: batch row for each slot of the padded per-branch layout, ``[N·R_max]`` (unused
            slots repeat a row; their results are dropped).
        unpad_idx: slot of each batch row in that layout, ``[B]``.
        rmax: ``R_max``, the most rows any branch has.
        cache: per-module tensors derived from ``row_ids`` (row scales, norm weights), built once.
    """

    groups: list[tuple[int, Tensor]]
    row_ids: Tensor
    pad_idx: Tensor
    unpad_idx: Tensor
    rmax: int
    cache: dict = field(default_factory=dict)


class _Selection(threading.local):
    """One thread's branch selection (each thread starts on branch 0, no rows)."""

    def __init__(self) -> None:
        self.active = 0
        self.rows: Tensor | None = None
        self.plan: dict[int, MixedPlan | int] = {}


class BranchState:
    """Which branch each row of the next forward passes uses, per thread.

    The selection is thread-local: a router embedding on one thread and a mixed batch generating on
    another use the same modules without a lock. Scope a selection with :meth:`select`.

    Attributes:
        names: branch names of the group, in bundle order (index = branch id).
        active: branch id used for a whole batch when ``rows`` is None (this thread's).
        rows: ``[B]`` long tensor of branch ids, one per batch row, or None (this thread's).
    """

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self._sel = _Selection()

    @property
    def active(self) -> int:
        return self._sel.active

    @active.setter
    def active(self, i: int) -> None:
        self._sel.active = int(i)

    @property
    def rows(self) -> Tensor | None:
        return self._sel.rows

    def set_rows(self, rows: Tensor | list[int] | None) -> None:
        """Set this thread's rows until changed; prefer :meth:`select`, which restores them."""
        self._sel.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long).cpu()
        self._sel.plan = {}

    @contextmanager
    def select(self, rows: Tensor | Sequence[int] | None = None, *, branch: int | None = None) -> Iterator[None]:
        """Within the block, this thread's forwards use ``rows`` (one branch id per batch row) or, with
        ``branch``, that branch for whole batches; the previous selection comes back afterwards."""
        sel = self._sel
        prev = (sel.active, sel.rows, sel.plan)
        try:
            if branch is not None:
                sel.active = int(branch)
            self.set_rows(rows)
            yield
        finally:
            sel.active, sel.rows, sel.plan = prev

    def index(self, name: str) -> int:
        return self.names.index(name)

    def plan(self, batch: int, device: torch.device) -> int | MixedPlan:
        """A single branch id for the whole batch, or a :class:`MixedPlan`.

        Batches that grow by a whole factor (beam search, ``num_return_sequences``) repeat each row's id.
        """
        sel = self._sel
        if sel.rows is None:
            return sel.active
        cached = sel.plan.get(batch)
        if cached is not None:
            return cached
        rows = sel.rows
        if batch != rows.numel():
            if batch % rows.numel():
                raise ValueError(f"batch of {batch} rows does not match the {rows.numel()} branch ids set")
            rows = rows.repeat_interleave(batch // rows.numel())
        ids = rows.unique().tolist()
        plan: int | MixedPlan
        if len(ids) == 1:
            plan = int(ids[0])
        else:
            n = len(self.names)
            members = [(rows == i).nonzero().flatten() for i in range(n)]
            rmax = max(m.numel() for m in members)
            pad = torch.zeros(n * rmax, dtype=torch.long)
            unpad = torch.empty(batch, dtype=torch.long)
            for i, m in enumerate(members):
                pad[i * rmax:(i + 1) * rmax] = m[0] if m.numel() else 0
                pad[i * rmax:i * rmax + m.numel()] = m
                unpad[m] = i * rmax + torch.arange(m.numel())
            groups = [(i, members[i].to(device)) for i in ids]
            plan = MixedPlan(groups, rows.to(device), pad.to(device), unpad.to(device), rmax)
        sel.plan[batch] = plan
        return plan


def _cached(plan: MixedPlan, key: tuple, make) -> Tensor:
    t = plan.cache.get(key)
    if t is None:
        t = plan.cache[key] = make()
    return t


def kernel_tiles(x2: Tensor, plan: int | MixedPlan, batch: int):
    """The Triton kernels' :class:`~branchmerge.runtime.kernels.Tiles` for ``x2`` ``[B·T, in]`` under
    ``plan`` (made once per shape or plan)."""
    from branchmerge.runtime import kernels

    if isinstance(plan, int):
        return kernels.cached_tiles(plan, x2.shape[0], x2.device)
    seq = x2.shape[0] // batch
    return _cached(plan, ("triton", seq), lambda: kernels.tiles(
        plan.row_ids.cpu().repeat_interleave(seq), x2.shape[0], x2.device))


def kernels_checked(run, reference) -> Tensor:
    """``run()`` (a Triton path); the first call in a process is compared with ``reference()`` (the torch
    path), and a kernel that fails or disagrees turns the kernels off for the process (with a warning),
    never the answer."""
    from branchmerge.runtime import kernels

    if not kernels.STATE["ok"]:  # turned off earlier in this process
        return reference()
    try:
        y = run()
    except Exception as e:  # noqa: BLE001 - a compiler or driver error on some GPU: keep serving
        kernels.disable(f"{type(e).__name__}: {e}")
        return reference()
    if not kernels.STATE["checked"]:
        ref = reference().reshape(y.shape)
        err = float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
        if err > 2e-2:
            kernels.disable(f"the kernels' output differs from the torch path by {err:.3g} (relative)")
            return ref
        kernels.STATE["checked"] = True
    return y


def _gather_rows(x2: Tensor, plan: MixedPlan, batch: int, n: int) -> Tensor:
    """``[B·T, in]`` rows → the padded per-branch layout ``[N, R_max·T, in]``."""
    seq = x2.shape[0] // batch
    return x2.view(batch, -1)[plan.pad_idx].view(n, plan.rmax * seq, x2.shape[1])


class BranchedLinear(nn.Module):
    """``y = s_i · (x W̄ᵀ + (x V_iᵀ) U_iᵀ) + b_i`` for the branch ``i`` of each row.

    ``s_i`` is folded into the per-branch terms at load time (``U_i ← s_i U_i``, ``Δ_i ← s_i Δ_i``) and
    into ``addmm``'s ``alpha``/``beta`` for the shared term, so a single-branch forward is three GEMMs:
    ``y = x W̄ᵀ``, ``h = x V_iᵀ``, then ``y ← s_i·y + h (s_i U_i)ᵀ`` in place (decode), or
    ``y = s_i · x W̄ᵀ`` then ``y += h (s_i U_i)ᵀ`` (prefill). A dense per-branch weight is built only
    when a branch is made hot (:meth:`materialize`).

    When every branch has factors of one rank ``k`` ("uniform"), they are stored concatenated —
    ``v_cat`` ``[N·k, in]`` and ``ut_cat`` ``[N·k, out]`` (rows of ``s_i U_iᵀ``) — and a mixed batch
    runs in a fixed number of kernels whatever the branches. With ``masked`` (``N·k`` at most
    ``masked_max_share`` of the layer's width): ``x W̄ᵀ`` and ``x v_catᵀ``, a cached row mask, then
    ``y = s_row·x W̄ᵀ + (masked)·ut_cat`` in place. Otherwise rows are gathered per branch, go through
    two batched matmuls against the factors viewed ``[N, k, ·]``, and are scattered back.

    With ``fused`` (the default on CUDA, where launches cost more than bytes), ``W̄`` and every ``V_i``
    are one stored weight ``w_cat`` ``[out + N·kp, in]``, ranks zero-padded to ``kp`` (a multiple of 8,
    so every slice stays 16-byte aligned): one branch is two GEMMs, a mixed batch four kernels.
    ``weight_mean`` and ``v_cat`` are then views into ``w_cat``.

    Args:
        state: the model's shared branch selector.
        mean: ``W̄``, ``[out, in]``.
        scales: ``s_i`` per branch.
        diffs: per branch ``("lowrank", U [out,k], V [k,in])``, ``("dense", Δ [out,in])`` or ``None``.
        biases: per branch ``b_i`` ``[out]`` or None.
        fused: the one-weight layout above; None picks it when ``mean`` is on a CUDA device.
    """

    use_triton = False  # set by load(kernels="triton"|"auto"): both paths through runtime.kernels (uniform only)
    # one branch over more rows than this (a prefill) takes the torch path with the Triton kernels on: W̄'s
    # GEMM is then compute-bound, where cuBLAS beats a Triton GEMM and launches no longer matter (vLLM
    # likewise leaves the base GEMM to cuBLAS and adds LoRA in Triton)
    triton_max_rows = 256
    sibling = None  # a runtime.siblings.SiblingGroup when this layer runs as one call with its siblings (q/k/v)
    sibling_index = 0
    small_rows = 32  # below this many rows the single-branch path accumulates in place (faster on CPU BLAS)
    masked_max_share = 0.5  # mixed rows use the masked path while N·k ≤ this share of min(out, in)

    def __init__(
        self,
        state: BranchState,
        mean: Tensor,
        scales: list[float],
        diffs: list[tuple | None],
        biases: list[Tensor | None] | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__()
        self.state = state
        self.out_features, self.in_features = mean.shape
        n = len(scales)
        dt = mean.dtype
        self.scales = list(map(float, scales))
        self.register_buffer("scale_t", torch.tensor(self.scales, dtype=dt, device=mean.device), persistent=False)
        self.delta = nn.ParameterDict()
        self.hot = nn.ParameterDict()
        ranks = {d[1].shape[1] for d in diffs if d is not None and d[0] == "lowrank"}
        self.uniform = len(ranks) == 1 and all(d is not None and d[0] == "lowrank" for d in diffs)
        self.rank = ranks.pop() if self.uniform else 0
        on_gpu = mean.device.type == "cuda"
        self.fused = self.uniform and (on_gpu if fused is None else fused)
        # on a GPU (and always when fused) ranks are padded to a multiple of 8 with zeros (exact), so every
        # factor GEMM and every slice of x·w_catᵀ is 16-byte aligned
        self.stride = -(-self.rank // 8) * 8 if self.fused or (self.uniform and on_gpu) else self.rank
        # mixed rows: all factors + a mask while they are small next to the layer, else gathered per branch
        self.masked = self.fused or (self.uniform and n * self.stride <= min(mean.shape) * self.masked_max_share)
        self._lowrank_ids = [i for i, d in enumerate(diffs) if d is not None and d[0] == "lowrank"]
        self._v: list[Tensor | None] = [None] * n
        self._ut: list[Tensor | None] = [None] * n
        if self.uniform:
            kp = self.stride
            v_cat = mean.new_zeros(n * kp, self.in_features)  # [N·kp, in]
            ut_cat = mean.new_zeros(n * kp, self.out_features)  # [N·kp, out], rows of s_i U_iᵀ
            for i, (d, s) in enumerate(zip(diffs, self.scales)):
                v_cat[i * kp:i * kp + self.rank] = d[2].to(dt)
                ut_cat[i * kp:i * kp + self.rank] = (d[1].float() * s).T.to(dt)
            self.ut_cat = nn.Parameter(ut_cat, requires_grad=False)
            if self.fused:  # W̄ and every V_i as one weight: x·w_catᵀ gives x W̄ᵀ and all x V_iᵀ in one GEMM
                self.w_cat = nn.Parameter(torch.cat([mean, v_cat]), requires_grad=False)  # [out + N·kp, in]
            else:
                self.v_cat = nn.Parameter(v_cat, requires_grad=False)
        else:
            self.v_cat = self.ut_cat = None
            self.factors = nn.ParameterList()
            for i, (s, d) in enumerate(zip(self.scales, diffs)):
                if d is None:
                    continue
                if d[0] == "lowrank":
                    self.factors.append(nn.Parameter(d[2].to(dt), requires_grad=False))
                    self.factors.append(nn.Parameter((d[1].float() * s).T.contiguous().to(dt), requires_grad=False))
                else:
                    self.delta[str(i)] = nn.Parameter((d[1].float() * s).to(dt), requires_grad=False)
        if not self.fused:
            self.weight_mean = nn.Parameter(mean, requires_grad=False)  # [out, in]
        self.has_bias = biases is not None and any(b is not None for b in biases)
        if self.has_bias:
            zeros = torch.zeros(self.out_features, dtype=dt, device=mean.device)
            self.bias_cat = nn.Parameter(torch.stack([zeros if b is None else b.to(dt) for b in biases]),
                                         requires_grad=False)  # [N, out]
        self._index_factors()

    def _index_factors(self) -> None:
        """Per-branch views into the stored factors (no copies): ``_v[i]`` ``[k, in]``, ``_ut[i]`` ``[k, out]``.

        Also the single-branch table ``_fast[i] = (hot weight, Vᵢᵀ, s_i Uᵢᵀ, s_i, b_i)``.
        """
        k, kp = self.rank, self.stride
        if self.fused:  # views into the one stored weight
            self.weight_mean = self.w_cat[:self.out_features]
            self.v_cat = self.w_cat[self.out_features:]
        for j, i in enumerate(self._lowrank_ids):
            if self.uniform:
                self._v[i], self._ut[i] = self.v_cat[i * kp:i * kp + k], self.ut_cat[i * kp:i * kp + k]
            else:
                self._v[i], self._ut[i] = self.factors[2 * j], self.factors[2 * j + 1]
        self._wt = self.weight_mean.t()  # [in, out] view
        self._vt_cat = None if self.v_cat is None else self.v_cat.t()  # [in, N·kp] view
        # the hot path uses the padded factor rows (zeros beyond the rank) so its GEMMs stay aligned
        vp = [self.v_cat[i * kp:(i + 1) * kp] if self.uniform else self._v[i] for i in range(len(self.scales))]
        up = [self.ut_cat[i * kp:(i + 1) * kp] if self.uniform else self._ut[i] for i in range(len(self.scales))]
        self._fast = [(self.hot[str(i)] if str(i) in self.hot else None, None if vp[i] is None else vp[i].t(),
                       up[i], self.scales[i], self._bias(i)) for i in range(len(self.scales))]

    def _apply(self, fn, recurse: bool = True):  # keep the per-branch views valid after .to()/.cuda()
        if self.sibling is not None:  # its buffers would go stale: the siblings run one by one from now on
            self.sibling.dissolve()
        out = super()._apply(fn, recurse)
        self._index_factors()
        return out

    def extra_repr(self) -> str:
        ranks = [v.shape[0] if v is not None else ("dense" if str(i) in self.delta else 0) for i, v in enumerate(self._v)]
        return f"in={self.in_features}, out={self.out_features}, branches={len(self.scales)}, ranks={ranks}"

    def _bias(self, i: int) -> Tensor | None:
        return self.bias_cat[i] if self.has_bias else None

    def _branch_term(self, x2: Tensor, i: int) -> Tensor | None:
        """``(x V_iᵀ)(s_i U_i)ᵀ + b_i`` (or ``x (s_i Δ_i)ᵀ + b_i``) for ``x2`` ``[R, in]`` → ``[R, out]``."""
        b = self._bias(i)
        if self._v[i] is not None:
            t = F.linear(x2, self._v[i]) @ self._ut[i]  # [R, k] @ [k, out]
            return t if b is None else t + b
        k = str(i)
        if k in self.delta:
            return F.linear(x2, self.delta[k], b)
        return None if b is None else b.expand(x2.shape[0], -1)

    def _single(self, x2: Tensor, i: int) -> Tensor:
        """Branch ``i`` for every row of ``x2`` ``[R, in]`` → ``[R, out]``: the decode hot path, kept flat."""
        hot, vt, ut, s, b = self._fast[i]
        if hot is not None:
            return F.linear(x2, hot, b)
        if self.fused:
            return self._single_fused(x2, i, s, b)
        if vt is not None:
            if x2.shape[0] < self.small_rows:  # decode: a plain GEMM, then the low-rank term added in place
                y = torch.mm(x2, self._wt).addmm_(torch.mm(x2, vt), ut, beta=s)
                return y if b is None else y.add_(b)
            # prefill: y = sᵢ·x W̄ᵀ into a fresh buffer (beta=0: its contents are ignored), then the rank-k
            # product accumulated with beta=1. The rank-k GEMM runs single-threaded in MKL; accumulating
            # into an existing output is its fastest form (a fresh output or beta ≠ 1 costs 1.5×).
            y = x2.new_empty(x2.shape[0], self.out_features).addmm_(x2, self._wt, beta=0, alpha=s)
            y.addmm_(torch.mm(x2, vt), ut)
            return y if b is None else y.add_(b)
        else:
            t = self._branch_term(x2, i)  # a dense Δᵢ, or only a bias
            if t is None:
                return F.linear(x2, self.weight_mean) * s
        return torch.addmm(t, x2, self._wt, alpha=s)

    def _single_fused(self, x2: Tensor, i: int, s: float, b: Tensor | None) -> Tensor:
        """Two GEMMs: ``h = x·w_catᵀ`` ``[R, out + N·kp]``, then in place on its first ``out`` columns
        ``y = s_i · x W̄ᵀ + (x V_iᵀ)(s_i U_i)ᵀ``. Returns a strided ``[R, out]`` view of ``h``."""
        out, kp = self.out_features, self.stride
        h = F.linear(x2, self.w_cat)
        lo = out + i * kp
        y = h[:, :out].addmm_(h[:, lo:lo + kp], self.ut_cat[i * kp:(i + 1) * kp], beta=s)
        return y if b is None else y.add_(b)

    def _mixed_masked(self, x2: Tensor, plan: MixedPlan, batch: int) -> Tensor:
        """Mixed rows with every branch's factors and a mask: ``x W̄ᵀ`` and all ``x V_iᵀ`` (one GEMM in the
        fused layout, two otherwise); each row keeps its own branch's ``x V_iᵀ`` columns (a cached 0/1
        mask); ``y = s_row · x W̄ᵀ + (masked) · ut_cat`` accumulated in place. ``x2`` ``[B·T, in]`` →
        ``[B·T, out]``. Costs ``N×`` the factor FLOPs but no gather or scatter: the choice while
        ``N·kp`` is small next to the layer's width."""
        out, n, kp = self.out_features, len(self.scales), self.stride
        seq = x2.shape[0] // batch
        if self.fused:
            h = F.linear(x2, self.w_cat)  # [B·T, out + N·kp]
            y, xv = h[:, :out], h[:, out:]
        else:
            y, xv = torch.mm(x2, self._wt), torch.mm(x2, self._vt_cat)
        mask = _cached(plan, (id(self), "m"), lambda: (
            torch.arange(n * kp, device=x2.device) // kp == plan.row_ids[:, None]).to(y.dtype).view(batch, 1, n * kp))
        xv = (xv.view(batch, seq, n * kp) * mask).view(-1, n * kp)  # [B·T, N·kp]
        row_scale = _cached(plan, (id(self), "s"), lambda: self.scale_t[plan.row_ids].view(batch, 1, 1))
        y.view(batch, seq, out).mul_(row_scale)
        y.addmm_(xv, self.ut_cat)
        if self.has_bias:
            y.view(batch, seq, out).add_(
                _cached(plan, (id(self), "b"), lambda: self.bias_cat[plan.row_ids].view(batch, 1, out)))
        return y

    def _finish_mixed(self, shared: Tensor, xv: Tensor, plan: MixedPlan, batch: int) -> Tensor:
        """``s_i · shared + (x V_iᵀ)(s_i U_i)ᵀ + b_i`` per row from the gathered ``xv`` ``[N, R_max·T, k]``.

        ``shared`` is ``x W̄ᵀ`` ``[B·T, out]``.
        Returns ``[B, T, out]``.
        """
        n, seq, out_f = len(self.scales), shared.shape[0] // batch, self.out_features
        low = torch.bmm(xv, self.ut_cat.view(n, self.stride, out_f))  # [N, R_max·T, out]
        low = low.view(n * plan.rmax, seq * out_f)[plan.unpad_idx].view(batch, seq, out_f)
        row_scale = _cached(plan, (id(self), "s"), lambda: self.scale_t[plan.row_ids].view(batch, 1, 1))
        y = torch.addcmul(low, shared.view(batch, seq, out_f), row_scale)  # low + s_i · x W̄ᵀ
        if self.has_bias:
            y += _cached(plan, (id(self), "b"), lambda: self.bias_cat[plan.row_ids].view(batch, 1, out_f))
        return y

    def _mixed(self, x2: Tensor, plan: MixedPlan, batch: int) -> Tensor:
        if self.masked:
            return self._mixed_masked(x2, plan, batch)
        shared = F.linear(x2, self.weight_mean)  # [B·T, out], once for all rows
        seq = x2.shape[0] // batch
        n = len(self.scales)
        if self.uniform:
            xs = _gather_rows(x2, plan, batch, n)  # [N, R_max·T, in]
            xv = torch.bmm(xs, self.v_cat.view(n, self.stride, self.in_features).transpose(1, 2))
            return self._finish_mixed(shared, xv, plan, batch)
        out = shared.view(batch, seq, self.out_features) * self.scale_t[plan.row_ids].view(batch, 1, 1)
        xb = x2.view(batch, seq, self.in_features)
        for i, rows in plan.groups:  # rows: [R] batch indices of branch i
            t = self._branch_term(xb[rows].reshape(-1, self.in_features), i)
            if t is not None:
                out[rows] += t.view(rows.numel(), seq, self.out_features)
        return out

    def forward(self, x: Tensor) -> Tensor:
        sel = self.state._sel
        if sel.rows is None:
            fast = self._fast[sel.active]
            if fast[0] is not None and x.is_contiguous():  # a hot branch: exactly an nn.Linear
                return F.linear(x, fast[0], fast[4])
            plan = sel.active
        else:
            plan = self.state.plan(x.shape[0], x.device)
        x2 = x.reshape(-1, self.in_features)  # [B*T, in]
        if self.use_triton and self.uniform and (x2.shape[0] <= self.triton_max_rows or not isinstance(plan, int)):
            x2 = x2.contiguous()
            y = None if self.sibling is None else self.sibling.output(self, x, x2, plan)
            if y is None:
                y = self._triton_checked(x2, plan, x.shape[0])
        else:
            y = self._torch_path(x2, plan, x.shape[0])
        return y.view(*x.shape[:-1], self.out_features)

    def _torch_path(self, x2: Tensor, plan: int | MixedPlan, batch: int) -> Tensor:
        """The torch forward of ``x2`` ``[B·T, in]`` → ``[B·T, out]``."""
        y = self._single(x2, plan) if isinstance(plan, int) else self._mixed(x2, plan, batch)
        return y.reshape(x2.shape[0], self.out_features)

    def _triton_checked(self, x2: Tensor, plan: int | MixedPlan, batch: int) -> Tensor:
        return kernels_checked(lambda: self._triton(x2, plan, batch), lambda: self._torch_path(x2, plan, batch))

    def _triton(self, x2: Tensor, plan: int | MixedPlan, batch: int) -> Tensor:
        """Both kernels of :mod:`branchmerge.runtime.kernels` (shrink, then GEMM + expand), for one branch or
        rows of several; a hot branch stays one ``F.linear``."""
        from branchmerge.runtime import kernels

        if isinstance(plan, int):
            hot = self._fast[plan][0]
            if hot is not None:
                return F.linear(x2, hot, self._fast[plan][4])
        return kernels.branched_linear(x2, self.weight_mean, self.v_cat, self.ut_cat, self.scale_t, self.stride,
                                       plan if isinstance(plan, int) else None,
                                       self.bias_cat if self.has_bias else None, plan=kernel_tiles(x2, plan, batch))

    def dense_weight(self, i: int) -> Tensor:
        """``s_i (W̄ + U_i V_i)`` for branch ``i``, ``[out, in]`` (for export and hot branches)."""
        w = self.weight_mean.float() * self.scales[i]
        if self._v[i] is not None:
            w = w + self._ut[i].float().T @ self._v[i].float()
        elif str(i) in self.delta:
            w = w + self.delta[str(i)].float()
        return w.to(self.weight_mean.dtype)

    def _selected(self, what: str) -> int:
        """The one branch this thread's selection runs (``what`` is read for it), else AttributeError."""
        rows = self.state.rows
        if rows is None:
            return self.state.active
        ids = rows.unique()
        if ids.numel() != 1:
            raise AttributeError(f"{what} of a branched linear layer under a batch mixing branches "
                                 f"{[self.state.names[int(i)] for i in ids]}: there is one per branch; call the layer")
        return int(ids[0])

    @property
    def weight(self) -> Tensor:
        """The selected branch's dense ``s_i (W̄ + U_i V_i)`` ``[out, in]`` (its hot copy when it has one), for
        code that reads a linear layer's weight instead of calling it (mamba-ssm's fused Mamba-2 kernel reads
        ``out_proj.weight``). Built on each read: the layer itself never holds it. AttributeError under a
        selection that mixes branches."""
        i = self._selected("the weight")
        return self.hot[str(i)] if str(i) in self.hot else self.dense_weight(i)

    @property
    def bias(self) -> Tensor | None:
        """The selected branch's bias ``[out]`` (or None), as :attr:`weight`."""
        return self._bias(self._selected("the bias"))

    def __getattr__(self, name: str):
        if name == "weight" or name == "bias":  # (a property's AttributeError lands here: say why, not "no attribute")
            self._selected(f"the {name}")
        return super().__getattr__(name)

    def materialize(self, i: int) -> None:
        self.hot[str(i)] = nn.Parameter(self.dense_weight(i), requires_grad=False)
        self._index_factors()

    def dematerialize(self, i: int) -> None:
        if str(i) in self.hot:
            del self.hot[str(i)]
        self._index_factors()
