"""mergekit's YAML read as branchmerge's merge config: ``merge_method``, ``models`` (or ``slices``),
``base_model``, per-model ``parameters``, ``tokenizer_source`` or ``tokenizer``, ``chat_template``, ``dtype``. The result is
validated as any config by :func:`branchmerge.config.parse_config`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from branchmerge.errors import ConfigError
from branchmerge.methods import METHODS


_MERGEKIT_REFUSED = {
    "modules": "per-module definitions",
}
_MERGEKIT_IGNORED = {"int8_mask"}  # mergekit's memory option; masks here are boolean
_MERGEKIT_KEYS = {"merge_method", "models", "slices", "tokenizer_source", "tokenizer", "chat_template", "base_model",
                  "parameters", "dtype", "out_dtype", "name"}


def from_mergekit(data: dict[str, Any], source: str) -> dict[str, Any]:
    """A mergekit config (``merge_method``, ``models: [{model, parameters}]``, ``base_model``, ``parameters``,
    ``dtype``/``out_dtype``) as branchmerge's. Each model becomes a branch named after its folder; its
    ``weight`` becomes the branch's (a weight gradient or filter rules, its ``parameters.weight``); another
    per-model parameter (``density``…) becomes the method's when every model gives the same value, else the
    branch's own. ``int8_mask`` (a memory option of mergekit's) is dropped: masks here are boolean. What has
    no counterpart here (``modules``) is refused by name.

    Raises:
        ConfigError: naming the key or model at fault.
    """
    where = f"{source} (a mergekit config)"
    for key in data:
        if key in _MERGEKIT_REFUSED:
            raise ConfigError(f"{where}: `{key}` ({_MERGEKIT_REFUSED[key]}) is not supported")
        if key not in _MERGEKIT_KEYS and key not in _OWN_KEYS:
            raise ConfigError(f"{where}: unknown key `{key}`; a mergekit config here has "
                              f"{', '.join(sorted(_MERGEKIT_KEYS))} (and branchmerge's {', '.join(sorted(_OWN_KEYS))})")
    if not isinstance(data.get("merge_method"), str):
        raise ConfigError(f"{where}: `merge_method` is missing (one of {', '.join(METHODS)})")
    if "slices" in data:
        if "models" in data:
            raise ConfigError(f"{where}: give `models` or `slices`, not both")
        return _mergekit_slices(data, where)
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{where}: `models` must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    params = {k: v for k, v in dict(data.get("parameters") or {}).items() if k not in _MERGEKIT_IGNORED}
    branches: list[dict[str, Any]] = []
    per_model: dict[str, dict[str, Any]] = {}
    tuned = 0
    for i, m in enumerate(models):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or not isinstance(m.get("model"), str) or set(m) - {"model", "parameters"}:
            raise ConfigError(f"{where}: models[{i}] must be {{model: PATH, parameters: {{...}}}}, got {m!r}")
        own = m.get("parameters") or {}
        if not isinstance(own, dict):
            raise ConfigError(f"{where}: models[{i}].parameters must be a mapping, got {own!r}")
        name = _branch_name(m["model"], {b["name"] for b in branches})
        weight = own.get("weight", 1.0)
        branch: dict[str, Any] = {"name": name, "model": m["model"]}
        if isinstance(weight, (int, float)) and not isinstance(weight, bool):
            branch["weight"] = float(weight)
        else:  # a gradient or filter rules: resolved per tensor
            branch["parameters"] = {"weight": weight}
        branches.append(branch)
        if m["model"] == data.get("base_model"):
            continue  # (the base listed among the models: its own parameters are not a fine-tune's)
        tuned += 1
        for k, v in own.items():
            if k != "weight" and k not in _MERGEKIT_IGNORED:
                per_model.setdefault(k, {})[name] = v
    for k, values in per_model.items():
        distinct = {repr(v) for v in values.values()}
        if len(values) == tuned and len(distinct) == 1 and (k not in params or repr(params[k]) in distinct):
            params[k] = next(iter(values.values()))  # (one value for every model: the method's)
            continue
        for b in branches:
            if b["name"] in values:
                b.setdefault("parameters", {})[k] = values[b["name"]]
    return _mergekit_common(data, branches, params)


def _mergekit_common(data: dict[str, Any], branches: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"branches": branches, "method": data["merge_method"], "parameters": params,
                           **{k: v for k, v in data.items() if k in _OWN_KEYS}}
    if data.get("chat_template") is not None:
        out["chat_template"] = data["chat_template"]
    by_model = {b["model"]: b["name"] for b in branches}

    def ref(model: Any) -> Any:  # mergekit names a model by its path: here, its branch (or `base`)
        if not isinstance(model, str):
            return model
        return by_model.get(model, "base" if model == data.get("base_model") else model)

    if data.get("tokenizer_source") is not None:
        out["tokenizer_source"] = ref(data["tokenizer_source"])
    tok = data.get("tokenizer")
    if tok is not None:
        if not isinstance(tok, dict):
            raise ConfigError(f"`tokenizer` must be a mapping (source, tokens, pad_to_multiple_of), got {tok!r}")
        tok = dict(tok)
        if "source" in tok:
            tok["source"] = ref(tok["source"])
        tokens = tok.get("tokens")
        if isinstance(tokens, dict):
            tok["tokens"] = {t: {**e, "source": _token_source(e.get("source"), ref)} if isinstance(e, dict) else e
                             for t, e in tokens.items()}
        out["tokenizer"] = tok
    if data.get("base_model") is not None:
        out["base_model"] = data["base_model"]
    if (data.get("out_dtype") or data.get("dtype")) is not None:
        out["dtype"] = data.get("out_dtype") or data.get("dtype")
    return out


def _mergekit_slices(data: dict[str, Any], where: str) -> dict[str, Any]:
    """mergekit's ``slices: [{sources: [{model, layer_range, parameters}], parameters}]``: a branch per model
    (named after its folder), each source naming its branch."""
    slices = data["slices"]
    if not isinstance(slices, list) or not slices:
        raise ConfigError(f"{where}: `slices` must be a non-empty list of {{sources: [{{model, layer_range}}]}}")
    names: dict[str, str] = {}
    out_slices: list[dict[str, Any]] = []
    for k, sl in enumerate(slices):
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or set(sl) - {"sources", "parameters"}:
            extra = sorted(set(sl) - {"sources", "parameters"}) if isinstance(sl, dict) else []
            raise ConfigError(f"{where}: slices[{k}] must be {{sources: [...], parameters: {{...}}}}"
                              + (f"; {', '.join(extra)} not supported" if extra else f", got {sl!r}"))
        sources = []
        for j, src in enumerate(sl["sources"]):
            if (not isinstance(src, dict) or not isinstance(src.get("model"), str)
                    or set(src) - {"model", "layer_range", "parameters"}):
                raise ConfigError(f"{where}: slices[{k}].sources[{j}] must be {{model: PATH, layer_range: [START, "
                                  f"END], parameters: {{...}}}}, got {src!r}")
            if src["model"] not in names:
                names[src["model"]] = _branch_name(src["model"], set(names.values()))
            sources.append({"branch": names[src["model"]], "layer_range": src.get("layer_range"),
                            "parameters": {k2: v for k2, v in (src.get("parameters") or {}).items()
                                           if k2 not in _MERGEKIT_IGNORED}})
        out_slices.append({"sources": sources, "parameters": dict(sl.get("parameters") or {})})
    params = {k: v for k, v in dict(data.get("parameters") or {}).items() if k not in _MERGEKIT_IGNORED}
    out = _mergekit_common(data, [{"name": n, "model": m} for m, n in names.items()], params)
    out["slices"] = out_slices
    return out


_OWN_KEYS = {"compress_rate", "compress_overrides", "budget", "factor_bits", "group_size", "rsvd", "lora", "device",
             "max_shard_bytes"}  # (merge_method: branch in a mergekit config takes these too)


def _branch_name(model: str, taken: set[str]) -> str:
    """A branch name from a model path or hub id (its last part, made safe), unique among ``taken``."""
    last = Path(model.split("+")[0].rstrip("/")).name or "model"
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", last).lstrip("-_.") or "model"
    out, k = name, 2
    while out in taken:
        out, k = f"{name}-{k}", k + 1
    return out


def _token_source(src: Any, ref) -> Any:
    """A ``tokenizer.tokens`` entry's source with its model path (``source: PATH`` or a ``model_token``'s
    ``model``) as the branch's name."""
    if isinstance(src, dict):
        return {**src, "model": ref(src["model"])} if "model" in src else src
    return ref(src)
