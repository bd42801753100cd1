"""PEFT LoRA adapters loaded into a running bundle, as vLLM's ``/v1/load_lora_adapter`` loads them onto its base.

An adapter joins the group of the branch it was trained on (its base) as one more branch, exactly: where the
base branch computes ``s_b·(x W̄ᵀ + (x V_bᵀ) U_bᵀ)``, the new branch has the same ``s_b`` and the factors
``[U_b | scaling·B / s_b]``, ``[V_b ; A]``, so its weight is the base branch's plus ``scaling·B·A``. In a group
the merge made of adapters of one base (``lora_base``), the base's own factors are zeros and ``s_b`` is 1:
the adapter's factors alone, as the merge keeps adapters (:mod:`branchmerge.merge.lora`). Over a compressed
fine-tune, the adapter applies to the fine-tune as the bundle stores it. Every branched layer gets a slot for
the new branch (zeros where the adapter leaves the layer alone, so the fused and mixed-batch layouts stay
uniform; ranks zero-padded to the largest); a shared layer the adapter changes becomes a branched layer;
per-branch modules (norms, embeddings) get the base's copy, sharing its tensors. Unloading zeroes the
branch's slot, and the next adapter loaded into that group reuses it in place when its rank fits.

What an adapter may change here: linear layers' weights by LoRA factors (rsLoRA, ``rank_pattern`` and
``alpha_pattern`` included) and their biases (``lora_bias``). Whole stored tensors (``modules_to_save``),
DoRA, LoRA on embeddings or the output head, GPT-2's transposed layers and layers stored as dense
differences or quantized factors are refused by name: merge such adapters into a bundle instead
(``serve BASE --lora-modules``, ``merge``), which keeps every one of them.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from branchmerge.common import check_name
from branchmerge.errors import BranchNotFoundError, BundleError, ModelInputError
from branchmerge.io.adapters import LoraSource
from branchmerge.io.bundle import BundleReader, key_mean, key_scales, key_shared
from branchmerge.io.models import ModelSource
from branchmerge.runtime.modules import BranchedLinear
from branchmerge.runtime.mixers import BranchMixer
from branchmerge.runtime.perbranch import PerBranch
from branchmerge.runtime.sinks import BranchSinks
from branchmerge.runtime.patched import RowPatched
from branchmerge.runtime.quantized import QuantizedBranchedLinear

logger = logging.getLogger(__name__)

FREE = "<free slot {}>"  # the branch-state name of an unloaded adapter's slot (never a valid branch name)


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter loaded into a running bundle."""

    name: str
    base: str  # the branch it is an adapter of
    group: str
    slot: int  # its branch id in the group's model
    rank: int  # its largest LoRA rank
    path: str


@dataclass
class Prepared:
    """An adapter read and checked, not yet in the model: its factors ``U [out, r]``, ``V [r, in]`` (float32)
    per weight, and its changed biases ``[out]``."""

    name: str
    base: str
    group: str
    path: Path
    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    biases: dict[str, Tensor] = field(default_factory=dict)
    rows: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # trainable tokens: rows [k], values [k, n]

    @property
    def rank(self) -> int:
        return max((u.shape[1] for u, _ in self.factors.values()), default=0)


@dataclass
class _BundleBase(ModelSource):
    """A bundle's base branch as the base an adapter is read over: names and shapes from the manifest,
    values from the bundle's shards."""

    reader: BundleReader | None = None
    group: str = ""

    def shape(self, tensor: str) -> tuple[int, ...]:
        return tuple(self._record(tensor).shape_of(self.name))

    def _record(self, tensor: str):
        rec = self.reader.manifest.tensors[self.group].get(tensor)
        if rec is None:
            raise ModelInputError(f"branch {self.name!r}: the bundle has no tensor {tensor}")
        return rec

    def get(self, tensor: str, *, check_finite: bool = True) -> Tensor:
        rec, r, b = self._record(tensor), self.reader, self.name
        if rec.role == "shared":
            return r.get(key_shared(self.group, tensor))
        if rec.role == "per_branch":
            return r.own(b, tensor)
        i = r.groups[self.group].branches.index(b)  # compressed: s_b·(W̄ + U_b V_b)
        d = r.difference(b, tensor)
        w = r.get(key_mean(self.group, tensor)).float()
        if d.dense is not None:
            w = w + d.dense.float()
        elif d.u is not None:
            w = w + d.u.float() @ d.v.float()
        return w * float(r.get(key_scales(self.group, tensor))[i])

    def nbytes(self) -> int:
        return 0


