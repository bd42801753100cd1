"""Which input tensors make each output tensor of a baseline merge: the whole models, name for name, or
mergekit's ``slices`` (layer ranges of the models, merged slice by slice and stacked into a deeper or
shallower model). Planning only: the tensors are read and merged by :mod:`branchmerge.merge.collapse`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from branchmerge.architectures import for_hf_config
from branchmerge.config import MergeConfig
from branchmerge.errors import ConfigError, ModelInputError
from branchmerge.io.models import ModelSource
from branchmerge.methods import MergeMethod

_PRE = ("embed", "wte", "wpe")  # outside the blocks and before them; the rest (final norm, head) comes after


@dataclass
class Job:
    """One output tensor: ``inputs`` the fine-tunes' ``(model index, tensor name)``, ``base`` the base
    model's, ``t`` its place for gradients, ``own`` each input's per-model parameters, ``shared`` the
    method's parameters there (the merge's, under its slice's), ``group`` what parameters resolve per."""

    out: str
    inputs: list[tuple[int, str]]
    base: tuple[int, str] | None
    t: float
    own: list[dict[str, Any]]
    shared: dict[str, Any]
    group: int = 0
    models: list[str] = field(default_factory=list)  # the inputs' model names, for errors


def check_count(method: MergeMethod, n: int, where: str = "") -> None:
    """Raise a ConfigError when ``n`` fine-tunes do not fit the method."""
    if method.pairwise and n != 1:
        raise ConfigError(f"{where}method {method.name!r} interpolates `base_model` and one other model; the "
                          f"branches list {n} models besides the base")
    if n < method.min_models or n > (method.max_models or n):
        count = (f"exactly {method.min_models}" if method.min_models == method.max_models else
                 f"at least {method.min_models}" if method.max_models is None else
                 f"{method.min_models} to {method.max_models}")
        raise ConfigError(f"{where}method {method.name!r} needs {count} models besides the base, got {n}")


def whole_models(config: MergeConfig, method: MergeMethod, models: list[ModelSource], tuned: list[int],
                 base: int | None) -> list[Job]:
    """Every tensor of the fine-tunes ``models[i]`` (``i`` in ``tuned``), name for name, with the base's.

    Raises:
        ModelInputError: a tensor not in every model.
    """
    check_count(method, len(tuned))
    first = models[tuned[0]]
    names = first.names()
    for i in [*tuned[1:], *([base] if base is not None else [])]:
        missing = set(names) ^ set(models[i].names())
        if missing:
            raise ModelInputError(f"tensor {sorted(missing)[0]} is not in every model ({models[i].name!r} differs)")
    layers = layer_count(first.hf_config)
    own = [config.branches[i].parameters for i in tuned]
    return [Job(n, [(i, n) for i in tuned], None if base is None else (base, n), position(n, layers), own,
                config.parameters, models=[models[i].name for i in tuned]) for n in names]


