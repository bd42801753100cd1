"""Build a Mixtral mixture of experts from fine-tunes of one Llama/Mistral base, as ``mergekit-moe`` does:
each fine-tune's MLP becomes an expert of every layer; attention, norms, embeddings and head are the
base's; the router of each layer is initialized without training from prompts that each expert should
answer (``gate_mode``):

* ``hidden`` / ``hidden_avg``: the base model's hidden state entering each layer for the expert's
  positive prompts (the last token's, or the mean over the prompt's tokens), minus that of its negative
  prompts, normalized: a token whose state is like the prompts' goes to that expert;
* ``cheap_embed``: the prompts' mean token embedding, the same for every layer;
* ``random`` / ``uniform_random``: seeded random gates (for training afterwards).

Writes a transformers ``MixtralForCausalLM`` folder (transformers 5's layout: ``mlp.gate``,
``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``mlp.experts.down_proj`` ``[E, H, I]``), the base's
tokenizer, and a README model card, atomically.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from branchmerge.common import DTYPES, dtype_name
from branchmerge.config import _Frozen, read_yaml, validate
from branchmerge.errors import ModelInputError
from branchmerge.io.hf import finish_hf_shards, write_hf_config
from branchmerge.io.models import ModelSource
from branchmerge.io.writer import ShardWriter, atomic_output_dir, check_output, copy_side_files

logger = logging.getLogger(__name__)

GateMode = Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random"]
_FAMILY = ("llama", "mistral")


class MoEExpert(_Frozen):
    """One expert: a fine-tune whose MLPs become an expert of every layer."""

    source_model: str = Field(description="The fine-tune's folder.")
    positive_prompts: list[str] = Field(default_factory=list, description="Prompts this expert should answer.")
    negative_prompts: list[str] = Field(default_factory=list, description="Prompts it should not.")
    noise_scale: float | None = Field(default=None, ge=0, description="Gaussian noise added to its MLP weights "
                                      "(seeded), to break symmetry between copies of one model.")
    residual_scale: float | None = Field(default=None, description="Multiply its down_proj by this.")


class MoEConfig(_Frozen):
    """A mergekit-moe config: ``base_model``, ``experts``, ``gate_mode``, ``experts_per_token``, ``dtype``."""

    base_model: str
    experts: list[MoEExpert] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    experts_per_token: int = Field(default=2, ge=1)
    dtype: str | None = None
    architecture: Literal["mixtral"] | None = Field(default=None, description="Output architecture (Mixtral).")
    seed: int = Field(default=0, description="Seed of the random gates and of the experts' noise.")
    shared_experts: list[MoEExpert] | None = None

    @field_validator("shared_experts")
    @classmethod
    def _no_shared(cls, v: Any) -> Any:
        if v:
            raise ValueError("shared_experts (Qwen2-MoE/DeepSeek outputs) are not supported; the output is Mixtral")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        return None if v is None else dtype_name(v, field="dtype")

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.experts_per_token > len(self.experts):
            raise ValueError(f"experts_per_token {self.experts_per_token} is more than the {len(self.experts)} "
                             f"experts")
        if self.gate_mode not in ("random", "uniform_random"):
            for i, e in enumerate(self.experts):
                if not e.positive_prompts:
                    raise ValueError(f"experts[{i}] ({e.source_model}) has no positive_prompts; gate_mode "
                                     f"{self.gate_mode!r} initializes its router from them")
            first = (self.experts[0].positive_prompts, self.experts[0].negative_prompts)
            if len(self.experts) > 1 and all((e.positive_prompts, e.negative_prompts) == first
                                             for e in self.experts[1:]):
                raise ValueError("every expert has the same prompts: the router could not tell them apart")
        return self


def load_moe_config(path: str | Path) -> MoEConfig:
    """Read a mergekit-moe YAML; relative model paths are relative to its folder."""
    path = Path(path)
    data = read_yaml(path, "moe config")
    cfg: MoEConfig = validate(MoEConfig, data, str(path))

    def local(p: str) -> str:
        q = Path(p).expanduser()
        return str((path.parent / q).resolve()) if not q.is_absolute() and (path.parent / q).exists() else p

    return cfg.model_copy(update={"base_model": local(cfg.base_model), "experts": [
        e.model_copy(update={"source_model": local(e.source_model)}) for e in cfg.experts]})


def _check_models(base: ModelSource, experts: list[ModelSource]) -> None:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    for src in [base, *experts]:
        cfg = src.hf_config
        if cfg.get("model_type") not in _FAMILY:
            raise ModelInputError(f"{src.name} ({src.path}) is a {cfg.get('model_type')!r} model; a Mixtral MoE is "
                                  f"built from {' or '.join(_FAMILY)} models")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ModelInputError(f"{src.name} ({src.path}) has {flag}: true; Mixtral's layers have no biases")
        for k in keys:
            if cfg.get(k) != base.hf_config.get(k):
                raise ModelInputError(f"{src.name} ({src.path}) has {k} {cfg.get(k)} but the base has "
                                      f"{base.hf_config.get(k)}: experts must be fine-tunes of the base")


PROMPT_BATCH = 16  # prompts run through the base at once (memory stays bounded however many there are)


def _prompt_vectors(cfg: MoEConfig, base: ModelSource) -> Callable[[list[str]], torch.Tensor]:
    """A function of prompts giving ``[L, H]``: what they look like entering each layer (or their mean
    embedding), averaged over the prompts, each cut to the model's context. The tokenizer and the base model
    (or its embeddings, for ``cheap_embed``) are loaded once, here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base.path, trust_remote_code=False)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.bos_token or tok.eos_token
    layers = base.hf_config["num_hidden_layers"]
    limit = int(base.hf_config.get("max_position_embeddings") or 2048)
    embed = model = None
    if cfg.gate_mode == "cheap_embed":
        embed = base.get("model.embed_tokens.weight").float()
    else:
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32, trust_remote_code=False).eval()

    def vectors(prompts: list[str]) -> torch.Tensor:
        total: torch.Tensor | None = None
        for i in range(0, len(prompts), PROMPT_BATCH):
            enc = tok([(tok.bos_token or "") + p for p in prompts[i:i + PROMPT_BATCH]], return_tensors="pt",
                      padding=True, add_special_tokens=False, truncation=True, max_length=limit)
            mask = enc["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
            if embed is not None:
                part = (embed[enc["input_ids"]] * mask).sum(dim=(0, 1)).expand(layers, -1)  # [L, H]
            else:
                with torch.no_grad():
                    out = model(**enc, output_hidden_states=True)
                states = torch.stack(out.hidden_states[:-1]).float()  # [L, B, T, H]: what enters each layer
                if cfg.gate_mode == "hidden_avg":  # the mean over each prompt's own tokens (padding left out)
                    part = ((states * mask).sum(2) / mask.sum(1).clamp(min=1)).sum(1)
                else:  # the last token (left padding: every prompt ends at the last position)
                    part = states[:, :, -1, :].sum(1)
            total = part if total is None else total + part
        if embed is not None:  # (the sum over every token of every prompt, normalized: mergekit's cheap_embed)
            return (total / total.norm(dim=-1, keepdim=True).clamp(min=1e-8)).clone()
        return total / len(prompts)

    return vectors


def gate_vectors(cfg: MoEConfig, base: ModelSource, *, progress: bool = True) -> torch.Tensor:
    """The routers' weights ``[L, E, H]`` (see the module's docstring)."""
    layers, hidden, n = base.hf_config["num_hidden_layers"], base.hf_config["hidden_size"], len(cfg.experts)
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.gate_mode == "random":
        return torch.randn(layers, n, hidden, generator=g)
    if cfg.gate_mode == "uniform_random":
        bound = math.sqrt(1.0 / hidden)
        return torch.rand(layers, n, hidden, generator=g) * 2 * bound - bound
    vectors = _prompt_vectors(cfg, base)
    out = []
    for e in tqdm(cfg.experts, desc="expert prompts", disable=not progress):
        v = vectors(e.positive_prompts)
        if e.negative_prompts:
            v = v - vectors(e.negative_prompts)
        out.append(v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    gates = torch.stack(out, dim=1)  # [L, E, H]
    for layer in range(layers):
        cond = float(torch.linalg.cond(gates[layer])) if n > 1 else 1.0
        if cond > 5.0:
            logger.warning("layer %d: the experts' gate vectors are nearly parallel (condition number %.1f): the "
                           "router will hardly tell them apart; give the experts more distinct prompts", layer, cond)
            break
    return gates


def build_moe(cfg: MoEConfig, out: str | Path, *, force: bool = False, progress: bool = True,
              model_card: bool = True) -> dict[str, Any]:
    """Write the Mixtral MoE of ``cfg`` to ``out``.

    Raises:
        ModelInputError: experts that are not fine-tunes of a Llama/Mistral base (naming the model and field).
    """
    inputs = [cfg.base_model, *(e.source_model for e in cfg.experts)]
    check_output(out, force=force, inputs=inputs)
    base = ModelSource.open("base_model", cfg.base_model)
    experts = [ModelSource.open(f"experts[{i}]", e.source_model) for i, e in enumerate(cfg.experts)]
    _check_models(base, experts)
    if len({str(e.path.resolve()) for e in experts}) == 1 and len(experts) > 1 and not any(
            e.noise_scale for e in cfg.experts):
        logger.warning("every expert is the same model: the MoE answers as that model, at more cost")
    dt = cfg.dtype or dtype_name(base.hf_config.get("torch_dtype") or base.hf_config.get("dtype"), default="float32")
    torch_dt = DTYPES[dt]
    gates = gate_vectors(cfg, base, progress=progress)
    layers = base.hf_config["num_hidden_layers"]
    g = torch.Generator().manual_seed(cfg.seed + 1)
    with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
        writer = ShardWriter(tmp, 1 << 30, prefix="model")
        for name in base.names():
            if ".mlp." not in name:
                writer.add(name, base.get(name).to(torch_dt))
        for layer in tqdm(range(layers), desc="experts", disable=not progress):
            pre = f"model.layers.{layer}.mlp"
            gate_up, down = [], []
            for spec, src in zip(cfg.experts, experts):
                w = {p: src.get(f"{pre}.{p}.weight").float() for p in ("gate_proj", "up_proj", "down_proj")}
                if spec.noise_scale:
                    w = {p: t + torch.randn(t.shape, generator=g) * spec.noise_scale for p, t in w.items()}
                if spec.residual_scale is not None:
                    w["down_proj"] = w["down_proj"] * spec.residual_scale
                gate_up.append(torch.cat([w["gate_proj"], w["up_proj"]], dim=0))  # [2I, H]
                down.append(w["down_proj"])  # [H, I]
            writer.add(f"{pre}.gate.weight", gates[layer].to(torch_dt).contiguous())
            writer.add(f"{pre}.experts.gate_up_proj", torch.stack(gate_up).to(torch_dt))
            writer.add(f"{pre}.experts.down_proj", torch.stack(down).to(torch_dt))
        writer.close()
        finish_hf_shards(tmp, writer)
        copy_side_files(base.side_files(), tmp)
        write_hf_config(tmp, mixtral_config(base.hf_config, len(experts), cfg.experts_per_token), dt)
        if model_card:
            (tmp / "README.md").write_text(_card(cfg, Path(out).name))
    return {"out": str(out), "experts": len(experts), "layers": layers, "dtype": dt}


def mixtral_config(base: dict[str, Any], experts: int, per_token: int) -> dict[str, Any]:
    """The base's ``config.json`` as a Mixtral's with ``experts`` experts, ``per_token`` used per token."""
    from transformers import MixtralConfig

    keep = {k: v for k, v in base.items() if k not in ("architectures", "model_type", "attention_bias", "mlp_bias",
                                                          "pretraining_tp", "transformers_version", "torch_dtype",
                                                          "dtype", "_name_or_path")}
    cfg = MixtralConfig(**keep).to_dict()
    cfg.update({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": experts,
                "num_experts_per_tok": per_token, "sliding_window": None})
    return cfg


def _card(cfg: MoEConfig, name: str) -> str:
    rows = "\n".join(f"| {i} | {e.source_model} | {len(e.positive_prompts)} | {len(e.negative_prompts)} |"
                     for i, e in enumerate(cfg.experts))
    return (f"---\nbase_model: {cfg.base_model}\ntags: [merge, moe, branchmerge]\n---\n# {name}\n\n"
            f"A Mixtral mixture of experts built by branchmerge from fine-tunes of `{cfg.base_model}`: each "
            f"fine-tune's MLPs are an expert of every layer, {cfg.experts_per_token} used per token; the routers "
            f"were initialized from prompts (`gate_mode: {cfg.gate_mode}`), not trained.\n\n"
            f"| expert | model | positive prompts | negative prompts |\n|---|---|---|---|\n{rows}\n")
