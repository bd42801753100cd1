"""Sibling layers — linears of one block that read the same input (q/k/v, gate/up) — as one Triton call.

vLLM merges such layers into one at load (``QKVParallelLinear``, ``MergedColumnParallelLinear``), so the
input is read once and one launch replaces three. On a decode step, where every layer's kernels are short,
launches are what a branched model pays for beyond its extra factor bytes: two kernels per branched
layer (shrink, then GEMM + expand) would be 14 per Llama block, against 8 with q/k/v and gate/up grouped.

The modules stay as ``transformers`` built them, so the model's own forward is untouched: the first
sibling called with an input computes every sibling's output in one shrink and one expand
(:func:`~branchmerge.runtime.kernels.branched_linear` with a member table) and keeps it; the others,
called with the same input tensor, return their column slice of it; the last one lets it go. The
members' parameters become views of the group's concatenated buffers (no second copy). Which layers are
siblings is architecture data (``siblings`` in ``_data/architectures/*.json``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from branchmerge.runtime.modules import BranchedLinear, MixedPlan, kernel_tiles, kernels_checked

logger = logging.getLogger(__name__)


def why_not(members: Sequence[nn.Module]) -> str | None:
    """Why ``members`` cannot run as one call, or None when they can."""
    if len(members) < 2:
        return "fewer than two layers"
    if not all(type(m) is BranchedLinear for m in members):
        return "not all are branched layers with factors in memory"
    m0 = members[0]
    if any(m.sibling is not None for m in members):
        return "already grouped"
    if not all(m.uniform for m in members):
        return "a branch without a low-rank difference (dense, or none)"
    if any(m.fused for m in members):
        return "the fused layout (each layer's W̄ and V in one weight)"
    if any(len(m.hot) for m in members):
        return "a hot branch"
    if any(m.state is not m0.state or m.in_features != m0.in_features or len(m.scales) != len(m0.scales)
           or m.weight_mean.dtype != m0.weight_mean.dtype or m.weight_mean.device != m0.weight_mean.device
           for m in members):
        return "different inputs, branches, dtype or device"
    return None


class SiblingGroup:
    """``members`` (in the order the block calls them) with their weights concatenated.

    Attributes:
        mean: ``[Σout_j, in]`` every member's ``W̄``.
        v: ``[Σ N·kp_j, in]`` every member's ``V`` rows, member after member.
        ut, scales, bias: every member's ``s·Uᵀ`` ``[N·kp_j, out_j]``, ``s`` ``[N]``, bias ``[N, out_j]``, flat.
        table: :func:`~branchmerge.runtime.kernels.member_table`.
    """

    def __init__(self, members: Sequence[BranchedLinear]) -> None:
        from branchmerge.runtime import kernels

        why = why_not(members)
        if why is not None:
            raise ValueError(f"these layers cannot run as one call: {why}")
        self.members = list(members)
        n = len(members[0].scales)
        outs = [m.out_features for m in members]
        kps = [m.stride for m in members]
        self.kp = sum(kps)
        self.bounds = [0]
        for o in outs:
            self.bounds.append(self.bounds[-1] + o)
        self.mean = torch.cat([m.weight_mean.detach() for m in members])
        self.v = torch.cat([m.v_cat.detach() for m in members])
        self.ut = torch.cat([m.ut_cat.detach().reshape(-1) for m in members])
        self.scales = torch.cat([m.scale_t for m in members])
        has_bias = any(m.has_bias for m in members)
        self.bias = torch.cat([m.bias_cat.detach().reshape(-1) if m.has_bias else
                               self.mean.new_zeros(n * m.out_features) for m in members]) if has_bias else None
        self.table = kernels.member_table(outs, kps, n, self.mean.device)
        self._cache: tuple | None = None  # (x, its version, plan, y): one tuple, read and replaced whole
        vrow = urow = 0
        for j, m in enumerate(members):  # the members' own tensors become views of the buffers above
            c0, c1, kp, out = self.bounds[j], self.bounds[j + 1], kps[j], outs[j]
            m.weight_mean = nn.Parameter(self.mean[c0:c1], requires_grad=False)
            m.v_cat = nn.Parameter(self.v[vrow:vrow + n * kp], requires_grad=False)
            m.ut_cat = nn.Parameter(self.ut[urow:urow + n * kp * out].view(n * kp, out), requires_grad=False)
            m._buffers["scale_t"] = self.scales[j * n:(j + 1) * n]
            if m.has_bias:
                m.bias_cat = nn.Parameter(self.bias[n * c0:n * c1].view(n, out), requires_grad=False)
            m._index_factors()
            m.sibling, m.sibling_index = self, j
            vrow, urow = vrow + n * kp, urow + n * kp * out

    def output(self, member: BranchedLinear, x: Tensor, x2: Tensor, plan: int | MixedPlan) -> Tensor | None:
        """``member``'s output ``[B·T, out]`` for ``x`` (its forward's input; ``x2`` its ``[B·T, in]``
        rows): a slice of every member's output, computed once per input. None when the members should run
        one by one (a hot branch, or the kernels turned off)."""
        from branchmerge.runtime import kernels

        if not kernels.STATE["ok"] or (isinstance(plan, int) and any(m._fast[plan][0] is not None
                                                                   for m in self.members)):
            return None
        c = self._cache
        compiling = torch.compiler.is_compiling()
        same_plan = c is not None and (c[2] is plan or (isinstance(plan, int) and c[2] == plan))
        if not same_plan or c[0] is not x or (not compiling and c[1] != x._version):
            batch = x.shape[0]
            y = kernels_checked(lambda: self._run(x2, plan, batch), lambda: self._reference(x2, plan, batch))
            c = self._cache = (x, None if compiling else x._version, plan, y)
        j = member.sibling_index
        if j == len(self.members) - 1:  # the last sibling: let the input and outputs go
            self._cache = None
        return c[3][:, self.bounds[j]:self.bounds[j + 1]]

    def _run(self, x2: Tensor, plan: int | MixedPlan, batch: int) -> Tensor:
        from branchmerge.runtime import kernels

        return kernels.branched_linear(x2, self.mean, self.v, self.ut, self.scales, self.kp,
                                       plan if isinstance(plan, int) else None, self.bias,
                                       plan=kernel_tiles(x2, plan, batch), members=self.table)

    def _reference(self, x2: Tensor, plan: int | MixedPlan, batch: int) -> Tensor:
        return torch.cat([m._torch_path(x2, plan, batch) for m in self.members], dim=1)

    def dissolve(self) -> None:
        """Each member runs by itself from now on (its views stay valid)."""
        for m in self.members:
            m.sibling = None
        self._cache = None


def group_siblings(model: nn.Module, siblings: Sequence[Sequence[str]]) -> int:
    """Group the layers named by each entry of ``siblings`` (submodule paths under one parent, e.g.
    ``("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")``) wherever a module of ``model`` has
    them all. Returns how many groups were made; layers that cannot be grouped are left as they are."""
    made, skipped = 0, set()
    for parent in list(model.modules()):
        for names in siblings:
            try:
                members = [parent.get_submodule(n) for n in names]
            except AttributeError:
                continue
            why = why_not(members)
            if why is None:
                SiblingGroup(members)
                made += 1
            elif why != "already grouped":
                skipped.add(why)
    if skipped:
        logger.info("some sibling layers run one by one: %s", "; ".join(sorted(skipped)))
    return made
