"""A branched linear layer that keeps quantized factors quantized in memory (``load(factors="quantized")``).

Each forward dequantizes the factors of the branches its rows use (int8, or int4 unpacked from nibbles,
times the group scales, the singular values and ``s_i``), then runs the same GEMMs as
:class:`~branchmerge.runtime.modules.BranchedLinear`: resident memory is what the bundle stores, at the
price of the dequantization per forward (``bench/compact.py`` measures both ways).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from branchmerge.compress.quant import QuantizedFactors, QuantizedRows
from branchmerge.runtime.modules import BranchedLinear, BranchState, MixedPlan


class QuantizedBranchedLinear(BranchedLinear):
    """``y = s_i · (x W̄ᵀ + (x V_iᵀ) U_iᵀ) + b_i`` with ``U_i``, ``V_i`` held quantized.

    Args:
        state, mean, scales, biases: as for :class:`BranchedLinear`.
        factors: per branch its :class:`~branchmerge.compress.quant.QuantizedFactors` (``U [out, k]``,
            ``V [k, in]`` once dequantized), or None for a branch that is the scaled mean.
    """

    def __init__(self, state: BranchState, mean: Tensor, scales: list[float],
                 factors: list[QuantizedFactors | None], biases: list[Tensor | None] | None = None) -> None:
        super().__init__(state, mean, scales, [None] * len(scales), biases, fused=False)
        self._layout: list[list[tuple[int, int, int, int]] | None] = []
        for i, qf in enumerate(factors):
            if qf is None:
                self._layout.append(None)
                continue
            self.register_buffer(f"sigma_{i}", qf.sigma.float(), persistent=False)
            parts = []
            for j, (u, v) in enumerate(qf.parts):
                for f, rows in (("u", u), ("v", v)):
                    self.register_buffer(f"q_{i}_{j}_{f}", rows.q, persistent=False)
                    self.register_buffer(f"s_{i}_{j}_{f}", rows.scales, persistent=False)
                parts.append((u.bits, u.group_size, u.length, v.length))
            self._layout.append(parts)

    def _qf(self, i: int) -> QuantizedFactors:
        parts = []
        for j, (bits, gs, m, n) in enumerate(self._layout[i]):
            parts.append((QuantizedRows(getattr(self, f"q_{i}_{j}_u"), getattr(self, f"s_{i}_{j}_u"), bits, gs, m),
                          QuantizedRows(getattr(self, f"q_{i}_{j}_v"), getattr(self, f"s_{i}_{j}_v"), bits, gs, n)))
        return QuantizedFactors(getattr(self, f"sigma_{i}"), tuple(parts))

    def factors(self, i: int) -> tuple[Tensor, Tensor] | None:
        """Branch ``i``'s ``(Vᵢᵀ [in, k], s_i Uᵢᵀ [k, out])`` in the compute dtype, dequantized now."""
        if self._layout[i] is None:
            return None
        u, v = self._qf(i).dequantize(torch.float32)
        dt = self.weight_mean.dtype
        return v.to(dt).t(), (u.T * self.scales[i]).to(dt)

    def extra_repr(self) -> str:
        ranks = [0 if p is None else int(getattr(self, f"sigma_{i}").numel()) for i, p in enumerate(self._layout)]
        return f"in={self.in_features}, out={self.out_features}, branches={len(self.scales)}, ranks={ranks}, quantized"

    def _single(self, x2: Tensor, i: int) -> Tensor:
        hot, _, _, s, b = self._fast[i]
        if hot is not None:
            return F.linear(x2, hot, b)
        f = self.factors(i)
        if f is None:
            y = torch.mm(x2, self._wt).mul_(s)
        else:
            y = torch.mm(x2, self._wt).addmm_(torch.mm(x2, f[0]), f[1], beta=s)
        return y if b is None else y.add_(b)

    def _mixed(self, x2: Tensor, plan: MixedPlan, batch: int) -> Tensor:
        seq = x2.shape[0] // batch
        out = F.linear(x2, self.weight_mean).view(batch, seq, self.out_features)
        out = out * self.scale_t[plan.row_ids].view(batch, 1, 1)
        xb = x2.view(batch, seq, self.in_features)
        for i, rows in plan.groups:  # rows: [R] batch indices of branch i
            f, b = self.factors(i), self._bias(i)
            if f is not None:
                out[rows] += (xb[rows] @ f[0]) @ f[1]
            if b is not None:
                out[rows] += b
        return out.view(-1, self.out_features)

    def dense_weight(self, i: int) -> Tensor:
        w = self.weight_mean.float() * self.scales[i]
        f = self.factors(i)
        if f is not None:
            w = w + f[1].float().T @ f[0].float().T
        return w.to(self.weight_mean.dtype)
