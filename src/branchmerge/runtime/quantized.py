"""A branched linear layer that keeps quantized factors quantized in memory (``load(factors="quantized")``).

Each forward dequantizes the factors of the branches its rows use (int8 codes times the group scales,
into which the singular values and ``s_i`` are folded), then runs the same GEMMs as
:class:`~branchmerge.runtime.modules.BranchedLinear`: resident memory is about what the bundle stores
(int4 codes are held unpacked, a byte each), at the price of the dequantization per forward
(``bench/compact.py`` measures both ways).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from branchmerge.compress.quant import QuantizedFactors, dequantize_codes
from branchmerge.runtime.modules import BranchedLinear, BranchState, MixedPlan


class QuantizedBranchedLinear(BranchedLinear):
    """``y = s_i · (x W̄ᵀ + (x V_iᵀ) U_iᵀ) + b_i`` with ``U_i``, ``V_i`` held quantized.

    At load, each branch's parts (8-bit top triplets, 4-bit tail) become one int8 code matrix per factor
    (int4 unpacked: one byte per entry, still a half or a quarter of the dense factors) with one scale
    per group in the compute dtype, ``σ_j`` and ``s_i`` folded into ``U``'s scales. A forward dequantizes
    only the branches its rows use, in two elementwise products per factor.

    Args:
        state, mean, scales, biases: as for :class:`BranchedLinear`.
        factors: per branch its :class:`~branchmerge.compress.quant.QuantizedFactors` (``U [out, k]``,
            ``V [k, in]`` once dequantized), or None for a branch that is the scaled mean.
    """

    def __init__(self, state: BranchState, mean: Tensor, scales: list[float],
                 factors: list[QuantizedFactors | None], biases: list[Tensor | None] | None = None) -> None:
        super().__init__(state, mean, scales, [None] * len(scales), biases, fused=False)
        dt = mean.dtype
        self._has: list[bool] = []
        self._group = 0
        for i, qf in enumerate(factors):
            self._has.append(qf is not None)
            if qf is None:
                continue
            codes_u, scl_u, codes_v, scl_v = [], [], [], []
            for u, v in qf.parts:
                self._group = u.group_size
                codes_u.append(u.codes())
                codes_v.append(v.codes())
                scl_u.append(u.scales.float())
                scl_v.append(v.scales.float())
            fold = (qf.sigma.float() * self.scales[i])[:, None]  # σ_j · s_i per triplet
            self.register_buffer(f"uq_{i}", torch.cat(codes_u), persistent=False)  # [k, out_p] int8
            self.register_buffer(f"us_{i}", (torch.cat(scl_u) * fold).to(dt), persistent=False)  # [k, out_p/g]
            self.register_buffer(f"vq_{i}", torch.cat(codes_v), persistent=False)  # [k, in_p] int8
            self.register_buffer(f"vs_{i}", torch.cat(scl_v).to(dt), persistent=False)  # [k, in_p/g]

    def factors(self, i: int) -> tuple[Tensor, Tensor] | None:
        """Branch ``i``'s ``(Vᵢᵀ [in, k], s_i Uᵢᵀ [k, out])`` in the compute dtype, dequantized now."""
        if not self._has[i]:
            return None
        v = dequantize_codes(getattr(self, f"vq_{i}"), getattr(self, f"vs_{i}"), self._group, self.in_features)
        ut = dequantize_codes(getattr(self, f"uq_{i}"), getattr(self, f"us_{i}"), self._group, self.out_features)
        return v.t(), ut

    def extra_repr(self) -> str:
        ranks = [int(getattr(self, f"uq_{i}").shape[0]) if h else 0 for i, h in enumerate(self._has)]
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
