"""Models built from a ``config.json`` alone, on the meta device (no memory, no weights): what a bundle's
runtime fills, and what the merge and extract-lora read module kinds off. Built-in transformers classes only;
custom code is never run."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from branchmerge.errors import BundleError

# nn.Linear subclasses whose forward is x Wᵀ + b written anew (the others: routers that return tuples, grouped
# or fp32-output layers)
LINEAR_LIKE = frozenset({"FalconLinear"})


def plain_linear(m: nn.Module) -> bool:
    """Whether ``m`` is an ``nn.Linear`` whose forward is ``x Wᵀ + b`` (its own, or written anew)."""
    return isinstance(m, nn.Linear) and (type(m).forward is nn.Linear.forward or type(m).__name__ in LINEAR_LIKE)


def module_kinds(hf_config: dict) -> dict[str, str] | None:
    """Each module path of this config's model as ``linear`` (a plain ``nn.Linear``), ``embedding`` (a token
    embedding: an ``nn.Embedding`` but learned positions, whose input is no token id) or ``other``; None when
    transformers cannot build the model."""
    try:
        model = skeleton(hf_config_object(hf_config, "model"), where="model")
    except BundleError:
        return None
    out = {}
    for n, m in model.named_modules():
        if plain_linear(m):
            out[n] = "linear"
        elif isinstance(m, nn.Embedding) and "position" not in type(m).__name__.lower():
            out[n] = "embedding"
        else:
            out[n] = "other"
    return out


def plain_linear_modules(hf_config: dict) -> set[str] | None:
    """Paths of the modules of this config's model that are plain ``nn.Linear`` layers (their forward
    ``x Wᵀ + b``, which :class:`BranchedLinear` replaces), or None when transformers cannot build the model.

    Routers that subclass ``nn.Linear`` with a forward of their own (Llama 4's) or hold a 2-D weight in a module
    of their own (gpt-oss's) are not among them: the fallback rule keeps their weights per branch."""
    kinds = module_kinds(hf_config)
    return None if kinds is None else {n for n, k in kinds.items() if k == "linear"}


def skeleton(config: PretrainedConfig, dtype: torch.dtype | None = None, *, where: str) -> PreTrainedModel:
    """A causal-LM of ``config`` whose parameters are on the meta device (no memory, no init) and whose
    buffers are real: non-persistent buffers (rotary ``inv_freq``, Gemma's ``embed_scale``) are computed
    by the model's own constructors, whatever their signatures.

    Raises:
        BundleError: transformers cannot build a model from ``config`` (named by ``where``).
    """
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for configs it cannot build
        raise BundleError(f"{where}: transformers cannot build a model from its config "
                          f"({type(e).__name__}: {e})") from None


_FLOATS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def _special_floats(v: Any) -> Any:
    """``v`` with transformers' JSON spelling of non-finite floats (``{"__float__": "Infinity"}``, as its
    ``save_pretrained`` writes Mamba-2's ``time_step_limit``) read back as floats."""
    if isinstance(v, dict):
        if set(v) == {"__float__"} and v["__float__"] in _FLOATS:
            return _FLOATS[v["__float__"]]
        return {k: _special_floats(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_special_floats(x) for x in v]
    return v


def hf_config_object(cfg: dict, where: str) -> PretrainedConfig:
    """A transformers config from a branch's recorded ``config.json`` content, built-in classes only.

    An ``auto_map`` (custom code) is dropped: the bundle's Python is never imported or run.

    Raises:
        BundleError: an unknown ``model_type`` or a config transformers refuses.
    """
    data = {k: _special_floats(v) for k, v in cfg.items()
            if k not in ("auto_map", "quantization_config", "_name_or_path")}
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise BundleError(f"{where}: model_type {model_type!r} is not an architecture transformers knows "
                          "(custom code from a bundle is never run)")
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    except Exception as e:  # noqa: BLE001 - config classes raise ValueError, TypeError, hub validation errors…
        raise BundleError(f"{where}: its config is invalid: {' '.join(str(e).split())}") from None
