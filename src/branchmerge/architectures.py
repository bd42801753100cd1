"""Architectures as data: which tensors are compressed and which stay per branch.

Each JSON file under ``_data/architectures/`` names the HF ``architectures`` it covers and lists tensor
name templates, where ``${layer_index}`` stands for a layer number and ``${expert_index}`` for an expert's.
A model whose architecture has no file falls back to a rule on tensor names and shapes, with a warning.

Mixture-of-experts layouts say more (data for the runtime, :mod:`branchmerge.runtime.experts`): ``renames``
(checkpoint name part → transformers module path part, e.g. Mixtral's ``block_sparse_moe.`` → ``mlp.``),
``experts`` (the experts module and the checkpoint names of each expert's gate, up and down projections)
and ``row_dispatch`` (the sparse block run once per branch of a mixed batch).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Role = Literal["compress", "per_branch"]

_PER_BRANCH_HINTS = ("embed", "wte", "wpe", "lm_head", "norm", "ln_", "layernorm", "output.weight")


_LAYER_FALLBACK = re.compile(r"^(?:.*\.)?(?:layers|h|blocks|block|layer)\.(\d+)\.")


_INDEX = re.compile(r"\$\{(?:layer|expert)_index\}")


def _template_regex(template: str) -> re.Pattern[str]:
    parts = _INDEX.split(template)
    return re.compile(r"\d+".join(re.escape(p) for p in parts) + "$")


@dataclass(frozen=True)
class Experts:
    """Where an MoE layout keeps its experts: the experts module (a template with ``${layer_index}``) and the
    checkpoint names of each expert's gate, up and down projections under ``{module}.{expert index}``."""

    module: str
    gate: str  # "" where the experts have no gate (Nemotron-H's ``down(act(up(x)))``)
    up: str
    down: str
    stacked: bool = False  # checkpoints hold each layer's experts stacked (GraniteMoE): exports stack them again
    # how the fused (3-D) tensors hold the experts: "mixtral" ([E, 2I, H] gate rows then up rows, [E, H, I]
    # down, no biases), "gpt_oss" ([E, H, 2I] gate and up in alternate columns, [E, I, H] down, biases
    # alike, and its clamped SwiGLU) or "llama4" ([E, H, 2I] gate columns then up, [E, I, H] down; every expert
    # takes every token, expert-major, scaled by its router score beforehand) or "nemotron_h" ([E, I, H] up,
    # [E, H, I] down, no gate)
    layout: str = "mixtral"

    @property
    def projections(self) -> tuple[str, ...]:
        """The checkpoint names of each expert's projections (gate, up, down; no gate where it has none)."""
        return tuple(p for p in (self.gate, self.up, self.down) if p)


@dataclass(frozen=True)
class Architecture:
    """Tensor layout of one model family, loaded from JSON."""

    name: str
    architectures: tuple[str, ...]
    compress: tuple[str, ...]
    per_branch: tuple[str, ...]
    transposed: bool = False  # weights stored [in, out] (GPT-2 Conv1D) rather than [out, in]
    description: str = ""
    # layers of one block that read the same input, in the order the block calls them (submodule paths
    # under the block): run as one call by the Triton kernels (runtime.siblings)
    siblings: tuple[tuple[str, ...], ...] = ()
    layer_prefix: str = ""  # the blocks' tensors start with it (``${layer_index}`` the layer number)
    renames: tuple[tuple[str, str], ...] = ()  # checkpoint name part → module path part, applied in order
    experts: Experts | None = None  # MoE: where the experts are
    row_dispatch: str = ""  # a module template run per branch of a mixed batch (a sparse MoE block)

    def module_path(self, tensor_name: str) -> str:
        """The transformers module path of a tensor's module (its name without the parameter, renamed)."""
        return self.param_path(tensor_name).rpartition(".")[0]

    def param_path(self, tensor_name: str) -> str:
        """A checkpoint tensor name as the transformers model's parameter path (``renames`` applied)."""
        for old, new in self.renames:
            tensor_name = tensor_name.replace(old, new)
        return tensor_name

    def checkpoint_path(self, path: str) -> str:
        """A transformers module or parameter path as the checkpoint names it (``renames`` undone)."""
        for old, new in reversed(self.renames):
            path = path.replace(new, old)
        return path

    def expert_or_router(self, module: str) -> bool:
        """Whether checkpoint module ``module`` is one expert's projection or a sparse block's router gate
        (which PEFT's LoRAs cannot target: transformers 5 runs experts as fused 3-D parameters, routers as
        modules of their own)."""
        if not self.experts:
            return False
        spec, path = self.experts, self.module_path(module + ".weight")
        return (any(self.matches(f"{spec.module}.${{expert_index}}.{p}", path) for p in spec.projections)
                or any(self.matches(f"{self.row_dispatch}.{g}", path) for g in ("gate", "shared_expert_gate", "router")))

    def matches(self, template: str, module_path: str) -> bool:
        """Whether ``module_path`` is ``template`` with numbers for its indices."""
        return bool(template) and _template_regex(template).match(module_path) is not None

    def layer_of(self, tensor_name: str) -> tuple[int, str] | None:
        """``(layer, template)`` of a tensor inside a block (``template``: its name with ``${layer_index}`` in
        place of the number), None outside the blocks (embeddings, final norm, head)."""
        if self.layer_prefix:
            pre, _, post = self.layer_prefix.partition("${layer_index}")
            m = re.match(re.escape(pre) + r"(\d+)" + re.escape(post) + r"\.", tensor_name)
        else:
            m = _LAYER_FALLBACK.match(tensor_name)
        if m is None:
            return None
        a, b = m.span(1)
        return int(m.group(1)), tensor_name[:a] + "${layer_index}" + tensor_name[b:]

    def role(self, tensor_name: str, shape: tuple[int, ...]) -> Role:
        """Whether a tensor is compressed (2-D block weight) or kept per branch.

        Raises:
            ValueError: if a template marks a tensor with other than 2 dimensions for compression.
        """
        if any(_template_regex(t).match(tensor_name) for t in self.compress):
            if len(shape) != 2:
                raise ValueError(
                    f"architecture {self.name!r} marks {tensor_name} for compression but its shape is "
                    f"{list(shape)}, not 2-D"
                )
            return "compress"
        if any(_template_regex(t).match(tensor_name) for t in self.per_branch):
            return "per_branch"
        return fallback_role(tensor_name, shape)


