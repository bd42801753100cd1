"""Sequence mixers whose own parameters differ between branches, in one model that mixes branches per row.

A Mamba mixer (Mamba-2, Falcon-H1, Jamba, Bamba, Nemotron-H…: ``A_log``, ``D``, ``dt_bias``) or a gated
delta-net (Qwen3-Next's ``A_log``, ``dt_bias``) holds parameters of its own beside its projections,
convolution and norm, reads them in the middle of its forward over the whole batch, and reads and writes
its layer's conv and recurrent states in the cache. Its sublayers take a mixed batch's rows as any branched
layer does; its own parameters cannot.

:func:`use_branch_mixer` gives the mixer a :class:`BranchMixer` and makes its forward that one's: a batch
of one branch is one call of the mixer with that branch's own parameters (a shallow copy of the mixer:
sublayers, buffers and settings shared), under that branch's selection (so a sublayer its forward reads as
a tensor, ``conv1d.weight``, is that branch's); a batch mixing branches calls it once per branch present,
on that branch's rows, with a row view of the cache (:class:`CacheRows`: that layer's conv and recurrent
states of those rows, written back after the call). A mixer whose branches differ only in its compressed
projections is left alone (``runtime.build``): its branched layers take a mixed batch's rows in one call.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from branchmerge.runtime.modules import BranchState, MixedPlan
from branchmerge.runtime.perbranch import _by_rows, _kwargs_of, distinct

# class-name parts of the sequence mixers a decoder layer calls as ``mixer(hidden_states, cache=…, …)``
_MIXERS = ("mixer", "mamba", "deltanet", "linearattention", "shortconv")
_STATES = ("conv_states", "recurrent_states")  # {state index: [B, ...] or None}
_FLAGS = ("is_conv_states_initialized", "is_recurrent_states_initialized", "has_previous_state",
          "conv_kernel_size")


def row_mixer(mod: nn.Module) -> bool:
    """Whether ``mod`` is a sequence mixer :class:`BranchMixer` can run per branch on a mixed batch's rows: a
    module of its layer's (an int ``layer_idx``) called with the batch first and its cache by keyword, named as
    one (Mamba2Mixer, JambaMambaMixer, Qwen3NextGatedDeltaNet, Lfm2ShortConv…), with no such module inside it
    (a Mamba2Block holds its mixer)."""
    return _named_mixer(mod) and not any(_named_mixer(m) for m in mod.modules() if m is not mod)


def _named_mixer(mod: nn.Module) -> bool:
    name = type(mod).__name__.lower()
    return isinstance(getattr(mod, "layer_idx", None), int) and any(k in name for k in _MIXERS)


class BranchMixer(nn.Module):
    """Each branch's own parameters of a sequence mixer (its sublayers are branched layers already), held as the
    mixer's ``branch_mixer``; :func:`use_branch_mixer` makes its :meth:`run` the mixer's forward.

    Attributes:
        own_<parameter>: ``[D, ...]`` the distinct sets of own tensors (D ≤ N) stacked, one buffer per
            parameter (none where the mixer's own parameters are equal in every branch); ``holder[i]`` is
            branch i's set, ``views[holder[i]]`` the mixer as branch i runs it (a shallow copy: its sublayers,
            buffers and settings shared, its own parameters that branch's; its class's forward).
    """

    def __init__(self, state: BranchState, own: list[dict[str, Tensor]], mixer: nn.Module) -> None:
        super().__init__()
        self.state = state
        sets, self.holder = distinct(own, lambda a, b: all(a[p] is t or torch.equal(a[p], t) for p, t in b.items()))
        self.names, self.distinct = sorted(own[0]), len(sets)
        for p in self.names:
            self.register_buffer(_buffer(p), torch.stack([d[p] for d in sets]), persistent=False)
        self.__dict__["_mixer"] = mixer  # (not a submodule: the mixer holds this one)
        self.__dict__["_views"] = None

    @property
    def views(self) -> list[nn.Module]:
        if self._views is None:  # (made on first use, and again once moved or cast)
            views = []
            for j in range(self.distinct):
                v = copy.copy(self._mixer)  # (the same dicts of sublayers and buffers; its own of parameters)
                v.__dict__.pop("forward", None)  # (its class's forward)
                v._parameters = {**self._mixer._parameters,
                                 **{p: nn.Parameter(getattr(self, _buffer(p))[j], requires_grad=False)
                                    for p in self.names}}
                views.append(v)
            self.__dict__["_views"] = views
        return self._views

    def _apply(self, fn, recurse: bool = True):
        self.__dict__["_views"] = None
        return super()._apply(fn, recurse)

    def run(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        """The mixer's forward: one branch's batch through that branch's view; a mixed batch per branch."""
        sel = self.state._sel
        if sel.rows is None:
            return self.views[self.holder[sel.active]](hidden_states, *args, **kwargs)
        plan = self.state.plan(hidden_states.shape[0], hidden_states.device)
        if isinstance(plan, int):  # (rows of one branch: the branch selected, for sublayers read as tensors)
            with self.state.select(branch=plan):
                return self.views[self.holder[plan]](hidden_states, *args, **kwargs)
        return self._mixed(plan, hidden_states, args, kwargs)

    @torch.compiler.disable  # (a copy of the cache per branch; the branch selections must hold through the call)
    def _mixed(self, plan: MixedPlan, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """One call per branch present, on its rows, with its own parameters and its rows of the cache."""
        if args:
            raise NotImplementedError(f"a batch mixing branches needs {type(self._mixer).__name__}'s inputs beside "
                                      "the hidden states by keyword")
        n, outs = x.shape[0], []
        key = next((k for k in ("cache", "cache_params", "past_key_values") if kwargs.get(k) is not None), None)
        views = None if key is None else CacheRows(kwargs[key], self._mixer.layer_idx, n)
        for i, rows in plan.groups:
            kw = _kwargs_of(kwargs, rows, n)
            with self.state.select(branch=i), (views.rows(rows) if views else nullcontext()) as sub:
                if views is not None:
                    kw[key] = sub
                y = self.views[self.holder[i]](x[rows], **kw)
            if not isinstance(y, Tensor):
                raise NotImplementedError(f"{type(self._mixer).__name__} returns a {type(y).__name__}; a batch "
                                          "mixing branches needs a tensor")
            outs.append((rows, y))
        return _by_rows(n, outs)


def use_branch_mixer(mixer: nn.Module, state: BranchState, own: list[dict[str, Tensor]]) -> None:
    """Make ``mixer`` (holding branch 0's own parameters; ``own[i]``: branch i's, maybe none) run each branch's
    rows with that branch's own parameters, at its place in the model (paths of its sublayers unchanged)."""
    mixer.branch_mixer = BranchMixer(state, own, mixer)
    mixer.forward = mixer.branch_mixer.run


def _buffer(param: str) -> str:
    return f"own_{param}"


class CacheRows:
    """Row views of layer ``layer_idx`` of ``cache`` (its linear-attention states: conv, recurrent) for calls on
    groups of a batch's ``n`` rows in turn: each view starts from the layer as it was when this was made (the
    earlier groups' writes are in other rows), and what a call writes goes back to its rows."""

    def __init__(self, cache: Any, layer_idx: int, n: int) -> None:
        layers = getattr(cache, "layers", None)
        real = layers[layer_idx] if isinstance(layers, list) and 0 <= layer_idx < len(layers) else None
        if real is None or not all(isinstance(getattr(real, a, None), dict) for a in _STATES + _FLAGS) \
                or not isinstance(getattr(real, "cumulative_length_linear", None), Tensor):
            raise NotImplementedError(f"a batch mixing branches needs layer {layer_idx} of the cache to hold linear-"
                                      f"attention states; a {type(cache).__name__} gives {type(real).__name__}")
        if getattr(real, "record_past", False):
            raise NotImplementedError(f"layer {layer_idx} of the cache records past states (assisted decoding): a "
                                      "batch mixing branches cannot take its rows apart")
        self.cache, self.layer_idx, self.n, self.real = cache, layer_idx, n, real
        self.before = {a: dict(getattr(real, a)) for a in _STATES + _FLAGS}
        self.count = real.cumulative_length_linear.clone()
        self.device, self.dtype = real.device, real.dtype

    @contextmanager
    def rows(self, rows: Tensor) -> Iterator[Any]:
        """A shallow copy of the cache whose layer holds ``rows``' states; on leaving, written back."""
        real = self.real
        view = copy.copy(real)
        for a in _STATES:
            setattr(view, a, {k: t.index_select(0, rows.to(t.device)) if isinstance(t, Tensor) else t
                              for k, t in self.before[a].items()})
        for a in _FLAGS:
            setattr(view, a, dict(self.before[a]))
        view.cumulative_length_linear, view.device, view.dtype = self.count.clone(), self.device, self.dtype
        sub = copy.copy(self.cache)
        sub.layers = list(self.cache.layers)
        sub.layers[self.layer_idx] = view
        yield sub
        for a in _STATES:
            theirs = getattr(real, a)
            for k, t in getattr(view, a).items():
                if not isinstance(t, Tensor):
                    continue
                dst = theirs.get(k)
                if not isinstance(dst, Tensor) or dst.shape != (self.n, *t.shape[1:]) or dst.device != t.device \
                        or dst.dtype != t.dtype:
                    dst = theirs[k] = t.new_zeros((self.n, *t.shape[1:]))
                    if not torch.compiler.is_compiling():
                        torch._dynamo.mark_static_address(dst)
                dst[rows.to(dst.device)] = t
        for a in _FLAGS:
            getattr(real, a).update(getattr(view, a))
        real.device, real.dtype = view.device, view.dtype
        new, count = view.cumulative_length_linear, real.cumulative_length_linear
        if new.device == count.device:
            count.copy_(new)
        else:
            real.cumulative_length_linear = new