def sliced(config: MergeConfig, method: MergeMethod, models: list[ModelSource], base_path: Any,
           takes_base: bool) -> tuple[list[Job], dict[str, Any]]:
    """The output tensors of ``config.slices`` (models indexed as ``config.branches``) and the output's
    ``config.json``: layers renumbered from 0 across the slices; embeddings from the first slice's sources,
    the final norm and head from the last's; a layer's ``t`` is its place in its slice (mergekit's).

    Raises:
        ConfigError: a layer range past a model's layers, a slice without the base a method needs.
        ModelInputError: a tensor one source lacks.
    """
    index = {b.name: i for i, b in enumerate(config.branches)}
    arch = for_hf_config(models[0].hf_config, source=models[0].name)
    layer_names: dict[int, dict[int, list[str]]] = {}  # model → layer → templates
    outside: dict[int, list[str]] = {}
    name_sets: dict[int, set[str]] = {}

    def of(i: int) -> dict[int, list[str]]:
        if i not in layer_names:
            layer_names[i], outside[i] = {}, []
            names = models[i].names()
            name_sets[i] = set(names)
            for n in names:
                hit = arch.layer_of(n)
                if hit is None:
                    outside[i].append(n)
                else:
                    layer_names[i].setdefault(hit[0], []).append(hit[1])
        return layer_names[i]

    jobs: list[Job] = []
    plan = []  # per slice: (tuned [(model, start, params)], base (model, start) | None, length)
    for k, sl in enumerate(config.slices or []):
        tuned, base = [], None
        for j, src in enumerate(sl.sources):
            i = index[src.branch]
            count = len(of(i))
            if src.layer_range[1] > count:
                raise ConfigError(f"slices[{k}].sources[{j}]: layer_range {list(src.layer_range)} is past the "
                                  f"{count} layers of {src.branch!r}")
            if takes_base and base is None and models[i].path.resolve() == base_path:
                base = (i, src.layer_range[0])
            else:
                tuned.append((i, src.layer_range[0], {**config.branches[i].parameters, **src.parameters}))
        if takes_base and base is None:
            raise ConfigError(f"slices[{k}]: method {method.name!r} needs `base_model` among the slice's sources "
                              f"(with the layer_range to use)")
        check_count(method, len(tuned), f"slices[{k}]: ")
        length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        plan.append((tuned, base, length, {**config.parameters, **sl.parameters}))

    def edge(k: int, pre: bool) -> None:
        tuned, base, _, shared = plan[k]
        first = tuned[0][0]
        for n in outside[first]:
            if any(h in n.lower() for h in _PRE) == pre:
                jobs.append(_job(n, [(i, n) for i, _, _ in tuned], None if base is None else (base[0], n), 0.0,
                                 [p for _, _, p in tuned], shared, k, models, name_sets))

    edge(0, pre=True)
    out_layer = 0
    for k, (tuned, base, length, shared) in enumerate(plan):
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            first, start = tuned[0][0], tuned[0][1]
            for tpl in layer_names[first][start + offset]:
                at = tpl.replace("${layer_index}", "{}")
                jobs.append(_job(at.format(out_layer), [(i, at.format(s + offset)) for i, s, _ in tuned],
                                 None if base is None else (base[0], at.format(base[1] + offset)), t,
                                 [p for _, _, p in tuned], shared, k, models, name_sets))
            out_layer += 1
    edge(len(plan) - 1, pre=False)
    return jobs, _hf_config(config, models, index, out_layer)


def _job(out: str, inputs: list[tuple[int, str]], base: tuple[int, str] | None, t: float, own: list[dict],
         shared: dict, group: int, models: list[ModelSource], name_sets: dict[int, set[str]]) -> Job:
    for i, n in [*inputs, *([base] if base else [])]:
        if n not in name_sets[i]:
            raise ModelInputError(f"slices[{group}]: tensor {n} is not in {models[i].name!r} (for {out})")
    return Job(out, inputs, base, t, own, shared, group, [models[i].name for i, _ in inputs])


def _hf_config(config: MergeConfig, models: list[ModelSource], index: dict[str, int], layers: int) -> dict:
    """The first source's ``config.json`` with the output's layer count (and ``layer_types``, a per-layer
    list, taken from each slice's first source)."""
    cfg = dict(models[index[config.slices[0].sources[0].branch]].hf_config)
    for key in ("num_hidden_layers", "n_layer"):
        if isinstance(cfg.get(key), int):
            cfg[key] = layers
    if isinstance(cfg.get("layer_types"), list):
        out = []
        for sl in config.slices:
            src = sl.sources[0]
            types = models[index[src.branch]].hf_config.get("layer_types") or []
            out += types[src.layer_range[0]:src.layer_range[1]]
        cfg["layer_types"] = out
    return cfg


_LAYER = re.compile(r"\.(\d+)\.")


def layer_count(cfg: dict) -> int:
    n = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    return n if isinstance(n, int) and n > 0 else 1


def position(tensor: str, layers: int) -> float:
    """Where ``tensor`` sits for a gradient, as mergekit places it: layer ``i`` of ``L`` at ``i / (L - 1)``
    (1 for a one-layer model); tensors outside the layers (embeddings, final norm, head) at 0."""
    m = _LAYER.search(tensor)
    if m is None:
        return 0.0
    return int(m.group(1)) / (layers - 1) if layers > 1 else 1.0