def fallback_role(tensor_name: str, shape: tuple[int, ...]) -> Role:
    """Rule for unknown layouts: 2-D weights inside blocks are compressed; the rest stays per branch."""
    lowered = tensor_name.lower()
    if len(shape) == 2 and lowered.endswith("weight") and not any(h in lowered for h in _PER_BRANCH_HINTS):
        return "compress"
    return "per_branch"


FALLBACK = Architecture(
    name="fallback", architectures=(), compress=(), per_branch=(), description="shape/name rule"
)


@cache
def registry() -> dict[str, Architecture]:
    """All packaged architectures, keyed by their ``name``."""
    out: dict[str, Architecture] = {}
    folder = resources.files("branchmerge") / "_data" / "architectures"
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        data = json.loads(entry.read_text())
        arch = Architecture(
            name=data["name"],
            architectures=tuple(data["architectures"]),
            compress=tuple(data["compress"]),
            per_branch=tuple(data["per_branch"]),
            transposed=bool(data.get("transposed", False)),
            description=data.get("description", ""),
            siblings=tuple(tuple(g) for g in data.get("siblings", ())),
            layer_prefix=data.get("layer_prefix", ""),
            renames=tuple((str(k), str(v)) for k, v in data.get("renames", {}).items()),
            experts=Experts(**data["experts"]) if "experts" in data else None,
            row_dispatch=data.get("row_dispatch", ""),
        )
        if arch.name in out:
            raise ValueError(f"duplicate architecture name {arch.name!r} in {entry.name}")
        out[arch.name] = arch
    return out


def known(hf_config: dict) -> Architecture | None:
    """The packaged layout for an HF ``config.json`` dict, or None."""
    names = hf_config.get("architectures") or []
    return next((a for a in registry().values() if any(n in a.architectures for n in names)), None)


def for_hf_config(hf_config: dict, *, source: str = "") -> Architecture:
    """The layout for an HF ``config.json`` dict, or the fallback rule with a warning."""
    names = hf_config.get("architectures") or []
    arch = known(hf_config)
    if arch is not None:
        return arch
    logger.warning(
        "no architecture template for %s (%s); using the fallback rule: 2-D block weights are "
        "compressed, embeddings/norms/lm_head/biases kept per branch",
        names or hf_config.get("model_type", "?"),
        source or "model",
    )
    return FALLBACK


def float32_tensors(hf_config: dict, dtype: torch.dtype) -> Callable[[str], bool]:
    """Whether a checkpoint tensor of this model is one transformers keeps in float32 when it loads the model
    at ``dtype`` (then stored and run in float32 here too; see :func:`_float32_pattern`)."""
    pattern = _float32_pattern(hf_config, dtype)
    if pattern is None:
        return lambda name: False
    arch = known(hf_config)
    return lambda name: pattern.search(arch.param_path(name) if arch else name) is not None


def _float32_pattern(hf_config: dict, dtype: torch.dtype) -> re.Pattern[str] | None:
    """The parameters transformers keeps in float32 at ``dtype``, as a pattern searched in a parameter's
    module path (transformers' own rule), or None.

    That is the model class's ``_keep_in_fp32_modules_strict`` at float16 and bfloat16 (DeepSeek-V2/V3's and
    GLM-4.5's router gates and score-correction biases: a rounded bias changes which experts a token picks)
    and its ``_keep_in_fp32_modules`` at float16 only. The class is a transformers built-in named by the
    config's ``architectures`` (or its ``model_type``'s causal LM); custom code is never looked up.
    """
    import torch

    if dtype not in (torch.float16, torch.bfloat16):
        return None
    cls = _model_class(hf_config)
    names = list(getattr(cls, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        names += list(getattr(cls, "_keep_in_fp32_modules", None) or [])
    if not names:
        return None
    return re.compile("|".join(f"(?:{str(n).replace('*', '.*')})" for n in names))


def _model_class(hf_config: dict) -> type | None:
    import transformers
    from transformers import PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = [n for n in hf_config.get("architectures") or [] if isinstance(n, str)]
    names.append(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hf_config.get("model_type"), ""))
    for name in names:
        if not name.isidentifier() or name.startswith("_"):
            continue
        try:
            cls = getattr(transformers, name, None)
        except Exception:  # noqa: BLE001 - a lazy import of a model transformers cannot build here
            continue
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return None