def base_branches(reader: BundleReader) -> list[str]:
    """The branches adapters are loaded over by default: each exact-LoRA group's base (the branch that is its
    ``lora_base``), and the branch of a one-branch group (a base model alone)."""
    out = []
    for g in reader.manifest.groups.values():
        if g.transposed:
            continue
        if g.lora_base is not None:
            out += [b for b in g.branches if reader.manifest.branches[b].source == g.lora_base]
        elif len(g.branches) == 1:
            out.append(g.branches[0])
    return out


def adapter_bases(reader: BundleReader) -> list[str]:
    """Every branch an adapter may be loaded over (named): each branch stored in the bundle whose layers are
    not transposed (GPT-2's)."""
    return [b for g in reader.manifest.groups.values() if not g.transposed for b in g.branches]


def prepare(bundle, name: str, folder: Path, *, base: str | None = None, max_rank: int | None = None) -> Prepared:
    """Read and check the adapter in ``folder`` for ``bundle`` as branch ``name`` over the branch ``base`` (by
    default the bundle's one base branch); nothing in the model changes yet.

    Raises:
        ModelInputError: the adapter is unreadable, does not fit the base, changes what a runtime adapter may
            not, or has a rank over ``max_rank``. BundleError: the name is taken, or ``base`` cannot take adapters.
    """
    reader: BundleReader = bundle.reader
    try:
        check_name(name, "adapter name")
    except ValueError as e:
        raise BundleError(str(e)) from None
    if name == "auto" or name in reader.branches:
        raise BundleError(f"the name {name!r} is taken (a branch of the bundle, or 'auto')")
    if base is None:
        bases = base_branches(reader)
        if len(bases) != 1:
            raise BundleError(f"name the branch the adapter was trained on (its base); the bundle's branches: "
                              f"{', '.join(adapter_bases(reader)) or 'none'}")
        base = bases[0]
    if base not in adapter_bases(reader):
        reader.branch(base)  # (an unknown name says so)
        raise BundleError(f"branch {base!r} cannot take adapters: it was loaded at runtime, or its layers are "
                          f"transposed (GPT-2's); branches that can: {', '.join(adapter_bases(reader)) or 'none'}")
    group = reader.branch(base).group
    src = LoraSource.over(name, folder, LoraSource.read_config(name, folder), _BundleBase(
        name=base, path=reader.path, hf_config=reader.hf_config(base),
        weight_map={t: reader.path for t in reader.manifest.tensors[group]}, reader=reader, group=group))
    where = f"adapter {name!r} ({folder})"
    if src.resized:
        raise ModelInputError(f"{where} resizes the vocabulary ({reader.hf_config(base).get('vocab_size')} → "
                              f"{src.hf_config.get('vocab_size')} tokens), which a loaded adapter cannot; merge it "
                              "into a bundle instead (it joins its base's group there)")
    model = bundle.runtime_group(base).model
    head = model.get_output_embeddings()
    odd = next((n for n, m in model.named_modules() if isinstance(m, QuantizedBranchedLinear)
                or (isinstance(m, BranchedLinear) and not m.uniform)), None)
    if odd is not None:  # (a new branch adds a slot to every layer: all must have the uniform factor layout)
        raise BundleError(f"group {group!r} cannot take adapters: layer {odd} holds quantized factors or dense "
                          "differences (load the bundle with factors='dequantize', or merge the adapter instead)")
    prep = Prepared(name, base, group, folder)
    from branchmerge.architectures import registry

    arch = registry().get(reader.groups[group].architecture)

    def path(tensor: str) -> str:  # a checkpoint tensor name as the model's parameter path
        return arch.param_path(tensor) if arch is not None else tensor

    ranks: dict[str, int] = {}
    for tensor, m in src.changes.items():
        if m.bias_of is not None:
            continue
        if m.magnitude is not None or m.embedding:
            raise ModelInputError(f"{where} changes {tensor} by {'DoRA' if m.magnitude else 'an embedding LoRA'}, "
                                  "which a loaded adapter cannot; merge it into a bundle instead")
        mod = _module(model, path(tensor))
        if isinstance(mod, QuantizedBranchedLinear) or not isinstance(mod, (BranchedLinear, nn.Linear)) \
                or mod is head or (isinstance(mod, BranchedLinear) and not mod.uniform):
            raise ModelInputError(f"{where} changes {tensor}, a {type(mod).__name__} this bundle does not keep as "
                                  "a linear layer adapters can join (the output head, or quantized factors)")
        rank = src.change_rank(tensor)
        if max_rank is not None and rank > max_rank:
            raise ModelInputError(f"{where} has rank {rank} at {tensor}, above this server's limit of {max_rank} "
                                  "(--max-lora-rank)")
        ranks[tensor] = rank
    tied = _tied_head(model, reader, group)
    for tensor in src.tokens:
        mod = _module(model, path(tensor))
        own = mod._copies[mod.state.index(base)] if isinstance(mod, PerBranch) else mod
        of = own.of if isinstance(own, RowPatched) else own
        if not RowPatched.can_patch(of):
            raise ModelInputError(f"{where} trains token rows of {tensor}, a {type(of).__name__} this bundle does not "
                                  "keep as an embedding or a head without bias; merge it into a bundle instead")
    if src.replaced:
        raise ModelInputError(f"{where} stores whole tensors ({', '.join(sorted(src.replaced)[:3])}: "
                              "modules_to_save), which a loaded adapter cannot add; merge it into a bundle instead")
    for tensor, rank in ranks.items():  # (read only once every check passed; keyed by the model's paths)
        prep.factors[path(tensor)] = src.factors(tensor, rank)
    for tensor, m in src.changes.items():
        if m.bias_of is not None:
            prep.biases[path(tensor)] = src.get(tensor)
    for tensor, (key, rows) in src.tokens.items():  # PEFT's trainable tokens: new values of some rows
        prep.rows[path(tensor)] = (torch.tensor(rows, dtype=torch.long), src._read(key).float())
        if tied is not None and path(tensor) == tied[0] and tied[1] not in src.tokens:  # the tied head reads them
            prep.rows[tied[1]] = prep.rows[path(tensor)]
    return prep


