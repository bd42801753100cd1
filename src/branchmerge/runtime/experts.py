"""Sparse mixture-of-experts blocks of a branched model (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GLM-4.5).

Fine-tunes of an MoE base are stored as checkpoints name them, one 2-D weight per expert and projection
(``block_sparse_moe.experts.3.w1.weight``, ``mlp.experts.3.gate_proj.weight``), so the merge compresses
each expert like any other weight. transformers 5 runs the experts as one module of 3-D tensors; here they
become :class:`ExpertLinears`, one module per expert holding its gate, up and down projections
(``nn.Linear`` or :class:`~branchmerge.runtime.modules.BranchedLinear`) under the checkpoint's names, called
as transformers' experts module is.

In a mixed batch the router gates (per-branch copies) route each token with its own branch's gate, and each
expert gives its tokens, gathered from every branch's rows, their branch ids: one mixed-row call per
projection, whose mean weight is read once. Where a bundle stores the experts fused (3-D, per branch: a
bundle merged before inputs in the fused layout were read per expert), :class:`RowsByBranch` runs the whole
sparse block once per branch on that branch's rows.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from branchmerge.runtime.modules import BranchState

if TYPE_CHECKING:
    from branchmerge.architectures import Architecture


class ExpertLinears(nn.ModuleList):
    """``num_experts`` experts, each a module with its gate, up and down projections named ``names``
    (checkpoint names, e.g. ``("w1", "w3", "w2")`` for Mixtral); made with meta ``nn.Linear`` layers that the
    bundle's tensors fill or replace.

    Called as transformers 5's fused experts: ``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])
    → [T, H]``, each token's output the weighted sum of ``down(act(gate(x)) * up(x))`` over its experts.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, names: tuple[str, str, str],
                 act_fn: Callable[[Tensor], Tensor] | None, state: BranchState | None = None, *, bias: bool = False,
                 combine: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.names, self.num_experts = tuple(names), num_experts
        # (kept out of the list, whose items are the experts: an activation module, the branch selection, and
        # how the gate's and up's outputs combine: act(gate)·up, or gpt-oss's clamped SwiGLU)
        self.__dict__["act_fn"], self.__dict__["state"] = act_fn, state
        self.__dict__["combine"] = combine or (lambda g, u: act_fn(g) * u)
        gate, up, down = self.names
        for _ in range(num_experts):
            e = nn.Module()
            with torch.device("meta"):
                if gate:  # (none in Nemotron-H's experts: down(act(up(x))))
                    setattr(e, gate, nn.Linear(hidden, intermediate, bias=bias))
                setattr(e, up, nn.Linear(hidden, intermediate, bias=bias))
                setattr(e, down, nn.Linear(intermediate, hidden, bias=bias))
            self.append(e)

    @classmethod
    def like(cls, fused: nn.Module, names: tuple[str, str, str], state: BranchState | None = None,
             layout: str = "mixtral") -> ExpertLinears:
        """The per-expert form of transformers' fused experts module (``gate_up_proj`` ``[E, 2I, H]``; in the
        ``gpt_oss`` layout ``[E, H, 2I]``, with biases and its SwiGLU)."""
        if layout == "gpt_oss":
            n, hidden, two_i = fused.gate_up_proj.shape
            return cls(n, hidden, two_i // 2, names, None, state, bias=True,
                       combine=partial(_clamped_swiglu, alpha=float(fused.alpha), limit=float(fused.limit)))
        if layout == "llama4":
            n, hidden, two_i = fused.gate_up_proj.shape
            return cls(n, hidden, two_i // 2, names, fused.act_fn, state)
        if layout == "nemotron_h":  # (up_proj [E, I, H], no gate)
            n, inter, hidden = fused.up_proj.shape
            return cls(n, hidden, inter, names, fused.act_fn, state, combine=lambda _, u: fused.act_fn(u))
        n, two_i, hidden = fused.gate_up_proj.shape
        return cls(n, hidden, two_i // 2, names, fused.act_fn, state)

    # run eagerly under torch.compile (a static cache's decode on CUDA): which experts a token reaches and the
    # selection of its branch's rows are data-dependent, and a graph break inside that selection would resume
    # outside it
    @torch.compiler.disable
    def forward(self, hidden_states: Tensor, top_k_index: Tensor | None = None,
                top_k_weights: Tensor | None = None) -> Tensor:
        if top_k_index is None:
            return self._every_expert(hidden_states)
        out = torch.zeros_like(hidden_states)
        token_rows = self._token_rows(hidden_states.shape[0])
        with torch.no_grad():  # [E+1, k, T]: which tokens chose each expert, in which of their k slots
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        for e in hit:
            if e == self.num_experts:  # (an index past the experts: a token dropped by expert parallelism)
                continue
            slot, tok = torch.where(mask[e])
            h = self._expert(e, hidden_states[tok], tok, token_rows) * top_k_weights[tok, slot, None]
            out.index_add_(0, tok, h.to(out.dtype))
        return out

    def _expert(self, e: int, x: Tensor, tok: Tensor, token_rows: Tensor | None) -> Tensor:
        """Expert ``e`` on its tokens ``x`` ``[n, H]`` (``tok`` their indices): in a mixed batch, each token a row
        of its own branch (one GEMM with the mean weight) → ``[n, H]``."""
        gate, up, down = self.names
        expert = self[e]
        with nullcontext() if token_rows is None else self.state.select(token_rows[tok.cpu()]):
            g = getattr(expert, gate)(x) if gate else None
            return getattr(expert, down)(self.combine(g, getattr(expert, up)(x)))

    def _every_expert(self, hidden_states: Tensor) -> Tensor:
        """Llama 4's call: ``[E·T, H]`` expert-major, every expert's ``T`` tokens already scaled by its router
        score, ``→ [E·T, H]``. A token an expert was not chosen for arrives as zeros, whose output is zero
        (no biases): only the others are computed (top-1 of 16 experts: a 16th of the work)."""
        x_all = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])
        out = torch.zeros_like(x_all)
        token_rows = self._token_rows(x_all.shape[1])
        for e in range(self.num_experts):
            tok = x_all[e].any(dim=-1).nonzero().flatten()
            if tok.numel() == 0:
                continue
            out[e, tok] = self._expert(e, x_all[e, tok], tok, token_rows).to(out.dtype)
        return out.view(-1, hidden_states.shape[-1])

    def _token_rows(self, tokens: int) -> Tensor | None:
        """The branch id of each of ``tokens`` flattened ``[B·T]`` tokens when a mixed batch is selected
        (each batch row's id repeated for its tokens), else None."""
        rows = None if self.state is None else self.state.rows
        if rows is None:
            return None
        if tokens % rows.numel():
            raise ValueError(f"{tokens} tokens do not split over the {rows.numel()} rows' branch ids")
        return rows.repeat_interleave(tokens // rows.numel())


class RowsByBranch(nn.Module):
    """``inner`` (a sparse MoE block ``[B, T, H] → [B, T, H]``) run once per branch of a mixed batch on that
    branch's rows, with the branch selected for the call; a one-branch batch in one call."""

    def __init__(self, state: BranchState, inner: nn.Module) -> None:
        super().__init__()
        self.state, self.inner = state, inner

    @torch.compiler.disable  # (as ExpertLinears.forward: its branch selections must hold through the block)
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        sel = self.state._sel
        if sel.rows is None:
            return self.inner(x, *args, **kwargs)
        plan = self.state.plan(x.shape[0], x.device)
        if isinstance(plan, int):
            with self.state.select(branch=plan):
                return self.inner(x, *args, **kwargs)
        out: Tensor | None = None
        for i, rows in plan.groups:
            with self.state.select(branch=i):
                y = self.inner(x[rows], *args, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[rows] = y
        assert out is not None
        return out


def _clamped_swiglu(gate: Tensor, up: Tensor, *, alpha: float, limit: float) -> Tensor:
    """gpt-oss's expert activation on the gate's and up's outputs (transformers' ``GptOssExperts``)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def per_expert_shapes(model: nn.Module, arch: Architecture, paths: list[str]) -> dict[str, list[int]]:
    """The shape :class:`ExpertLinears` gives each per-expert parameter among ``paths`` (parameter paths,
    e.g. ``model.layers.0.mlp.experts.3.w1.weight`` → ``[I, H]``), from ``model``'s fused experts' shapes;
    paths of experts past a layer's count are left out (not a parameter)."""
    spec = arch.experts
    first = fused_param(spec)
    fused = {p: getattr(m, first).shape for p, m in model.named_modules()
             if arch.matches(spec.module, p) and isinstance(getattr(m, first, None), torch.Tensor)}
    biases, columns = spec.layout == "gpt_oss", spec.layout in ("gpt_oss", "llama4")  # ([E, H, 2I])
    out: dict[str, list[int]] = {}
    for path in paths:
        module, e, proj, param = (path.rsplit(".", 3) + ["", "", ""])[:4]
        if module in fused and e.isdigit() and (param == "weight" or biases and param == "bias") \
                and int(e) < fused[module][0]:
            n, a, b = fused[module]
            hidden, inter = (a, b // 2) if columns else (b, a) if not spec.gate else (b, a // 2)
            if proj in (spec.gate, spec.up):
                out[path] = [inter, hidden] if param == "weight" else [inter]
            elif proj == spec.down:
                out[path] = [hidden, inter] if param == "weight" else [hidden]
    return out


def fused_param(spec) -> str:
    """The 3-D parameter of transformers' fused experts module that holds the gate's (or, without a gate, the
    up's) projections of every expert: ``gate_up_proj``, or Nemotron-H's ``up_proj``."""
    return "gate_up_proj" if spec.gate else "up_proj"


def stored_experts(paths: list[str], module: str) -> set[int]:
    """The expert indices under ``module`` that ``paths`` (module or parameter paths) hold tensors for."""
    pre = module + "."
    return {int(e) for p in paths if p.startswith(pre) and (e := p[len(pre):].partition(".")[0]).isdigit()}
