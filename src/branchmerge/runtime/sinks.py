"""Attention sinks that differ between branches, in one model that mixes branches per row.

gpt-oss (and Flint, Granite-SWA, DeepSeek-V4) attention modules hold a learned logit per head, ``sinks``
``[H]``, as a parameter of their own beside their projections, and hand it to the attention function
(``s_aux=self.sinks``; the eager functions read ``module.sinks``). Their projections are branched layers
that take a mixed batch's rows; the sinks are used inside the attention function, over the whole batch.

:class:`BranchSinks` keeps each branch's sinks on the attention module, and :func:`use_branch_sinks`
switches the model to an attention implementation registered here that wraps the model's own (eager,
flex, …): one call per branch present in the batch (rows of branches with equal sinks together), each
with that branch's sinks as ``module.sinks`` and ``s_aux``. A batch of one branch is one call, as before.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from branchmerge.runtime.modules import BranchState, MixedPlan, _cached
from branchmerge.runtime.perbranch import _by_rows, _kwargs_of, _rows_of, distinct

_PREFIX = "branchmerge_sinks+"


class BranchSinks(nn.Module):
    """Each branch's attention sinks, held once per distinct tensor, and the attention module as the attention
    function sees it under each: a shallow copy (its sublayers, buffers and settings shared) whose ``sinks``
    are that row's.

    Attributes:
        stacked: ``[D, H]`` the distinct sinks (D ≤ N); ``holder[i]`` is branch i's row.
    """

    def __init__(self, state: BranchState, sinks: list[Tensor], module: nn.Module) -> None:
        super().__init__()
        self.state = state
        rows, self.holder = distinct(sinks, lambda a, b: a is b or torch.equal(a, b))
        self.register_buffer("stacked", torch.stack(rows), persistent=False)
        self.__dict__["_module"] = module  # (not a submodule: the module holds this one)
        self._make_views()

    def _make_views(self) -> None:
        views = []
        for row in self.stacked:
            v = copy.copy(self._module)  # (the same dicts of sublayers and buffers; its own of parameters)
            v._parameters = {**self._module._parameters, "sinks": row}
            views.append(v)
        self.__dict__["views"] = views

    def _apply(self, fn, recurse: bool = True):  # (moved or cast: the views read the moved rows)
        out = super()._apply(fn, recurse)
        self._make_views()
        return out

    def groups(self, batch: int, device: torch.device) -> list[tuple[nn.Module, Tensor | None]]:
        """``(module view, rows)`` per distinct sinks present in the batch; ``rows`` None for the whole batch."""
        plan = self.state.plan(batch, device)
        if isinstance(plan, int):
            return [(self.views[self.holder[plan]], None)]
        return _cached(plan, (id(self), "sinks"), lambda: self._groups(plan))

    def _groups(self, plan: MixedPlan) -> list[tuple[nn.Module, Tensor | None]]:
        rows: dict[int, list[Tensor]] = {}
        for i, r in plan.groups:
            rows.setdefault(self.holder[i], []).append(r)
        if len(rows) == 1:
            return [(self.views[next(iter(rows))], None)]
        return [(self.views[h], torch.cat(rs).sort().values if len(rs) > 1 else rs[0]) for h, rs in rows.items()]


def _wrapped(inner: Callable[..., tuple[Tensor, Tensor | None]], inner_name: str
             ) -> Callable[..., tuple[Tensor, Tensor | None]]:
    """The attention function registered for the model's own, ``inner`` (named ``inner_name``)."""

    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        sinks = module._modules.get("branch_sinks")
        if sinks is None:  # (sinks equal in every branch, or none in this layer)
            return inner(module, query, key, value, attention_mask, *args, **kwargs)
        n = query.shape[0]
        groups = sinks.groups(n, query.device)
        if groups[0][1] is None:
            view = groups[0][0]
            return inner(view, query, key, value, attention_mask, *args,
                         **({**kwargs, "s_aux": view.sinks} if "s_aux" in kwargs else kwargs))
        if attention_mask is not None and not isinstance(attention_mask, Tensor):
            raise NotImplementedError(
                f"a batch mixing branches whose attention sinks differ needs a tensor attention mask to split "
                f"by row; the {inner_name!r} attention implementation gives a {type(attention_mask).__name__}: "
                "send such branches in batches of their own, or run the model with eager attention")
        outs, weights = [], []
        for view, rows in groups:
            kw = _kwargs_of(kwargs, rows, n)
            if "s_aux" in kw:
                kw["s_aux"] = view.sinks
            o, w = inner(view, query[rows], key[rows], value[rows], _rows_of(attention_mask, rows, n),
                         *[_rows_of(a, rows, n) for a in args], **kw)
            outs.append((rows, o))
            weights.append((rows, w))
        w_all = None if any(w is None for _, w in weights) else _by_rows(n, weights)
        return _by_rows(n, outs), w_all

    return attention


def use_branch_sinks(model: nn.Module) -> str:
    """Switch ``model`` to the sinks-aware wrapper of its attention implementation (registered once per
    implementation and family: eager is each family's own function, which reads ``module.sinks`` its own way;
    the wrapper keeps that implementation's mask function); returns the implementation's name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = model.config
    inner = config._attn_implementation or "eager"
    if inner.startswith(_PREFIX):
        return inner
    family = next(type(m).__module__ for m in model.modules() if "branch_sinks" in m._modules)
    name = f"{_PREFIX}{inner}@{family}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        fn = sys.modules[family].eager_attention_forward if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]
        ALL_ATTENTION_FUNCTIONS.register(name, _wrapped(fn, inner))
        mask = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(inner)
        if mask is not None:  # (an implementation without one builds no mask: neither does its wrapper)
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)
    for c in {id(c): c for c in [config, *_sub_configs(config)]}.values():
        if getattr(c, "_attn_implementation", None) == inner:
            c._attn_implementation_internal = name
    return name


def _sub_configs(config: Any) -> list[Any]:
    return [getattr(config, k) for k in getattr(config, "sub_configs", {}) if getattr(config, k, None) is not None]
