"""Build one ``transformers`` model per bundle group with branched modules in place of its layers.

The model skeleton is created with its parameters on the meta device (no memory, no init) and its
computed buffers real, then each module is replaced or filled from the bundle: compressed weights become
:class:`BranchedLinear`, per-branch tensors become :class:`PerBranch` copies, shared tensors are
assigned once.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel

from branchmerge.architectures import Architecture, float32_tensors, registry
from branchmerge.errors import BundleError
from branchmerge.io.bundle import BundleReader, key_mean, key_own, key_scales, key_shared
from branchmerge.io.skeleton import hf_config_object, plain_linear, skeleton
from branchmerge.runtime.experts import ExpertLinears, RowsByBranch, fused_param, stored_experts
from branchmerge.runtime.mixers import row_mixer, use_branch_mixer
from branchmerge.runtime.modules import BranchedLinear, BranchState
from branchmerge.runtime.perbranch import PerBranch
from branchmerge.runtime.patched import RowPatched
from branchmerge.runtime.quantized import QuantizedBranchedLinear
from branchmerge.runtime.sinks import BranchSinks, use_branch_sinks

logger = logging.getLogger(__name__)


def _split(tensor: str) -> tuple[str, str]:
    module, _, param = tensor.rpartition(".")
    return module, param


def build_group_model(
    reader: BundleReader, group: str, *, device: torch.device, dtype: torch.dtype, fused: bool | None = None,
    factors: str = "dequantize", only: str | None = None, cache: dict[str, torch.Tensor] | None = None,
) -> tuple[PreTrainedModel, BranchState]:
    """A causal-LM whose branch is chosen through the returned :class:`BranchState`.

    ``factors``: quantized factors are dequantized once here (``dequantize``), or kept quantized in memory
    and dequantized per forward (``quantized``; not for transposed, GPT-2-style, layouts). ``only``: the model
    of that one branch of the group; models built with one ``cache`` hold the tensors they load alike (the
    mean weights, shared tensors) once.

    Raises:
        Unmixable: (without ``only``) a module holds per-branch parameters of its own beside sublayers, which
            one model cannot switch per row of a mixed batch: build each branch's model instead.
    """
    g = reader.groups[group]
    members: list[str] = [only] if only is not None else g.branches
    cache = {} if cache is None else cache
    transposed = g.transposed
    first_dir: Path = reader.branch_dir(members[0])
    records = reader.manifest.tensors[group]
    state = BranchState(members)
    raw, model, arch, by_module = _meta_model(reader, group, members[0], dtype, state)
    fp32 = float32_tensors(raw, dtype)  # (transformers keeps these in float32 at dtype: routers, their biases)

    def cast(t: torch.Tensor, tensor: str) -> torch.Tensor:
        return t.to(torch.float32 if fp32(tensor) else dtype) if t.is_floating_point() else t

    def cached(key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:  # (one tensor for every model)
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def load(key: str, tensor: str) -> torch.Tensor:
        return cached(key, lambda: cast(reader.get(key, device), tensor))

    def per_branch(tensor: str) -> list[torch.Tensor]:
        role = records[tensor].role
        if role == "shared":
            t = load(key_shared(group, tensor), tensor)
            return [t] * len(members)
        if role == "per_branch":
            rec, got = records[tensor], {}  # branches that share a stored copy share one tensor
            for h in (rec.holder(b) for b in members):
                if h in got:
                    continue
                patch = reader.patch(h, tensor, device)
                if patch is not None and patch[0] not in members:  # (a model of one branch: its whole tensor)
                    got[h] = cast(reader.own(h, tensor, device), tensor)
                elif patch is None:
                    got[h] = load(key_own(h, tensor), tensor)
                else:  # another branch's rows with these replaced or added (made a module below)
                    of, rows, values = patch
                    got[h] = _Patch(members.index(of), rows, cast(values, tensor), rec.shape_of(h)[0],
                                    lambda h=h: cast(reader.own(h, tensor, device), tensor))
            return [got[rec.holder(b)] for b in members]
        raise BundleError(f"tensor {tensor} of group {group!r} has unexpected role {role!r}")

    if len(members) > 1 and (odd := _own_parameters_beside_sublayers(model, by_module, records, arch is None)):
        raise Unmixable(odd)

    with_sinks, mixer_own = False, {}
    for module_name, params in by_module.items():
        try:
            orig = model.get_submodule(module_name)
        except AttributeError:
            raise BundleError(f"bundle group {group!r}: tensor {module_name}.{next(iter(params))} names no module "
                              f"of a {type(model).__name__}") from None
        weight_t = params.get("weight")
        if weight_t is not None and records[weight_t].role == "compressed":
            key = key_mean(group, weight_t)
            mean = cached(key, lambda: reader.get(key, device).to(dtype))
            every = reader.get(key_scales(group, weight_t)).tolist()
            scales = [every[g.branches.index(b)] for b in members]
            biases = per_branch(params["bias"]) if "bias" in params else None
            if factors == "quantized" and not transposed and records[weight_t].bits is not None:
                qfs = [reader.quantized(b, weight_t, device) for b in members]
                _set_module(model, module_name, QuantizedBranchedLinear(state, mean, scales, qfs, biases))
                continue
            diffs = []
            for b in members:
                d = reader.difference(b, weight_t)
                if d.dense is not None:
                    diffs.append(("dense", d.dense.to(device).T if transposed else d.dense.to(device)))
                elif d.u is not None:
                    u, v = d.u.to(device), d.v.to(device)
                    diffs.append(("lowrank", v.T, u.T) if transposed else ("lowrank", u, v))
                else:
                    diffs.append(None)
            if transposed:
                mean = cached(key + "|T", mean.T.contiguous)
            new = BranchedLinear(state, mean, scales, diffs, biases, fused=fused)
            _set_module(model, module_name, new)
            continue
        values = {p: per_branch(t) for p, t in params.items()}
        same = all(all(v is vals[0] for v in vals) for vals in values.values())
        if same or len(members) == 1:
            _assign(orig, {p: vals[0] for p, vals in values.items()}, module_name)
        elif _sinks_only(orig, params, records):  # (attention sinks: per row inside the attention function)
            sinks = [v.whole() if isinstance(v, _Patch) else v for v in values["sinks"]]
            _assign(orig, {"sinks": sinks[0]}, module_name)
            orig.branch_sinks = BranchSinks(state, sinks, orig)
            with_sinks = True
        elif row_mixer(orig):  # (wrapped once its sublayers are branched, below)
            mixer_own[module_name] = [{p: v.whole() if isinstance(v, _Patch) else v for p, v in zip(values, vals)}
                                      for vals in zip(*values.values())]
            _assign(orig, mixer_own[module_name][0], module_name)
        else:
            copies: list[nn.Module] = []
            made: dict[int, nn.Module] = {}  # (a patch shared by branches with one stored copy: one module)
            for i in range(len(members)):
                own = {p: vals[i] for p, vals in values.items()}
                patch = next((v for v in own.values() if isinstance(v, _Patch)), None)
                if patch is not None and id(patch) in made:
                    copies.append(made[id(patch)])
                    continue
                if patch is not None and set(own) == {"weight"} and RowPatched.can_patch(copies[patch.of]):
                    made[id(patch)] = RowPatched(copies[patch.of], patch.rows, patch.values, patch.size)
                    copies.append(made[id(patch)])
                    continue
                own = {p: v.whole() if isinstance(v, _Patch) else v for p, v in own.items()}
                c = copy.deepcopy(orig)
                _fit_vocabulary(c, own, module_name)
                _assign(c, own, module_name)
                copies.append(c)
            _set_module(model, module_name, PerBranch(state, copies))

    if arch is not None and arch.row_dispatch and len(members) > 1:
        for name, mod in [(n, m) for n, m in model.named_modules() if arch.matches(arch.row_dispatch, n)]:
            # a sparse block whose experts are per-branch copies (the fused layout): run per branch. Per-expert
            # modules (ExpertLinears) take the mixed rows themselves, token by token
            if isinstance(mod._modules.get("experts"), PerBranch):
                _set_module(model, name, RowsByBranch(state, mod))
    if len(members) > 1:  # (a mixed batch runs each per branch on its rows: runtime.mixers)
        for name in _differing_mixers(model, records, by_module):
            use_branch_mixer(model.get_submodule(name), state, mixer_own.get(name, [{}] * len(members)))
    if with_sinks:
        use_branch_sinks(model)
    _tie_lm_head(model, records, state, len(members))
    _check_vocabularies(model, reader, members)
    for mod in model.modules():  # computed buffers (rotary frequencies, embedding scales) were made on the CPU
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf is not None and buf.device != device:
                mod._buffers[name] = buf.to(device)
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)
    leftovers = [n for n, p in model.named_parameters() if p.is_meta]
    if leftovers:
        raise BundleError(f"bundle group {group!r} lacks tensors for: {', '.join(leftovers[:5])}")
    if (first_dir / "generation_config.json").is_file():
        try:
            gc = GenerationConfig.from_pretrained(first_dir, trust_remote_code=False)
        except (ValueError, OSError) as e:
            raise BundleError(f"branch {members[0]!r}: {first_dir / 'generation_config.json'} is invalid: {e}") from None
        # the group's model keeps only its padding and start tokens: each branch's own config (its end tokens,
        # penalties, bans…) is given per call, and a call's unset fields must not fall back to another branch's
        model.generation_config = GenerationConfig(**{k: v for k, v in gc.to_dict().items()
                                                      if k in ("pad_token_id", "bos_token_id")})
    model.eval()
    return model, state


def _per_expert_modules(model: PreTrainedModel, arch: Architecture, by_module: dict[str, dict[str, str]],
                        state: BranchState) -> None:
    """Replace transformers' fused experts modules (3-D ``gate_up_proj``/``down_proj``) by
    :class:`ExpertLinears` where the bundle stores one tensor per expert and projection (the checkpoint
    layout), so that each expert's weights are filled or branched like any linear layer's."""
    spec = arch.experts
    stored = {path.rsplit(".", 2)[0] for path in by_module if path.rsplit(".", 1)[-1] in spec.projections}
    first = fused_param(spec)
    for path, mod in [(n, m) for n, m in model.named_modules() if arch.matches(spec.module, n)]:
        if path in stored and isinstance(getattr(mod, first, None), torch.Tensor):
            if by_module.get(path):
                raise BundleError(f"the bundle stores {path}'s experts both fused ({', '.join(by_module[path])}) "
                                  "and one tensor per expert")
            n, held = getattr(mod, first).shape[0], stored_experts(list(by_module), path)
            if held != set(range(n)):  # (checked before making a module per expert the config claims)
                raise BundleError(f"{path}: its config has {n} experts, but the bundle stores tensors for "
                                  f"{len(held)} (indices {min(held)}–{max(held)})")
            _set_module(model, path, ExpertLinears.like(mod, (spec.gate, spec.up, spec.down), state, spec.layout))


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _check_layer_count(cfg: dict, tensors: Iterable[str], where: str) -> None:
    """Refuse a config with more layers than the bundle stores tensors for (fewer fail on the extra tensors).

    Checked before a skeleton is built: a crafted ``num_hidden_layers: 100000`` would otherwise spend
    minutes building empty layers before the missing tensors are noticed.

    Raises:
        BundleError: naming the config field, its value and the stored count.
    """
    stored = {int(m.group(1)) for t in tensors if (m := _LAYER_INDEX.search(t))}
    for key in ("num_hidden_layers", "n_layer"):
        value = cfg.get(key)
        if stored and isinstance(value, int) and value > len(stored):
            raise BundleError(f"{where}: its config's `{key}` is {value!r}, but the bundle stores tensors for "
                              f"{len(stored)} layers")


def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    """Give the output head a contiguous input.

    ``generate`` feeds the head ``hidden[:, -1:, :]``, a strided ``[B, 1, H]`` view. With weights that do
    not require grad (ours), ``F.linear`` sends that view to a batched matmul over a ``[B, H, V]``
    expanded weight. That is B times the head's work on every prefill. A transformers model's weights
    require grad, so it folds the view into one GEMM instead; copying ``B·H`` values gives us the same.
    """
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() > 2 and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    try:
        module.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:
        raise BundleError(f"tensors for module {where} do not fit the model: {e}") from None
    for p in module.parameters(recurse=False):
        p.requires_grad_(False)


def _meta_model(reader: BundleReader, group: str, first: str, dtype: torch.dtype | None, state: BranchState,
                ) -> tuple[dict, PreTrainedModel, Architecture | None, dict[str, dict[str, str]]]:
    """Branch ``first``'s config, its model on the meta device (experts per expert where the bundle stores
    them so), the group's architecture, and the group's tensors by the module they fill (``{module path:
    {parameter: tensor}}``)."""
    g, records = reader.groups[group], reader.manifest.tensors[group]
    raw = reader.hf_config(first)
    _check_layer_count(raw, records, f"branch {first!r}")
    model = skeleton(hf_config_object(raw, f"branch {first!r}"), dtype, where=f"branch {first!r}")
    arch = registry().get(g.architecture)
    by_module: dict[str, dict[str, str]] = defaultdict(dict)
    for tensor in records:  # (by the model's names: a template's renames applied, parameters' names too)
        module, param = _split(arch.param_path(tensor) if arch else tensor)
        by_module[module][param] = tensor
    if arch is not None and arch.experts:
        _per_expert_modules(model, arch, by_module, state)
    return raw, model, arch, by_module


def group_mixing(reader: BundleReader, group: str) -> tuple[list[str], list[str], list[str]]:
    """How ``group``'s branches share one batch: ``(modules that make each branch run as a model of its own (see
    :class:`Unmixable`), with their per-branch parameters; attention modules whose sinks switch per row
    (:mod:`~branchmerge.runtime.sinks`); sequence mixers a mixed batch runs once per branch on its rows
    (:mod:`~branchmerge.runtime.mixers`))``, all empty when one model runs them all as any other. Built on
    the meta device: no tensor is read."""
    g = reader.groups[group]
    if len(g.branches) < 2:
        return [], [], []
    _, model, arch, by_module = _meta_model(reader, group, g.branches[0], None, BranchState(g.branches))
    records = reader.manifest.tensors[group]
    odd = _own_parameters_beside_sublayers(model, by_module, records, arch is None)
    if odd:
        return odd, [], []
    sinks = [name for name, mod, params in _modules_of(model, by_module) if _sinks_only(mod, params, records)]
    return [], sinks, _differing_mixers(model, records, by_module)


class Unmixable(BundleError):
    """A group whose model cannot run its branches mixed in one batch (see :func:`build_group_model`)."""

    def __init__(self, modules: list[str]) -> None:
        super().__init__(f"{', '.join(modules[:3])}{' …' if len(modules) > 3 else ''} hold(s) per-branch "
                         "parameters of their own beside sublayers")
        self.modules = modules


def _own_parameters_beside_sublayers(model: nn.Module, by_module: dict[str, dict[str, str]], records: dict,
                                     fallback: bool) -> list[str]:
    """Modules that hold tensors differing between branches as their own parameters (not a sublayer's) and
    also have sublayers with parameters: Gemma 3n's AltUp. A per-branch copy of such a module would copy its
    sublayers too, and a mixed batch would need its own parameters per row (excepted: attention sinks,
    :func:`_sinks_only`; sequence mixers such as Mamba's (``A_log``, ``D``, ``dt_bias``), run per branch on
    their rows, :mod:`~branchmerge.runtime.mixers`). Under the ``fallback`` rule (no template says how a
    layout's MoE routers and fused experts take their rows), any per-branch module but embeddings, plain
    linear layers, norms and a sequence mixer's parts."""
    out = []
    for name, mod, params in _modules_of(model, by_module):
        if not any(records[t].role == "per_branch" for t in params.values()) or _sinks_only(mod, params, records):
            continue
        if row_mixer(mod):  # (its own parameters per row: runtime.mixers)
            continue
        in_mixer = any(row_mixer(m) for m in _ancestry(model, name))  # (run per branch with its mixer)
        if _own_beside_sublayers(mod) or (fallback and not in_mixer and not _row_wise(mod)):
            out.append(f"{name} ({', '.join(params)})")
    return out


def _own_beside_sublayers(mod: nn.Module) -> bool:
    """Whether ``mod`` has sublayers with parameters (beside any of its own)."""
    return any(True for c in mod.children() for _ in c.parameters())


def _ancestry(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """The module at ``name`` and those above it, innermost first."""
    while name:
        yield model.get_submodule(name)
        name = name.rpartition(".")[0]


def _differing_mixers(model: nn.Module, records: dict, by_module: dict[str, dict[str, str]]) -> list[str]:
    """The sequence mixers (:func:`~branchmerge.runtime.mixers.row_mixer`) whose own parameters, or a sublayer's
    tensors its forward may read directly (a conv's, Jamba's ``dt_proj``), differ between branches. A mixer
    whose branches differ only in compressed projections (with their biases; a LoRA fine-tune's) runs once
    for a mixed batch: its branched layers take the rows."""
    out = []
    for name, mod in model.named_modules():
        if row_mixer(mod) and any(_differs(records, params, p) for m, params in by_module.items()
                                  if m == name or m.startswith(name + ".") for p in params):
            out.append(name)
    return out


def _differs(records: dict, params: dict[str, str], param: str) -> bool:
    """Whether a module's ``param`` differs between branches other than as a branched layer takes it per row."""
    role = records[params[param]].role
    if role in ("shared", "compressed"):
        return False
    return not (param == "bias" and "weight" in params and records[params["weight"]].role == "compressed")


def _modules_of(model: nn.Module, by_module: dict[str, dict[str, str]]) -> Iterator[tuple[str, nn.Module, dict]]:
    """``(path, module, {parameter: tensor})`` for each module the group's tensors fill (those naming no module
    of ``model`` skipped: the build's module loop names them)."""
    for name, params in by_module.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        yield name, mod, params


def _sinks_only(mod: nn.Module, params: dict[str, str], records: dict) -> bool:
    """Whether the per-branch tensors a module holds itself are only attention sinks (one logit per head, 1-D,
    handed to the attention function: :mod:`~branchmerge.runtime.sinks` takes them per row)."""
    own = {p for p, t in params.items() if records[t].role == "per_branch"}
    return own == {"sinks"} and len(records[params["sinks"]].shape) == 1 and "attention" in type(mod).__name__.lower()


def _row_wise(mod: nn.Module) -> bool:
    """Whether a module maps each row of its input alone (so per-branch copies can take a mixed batch's rows):
    embeddings, plain linear layers, norms."""
    if isinstance(mod, nn.Embedding) or plain_linear(mod):
        return True
    return "norm" in type(mod).__name__.lower()


@dataclass
class _Patch:
    """A branch's per-branch tensor stored as branch ``of``'s (its index) with ``rows`` replaced or added."""

    of: int
    rows: torch.Tensor
    values: torch.Tensor
    size: int
    whole: Callable[[], torch.Tensor]  # the tensor itself, for a module that cannot hold a patch


def _fit_vocabulary(module: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Resize ``module``'s (meta) parameters to a branch's own vocabulary: embeddings ``[V_i, H]`` or a head
    ``[V_i, H]`` whose first dimension differs from the skeleton's (the manifest allows nothing else)."""
    for p, t in tensors.items():
        cur = module._parameters.get(p)
        if cur is None or cur.shape == t.shape:
            continue
        if cur.dim() != t.dim() or cur.shape[1:] != t.shape[1:]:
            raise BundleError(f"tensors for module {where} do not fit the model: {p} is {list(t.shape)}, "
                              f"the model's {list(cur.shape)}")
        module._parameters[p] = nn.Parameter(torch.empty(t.shape, dtype=cur.dtype, device="meta"), requires_grad=False)
        for attr in ("num_embeddings", "out_features"):  # nn.Embedding, nn.Linear
            if hasattr(module, attr):
                setattr(module, attr, t.shape[0])


def _check_vocabularies(model: PreTrainedModel, reader: BundleReader, members: list[str]) -> None:
    """Raise unless each branch's embeddings and head have its config's ``vocab_size`` rows: the token ids a
    branch accepts are checked against that number, so a smaller matrix would be indexed past its end."""
    for mod, what in ((model.get_input_embeddings(), "embeddings"), (model.get_output_embeddings(), "output head")):
        if mod is None:
            continue
        copies = mod.copies if isinstance(mod, PerBranch) else [mod] * len(members)
        for b, c in zip(members, copies):
            w = getattr(c, "weight", None)
            rows = c.size if isinstance(c, RowPatched) else w.shape[0] if isinstance(w, torch.Tensor) else None
            vocab = reader.hf_config(b).get("vocab_size")
            if rows is not None and isinstance(vocab, int) and rows != vocab:
                raise BundleError(f"branch {b!r}: its {what} have {rows} rows but its config's vocab_size "
                                  f"is {vocab}")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _tie_lm_head(model: PreTrainedModel, records: dict, state: BranchState, n: int) -> None:
    """For tied embeddings (no ``lm_head.weight`` stored), share each branch's embedding matrix."""
    if "lm_head.weight" in records:
        return
    out = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if out is None or emb is None or not out.weight.is_meta:
        return
    if isinstance(emb, PerBranch):
        copies: list[nn.Module] = []
        heads: dict[int, nn.Module] = {}  # embedding copy → its head (one module for a shared copy)
        for c in emb._copies:
            if id(c) not in heads:
                if isinstance(c, RowPatched):
                    heads[id(c)] = RowPatched(heads[id(c.of)], c.rows, c.values, c.size)
                else:
                    lm = copy.deepcopy(out)
                    lm.weight = c.weight
                    if hasattr(lm, "out_features"):  # a branch's own vocabulary
                        lm.out_features = c.weight.shape[0]
                    heads[id(c)] = lm
            copies.append(heads[id(c)])
        for name, mod in model.named_modules():
            if mod is out:
                _set_module(model, name, PerBranch(state, copies))
                break
    else:
        out.weight = emb.weight