def _tied_head(model: nn.Module, reader: BundleReader, group: str) -> tuple[str, str] | None:
    """``(embedding tensor, head tensor)`` when the group's head is its embedding matrix (tied, no head stored)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if emb is None or head is None or id(head) not in names:
        return None
    out = f"{names[id(head)]}.weight"
    return (f"{names[id(emb)]}.weight", out) if out not in reader.manifest.tensors[group] else None


def _with_rows(own: nn.Module, rows: Tensor, values: Tensor) -> RowPatched:
    """A copy of ``own`` (a branch's embedding or head, itself maybe a patch of another's) with ``rows``
    replaced by ``values``."""
    if isinstance(own, RowPatched):  # the base's own rows, then the adapter's over them
        by_row = dict(zip(own.rows.tolist(), own.values))
        by_row.update(zip(rows.tolist(), values.to(own.values)))
        of, size = own.of, own.size
    else:
        of, size = own, own.weight.shape[0]
        by_row = dict(zip(rows.tolist(), values.to(own.weight)))
    keys = sorted(by_row)
    return RowPatched(of, torch.tensor(keys, dtype=torch.long), torch.stack([by_row[k] for k in keys]), size)


def _module(model: nn.Module, tensor: str) -> nn.Module | None:
    try:
        return model.get_submodule(tensor.rpartition(".")[0])
    except AttributeError:
        return None


def apply(bundle, prep: Prepared) -> LoadedAdapter:
    """Add ``prep`` to its group's model (call with ``bundle.weights_lock`` held: no forward of that model
    may run meanwhile). Returns where it went."""
    from branchmerge.architectures import registry
    from branchmerge.runtime.siblings import group_siblings

    reader: BundleReader = bundle.reader
    if prep.name in reader.branches:
        raise BundleError(f"the name {prep.name!r} is taken")
    g = bundle.runtime_group(prep.base)
    model, state = g.model, g.state
    n, base = len(state.names), state.index(prep.base)
    slot = next((i for i, s in enumerate(state.names) if s == FREE.format(i)), n)
    layers = [(mn, m) for mn, m in model.named_modules() if isinstance(m, BranchedLinear)]
    rows = {mn: _slot_rows(m, base, prep.factors.get(f"{mn}.weight")) for mn, m in layers}
    fused = any(m.fused for _, m in layers) if layers else (bundle.device.type == "cuda" and bundle.kernels != "triton")
    triton = bundle.kernels == "triton"
    in_place = slot < n and all(m.rank >= rows[mn][0].shape[0] for mn, m in layers)  # (views are k rows)
    converted = False
    with torch.no_grad():
        if not in_place:
            for _, m in layers:  # every layer is rebuilt: the siblings are grouped again afterwards
                if m.sibling is not None:
                    m.sibling.dissolve()
        for mn, m in list(model.named_modules()):
            w, b = f"{mn}.weight", f"{mn}.bias"
            if isinstance(m, BranchedLinear):
                scale = m.scales[base]
                if in_place:
                    _write_slot(m, slot, *rows[mn], scale, prep.biases.get(b), base)
                else:
                    _replace(model, mn, _rebuild(m, slot, n, rows[mn], scale, prep.biases.get(b), base))
            elif type(m) is nn.Linear and w in prep.factors:
                new = _branched(m, state, slot, max(n, slot + 1), prep.factors[w], prep.biases.get(b), fused)
                new.use_triton = triton
                _replace(model, mn, new)
                converted = True
            elif isinstance(m, PerBranch):  # the base's norms, embeddings…, in a new slot or a reused one
                copies = list(m._copies)
                own = _with_rows(copies[base], *prep.rows[w]) if w in prep.rows else _shallow(copies[base])
                copies[slot:slot + 1] = [own]
                _replace(model, mn, PerBranch(state, copies))
            elif isinstance(m, (BranchMixer, BranchSinks)):  # (the base's own mixer parameters or sinks)
                m.holder[slot:slot + 1] = [m.holder[base]]
            elif w in prep.rows:  # an embedding or head every branch shares: per branch now, the slot's patched
                copies = [m] * max(n, slot + 1)
                copies[slot] = _with_rows(m, *prep.rows[w])
                _replace(model, mn, PerBranch(state, copies))
        if slot == n:
            state.names.append(prep.name)
        else:
            state.names[slot] = prep.name
        reader.add_runtime_branch(prep.name, prep.base)
        arch = registry().get(reader.groups[prep.group].architecture)
        if triton and (converted or not in_place) and arch is not None and arch.siblings:
            group_siblings(model, arch.siblings)
    logger.info("adapter %r loaded over %r (group %r, slot %d, rank %d, %d layers)", prep.name, prep.base,
                prep.group, slot, prep.rank, len(prep.factors))
    return LoadedAdapter(prep.name, prep.base, prep.group, slot, prep.rank, str(prep.path))


def remove(bundle, name: str) -> None:
    """Take the runtime adapter ``name`` out (call with ``bundle.weights_lock`` held): its slot is zeroed in
    place, to be reused by the next adapter loaded into its group.

    Raises:
        BranchNotFoundError: ``name`` is no adapter loaded at runtime.
    """
    reader: BundleReader = bundle.reader
    base = reader.runtime_branches().get(name)
    if base is None:
        raise BranchNotFoundError(f"no adapter {name!r} was loaded at runtime; loaded: "
                                  f"{', '.join(reader.runtime_branches()) or 'none'}")
    g = bundle.runtime_group(name)
    i, b = g.state.index(name), g.state.index(base)
    with torch.no_grad():
        for m in g.model.modules():
            if isinstance(m, BranchedLinear):
                if str(i) in m.hot:
                    m.dematerialize(i)
                _write_slot(m, i, None, None, 1.0, None, b)
    g.state.names[i] = FREE.format(i)
    reader.remove_runtime_branch(name)
    logger.info("adapter %r unloaded (slot %d of group %r is free)", name, i, g.name)


def _slot_rows(m: BranchedLinear, base: int, factors: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """The new branch's rows of ``m``: ``s·Uᵀ`` ``[k, out]`` and ``V`` ``[k, in]`` — the base branch's own (none
    when they are zeros, as an exact-LoRA base's are) followed by the adapter's ``scaling·Bᵀ`` and ``A``. With
    the base's scale they make the base branch's weight plus ``scaling·B·A``."""
    ut, v = [], []
    if m._ut[base].numel() and bool(m._ut[base].any()):
        ut.append(m._ut[base].float())
        v.append(m._v[base].float())
    if factors is not None:
        ut.append(factors[0].T.float())
        v.append(factors[1].float())
    if not ut:
        return m.weight_mean.new_zeros(0, m.out_features, dtype=torch.float32), \
            m.weight_mean.new_zeros(0, m.in_features, dtype=torch.float32)
    return torch.cat(ut), torch.cat(v)


def _pad(u: Tensor, v: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``U [out, r]``, ``V [r, in]`` zero-padded to rank ``k``."""
    r = u.shape[1]
    if r == k:
        return u, v
    pu, pv = u.new_zeros(u.shape[0], k), v.new_zeros(k, v.shape[1])
    pu[:, :r], pv[:r] = u, v
    return pu, pv


def _write_slot(m: BranchedLinear, i: int, ut_rows: Tensor | None, v_rows: Tensor | None, scale: float,
                bias: Tensor | None, base: int) -> None:
    """Branch ``i`` of ``m`` (a uniform layer whose rank fits the rows) becomes ``ut_rows`` ``[k, out]``,
    ``v_rows`` ``[k, in]`` (None: zeros), ``scale`` and ``bias`` (None: the base's), written into the stored
    tensors (sibling buffers included)."""
    kp = m.stride
    ut, v = m.ut_cat[i * kp:(i + 1) * kp], m.v_cat[i * kp:(i + 1) * kp]  # the padded rows: [kp, out], [kp, in]
    ut.zero_()
    v.zero_()
    if ut_rows is not None and ut_rows.shape[0]:
        r = ut_rows.shape[0]
        ut[:r] = ut_rows.to(ut.dtype)
        v[:r] = v_rows.to(v.dtype)
    m.scales[i] = float(scale)
    m.scale_t[i] = float(scale)
    if m.has_bias:
        m.bias_cat[i] = m.bias_cat[base] if bias is None else bias.to(m.bias_cat.dtype)
    m._index_factors()


def _rebuild(m: BranchedLinear, slot: int, n: int, rows: tuple[Tensor, Tensor], scale: float, bias: Tensor | None,
             base: int) -> BranchedLinear:
    """``m`` with branch ``slot`` (``n``: a new one) set to ``rows`` (``s·Uᵀ``, ``V``), ``scale`` and ``bias``; the
    other branches' factors, scales, biases and hot weights kept; every rank padded to the largest."""
    count = max(n, slot + 1)
    k = max(m.rank, rows[0].shape[0])
    diffs, scales = [], []
    for i in range(count):
        ut, v = rows if i == slot else (m._ut[i], m._v[i])
        diffs.append(("lowrank", *_pad(ut.T, v, k)))
        scales.append(scale if i == slot else m.scales[i])
    biases = None
    if m.has_bias or bias is not None:
        own = m._bias(base) if bias is None else bias
        biases = [own if i == slot else m._bias(i) for i in range(count)]
    # the rows are s·Uᵀ already: built with scales 1 (stored as given), then the real scales set
    new = BranchedLinear(m.state, m.weight_mean.detach(), [1.0] * count, diffs, biases, fused=m.fused)
    new.scales = scales
    new.scale_t.copy_(torch.tensor(scales, dtype=new.scale_t.dtype))
    new.use_triton = m.use_triton
    for key, w in m.hot.items():
        if int(key) != slot:
            new.hot[key] = w
    new._index_factors()
    return new


def _branched(lin: nn.Linear, state, slot: int, count: int, factors: tuple[Tensor, Tensor], bias: Tensor | None,
              fused: bool) -> BranchedLinear:
    """A base ``nn.Linear`` as a branched layer: zeros for every branch but ``slot``."""
    u, v = factors
    zero = ("lowrank", u.new_zeros(u.shape), v.new_zeros(v.shape))
    diffs = [("lowrank", u, v) if i == slot else zero for i in range(count)]
    biases = None
    if lin.bias is not None:
        biases = [bias if i == slot and bias is not None else lin.bias.detach() for i in range(count)]
    return BranchedLinear(state, lin.weight.detach(), [1.0] * count, diffs, biases, fused=fused)


def _shallow(m: nn.Module) -> nn.Module:
    """A copy of ``m`` that shares its tensors (a new branch's copy of the base's norm or embedding)."""
    c = copy.copy(m)
    c._parameters, c._buffers, c._modules = dict(m._parameters), dict(m._buffers), dict(m._modules)
    return c


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
