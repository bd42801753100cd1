"""Build a mixture of experts from fine-tunes of one base, as ``mergekit-moe`` does: each fine-tune's MLP
becomes an expert of every layer; attention, norms, embeddings and head are the base's; the router of each
layer is initialized without training from prompts that each expert should answer (``gate_mode``):

* ``hidden`` / ``hidden_avg``: the base model's hidden state entering each layer for the expert's
  positive prompts (the last token's, or the mean over the prompt's tokens), minus that of its negative
  prompts, normalized: a token whose state is like the prompts' goes to that expert;
* ``cheap_embed``: the prompts' mean token embedding, the same for every layer;
* ``random`` / ``uniform_random``: seeded random gates (for training afterwards).

Three output architectures (mergekit-moe's), all in transformers 5's fused layout (``mlp.gate``,
``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``mlp.experts.down_proj`` ``[E, H, I]``):

* ``mixtral`` (``MixtralForCausalLM``) from Llama/Mistral models without biases;
* ``qwen`` (``Qwen2MoeForCausalLM``) from Llama/Mistral/Qwen2 models, with exactly one shared expert that
  every token passes through, weighted by ``sigmoid(shared_expert_gate · h)``, a gate initialized from the
  shared expert's prompts like the others (zero q/k/v biases are written for inputs without them);
* ``qwen3`` (``Qwen3MoeForCausalLM``) from Qwen3 models.

Written with the base's tokenizer and a README model card, atomically.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
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
_RANDOM = ("random", "uniform_random")


@dataclass(frozen=True)
class MoEArchitecture:
    """One output architecture: what it is called, which inputs it takes, whether it has a shared expert."""

    key: str
    title: str
    hf_class: str
    model_type: str
    inputs: tuple[str, ...]
    shared_expert: bool  # exactly one shared expert (Qwen2-MoE), or none
    biases: tuple[str, ...]  # input config flags for biases the output can hold

    def refusal(self, models: list[ModelSource], shared: int) -> str | None:
        """Why these models (``shared`` of them shared experts) cannot become this architecture, or None."""
        if self.shared_expert and shared != 1:
            return f"{self.title} needs exactly one shared_experts entry ({shared} given)"
        if not self.shared_expert and shared:
            return f"{self.title} has no shared expert (shared_experts given)"
        first = models[0].hf_config.get("model_type")
        for m in models:
            t = m.hf_config.get("model_type")
            if t not in self.inputs:
                return f"{m.name} ({m.path}) is a {t!r} model; a {self.title} is built from {' or '.join(self.inputs)} models"
            if t != first and {t, first} != {"llama", "mistral"}:
                return f"{m.name} ({m.path}) is a {t!r} model but {models[0].name} is a {first!r} model"
            for flag in ("attention_bias", "mlp_bias"):
                if m.hf_config.get(flag) and flag not in self.biases:
                    return f"{m.name} ({m.path}) has {flag}: true; {self.title}'s layers have no such biases"
        return None


ARCHITECTURES: dict[str, MoEArchitecture] = {a.key: a for a in (
    MoEArchitecture("mixtral", "Mixtral", "MixtralForCausalLM", "mixtral", ("llama", "mistral"), False, ()),
    MoEArchitecture("qwen", "Qwen2-MoE", "Qwen2MoeForCausalLM", "qwen2_moe", ("llama", "mistral", "qwen2"), True, ()),
    MoEArchitecture("qwen3", "Qwen3-MoE", "Qwen3MoeForCausalLM", "qwen3_moe", ("qwen3",), False, ("attention_bias",)),
)}
_ALIASES = {"qwen2": "qwen", "qwen2_moe": "qwen", "qwen3_moe": "qwen3"}


class MoEExpert(_Frozen):
    """One expert: a fine-tune whose MLPs become an expert of every layer."""

    source_model: str = Field(description="The fine-tune's folder.")
    positive_prompts: list[str] = Field(default_factory=list, description="Prompts this expert should answer.")
    negative_prompts: list[str] = Field(default_factory=list, description="Prompts it should not.")
    noise_scale: float | None = Field(default=None, ge=0, description="Gaussian noise added to its MLP weights "
                                      "(seeded), to break symmetry between copies of one model.")
    residual_scale: float | None = Field(default=None, description="Multiply its down_proj by this.")


class MoEConfig(_Frozen):
    """A mergekit-moe config: ``base_model``, ``experts``, ``shared_experts``, ``gate_mode``,
    ``experts_per_token``, ``dtype``, ``architecture``."""

    base_model: str
    experts: list[MoEExpert] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    experts_per_token: int = Field(default=2, ge=1)
    dtype: str | None = None
    architecture: str | None = Field(default=None, description="Output architecture: mixtral, qwen (Qwen2-MoE) or "
                                     "qwen3 (a prefix, as mergekit's: `qwen` is Qwen2-MoE or Qwen3-MoE, whichever "
                                     "fits); unset: Mixtral when it fits, else the first that does.")
    seed: int = Field(default=0, description="Seed of the random gates and of the experts' noise.")
    shared_experts: list[MoEExpert] | None = Field(default=None, description="Qwen2-MoE's one shared expert.")

    @field_validator("architecture")
    @classmethod
    def _architecture(cls, v: str | None) -> str | None:
        if v is None:
            return None
        key = _ALIASES.get(v.strip().lower(), v.strip().lower())
        if key == "deepseek":
            raise ValueError("deepseek outputs need the model's own remote code, which branchmerge never runs; "
                             "use qwen (Qwen2-MoE, with one shared expert)")
        if not key or not any(k.startswith(key) for k in ARCHITECTURES):
            raise ValueError(f"unknown architecture {v!r}; one of {', '.join(ARCHITECTURES)}")
        return key

    @field_validator("shared_experts")
    @classmethod
    def _shared(cls, v: list[MoEExpert] | None) -> list[MoEExpert] | None:
        if v is not None and len(v) > 1:
            raise ValueError(f"{len(v)} shared experts; Qwen2-MoE, the output with a shared expert, has one")
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
        if self.gate_mode not in _RANDOM:
            for what, group in (("experts", self.experts), ("shared_experts", self.shared_experts or [])):
                for i, e in enumerate(group):
                    if not e.positive_prompts:
                        raise ValueError(f"{what}[{i}] ({e.source_model}) has no positive_prompts; gate_mode "
                                         f"{self.gate_mode!r} initializes its gate from them")
            first = (self.experts[0].positive_prompts, self.experts[0].negative_prompts)
            if len(self.experts) > 1 and all((e.positive_prompts, e.negative_prompts) == first
                                             for e in self.experts[1:]):
                raise ValueError("every expert has the same prompts: the router could not tell them apart")
        return self

    @property
    def gated(self) -> list[MoEExpert]:
        """The experts with a gate vector: the routed ones, then the shared one (if any)."""
        return [*self.experts, *(self.shared_experts or [])]


def load_moe_config(path: str | Path) -> MoEConfig:
    """Read a mergekit-moe YAML; relative model paths are relative to its folder."""
    path = Path(path)
    data = read_yaml(path, "moe config")
    cfg: MoEConfig = validate(MoEConfig, data, str(path))

    def local(p: str) -> str:
        q = Path(p).expanduser()
        return str((path.parent / q).resolve()) if not q.is_absolute() and (path.parent / q).exists() else p

    def experts(group: list[MoEExpert]) -> list[MoEExpert]:
        return [e.model_copy(update={"source_model": local(e.source_model)}) for e in group]

    return cfg.model_copy(update={"base_model": local(cfg.base_model), "experts": experts(cfg.experts),
                                  "shared_experts": None if cfg.shared_experts is None
                                  else experts(cfg.shared_experts)})


def select_architecture(cfg: MoEConfig, models: list[ModelSource]) -> MoEArchitecture:
    """The output architecture for ``cfg`` and its models (base, experts, shared experts), as mergekit picks
    it: the candidates named by ``architecture`` (a prefix; all if unset) that fit, Mixtral first.

    Raises:
        ModelInputError: none fits; says why for each candidate.
    """
    shared = len(cfg.shared_experts or [])
    candidates = [a for k, a in ARCHITECTURES.items() if cfg.architecture is None or k.startswith(cfg.architecture)]
    reasons = {a.title: a.refusal(models, shared) for a in candidates}
    for a in candidates:
        if reasons[a.title] is None:
            return a
    if len(reasons) == 1:
        raise ModelInputError(next(iter(reasons.values())))
    raise ModelInputError("no MoE output architecture fits these models: " +
                          "; ".join(f"{t}: {r}" for t, r in reasons.items()))


def _check_shapes(base: ModelSource, experts: list[ModelSource]) -> None:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    for src in experts:
        for k in keys:
            if src.hf_config.get(k) != base.hf_config.get(k):
                raise ModelInputError(f"{src.name} ({src.path}) has {k} {src.hf_config.get(k)} but the base has "
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
    """The gates' weights ``[L, E + S, H]``: the routed experts', then the shared expert's (if any)."""
    layers, hidden, n = base.hf_config["num_hidden_layers"], base.hf_config["hidden_size"], len(cfg.gated)
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.gate_mode == "random":
        return torch.randn(layers, n, hidden, generator=g)
    if cfg.gate_mode == "uniform_random":
        bound = math.sqrt(1.0 / hidden)
        return torch.rand(layers, n, hidden, generator=g) * 2 * bound - bound
    vectors = _prompt_vectors(cfg, base)
    out = []
    for e in tqdm(cfg.gated, desc="expert prompts", disable=not progress):
        v = vectors(e.positive_prompts)
        if e.negative_prompts:
            v = v - vectors(e.negative_prompts)
        out.append(v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    gates = torch.stack(out, dim=1)  # [L, E + S, H]
    for layer in range(layers):
        cond = float(torch.linalg.cond(gates[layer])) if n > 1 else 1.0
        if cond > 5.0:
            logger.warning("layer %d: the experts' gate vectors are nearly parallel (condition number %.1f): the "
                           "router will hardly tell them apart; give the experts more distinct prompts", layer, cond)
            break
    return gates


def _mlp(src: ModelSource, spec: MoEExpert, pre: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One expert's MLP weights of one layer (``pre`` = ``model.layers.{i}.mlp``), noise and scale applied."""
    w = {p: src.get(f"{pre}.{p}.weight").float() for p in ("gate_proj", "up_proj", "down_proj")}
    if spec.noise_scale:
        w = {p: t + torch.randn(t.shape, generator=g) * spec.noise_scale for p, t in w.items()}
    if spec.residual_scale is not None:
        w["down_proj"] = w["down_proj"] * spec.residual_scale
    return w


def build_moe(cfg: MoEConfig, out: str | Path, *, force: bool = False, progress: bool = True,
              model_card: bool = True, max_shard_bytes: int = 1 << 30) -> dict[str, Any]:
    """Write the mixture of experts of ``cfg`` to ``out`` (in shards of at most ``max_shard_bytes``).

    Raises:
        ModelInputError: models no output architecture takes, experts that are not fine-tunes of the base
            (naming the model and field).
    """
    shared_specs = cfg.shared_experts or []
    inputs = [cfg.base_model, *(e.source_model for e in cfg.gated)]
    check_output(out, force=force, inputs=inputs)
    base = ModelSource.open("base_model", cfg.base_model)
    experts = [ModelSource.open(f"experts[{i}]", e.source_model) for i, e in enumerate(cfg.experts)]
    shared = [ModelSource.open(f"shared_experts[{i}]", e.source_model) for i, e in enumerate(shared_specs)]
    arch = select_architecture(cfg, [base, *experts, *shared])
    _check_shapes(base, experts + shared)
    if len({str(e.path.resolve()) for e in experts}) == 1 and len(experts) > 1 and not any(
            e.noise_scale for e in cfg.experts):
        logger.warning("every expert is the same model: the MoE answers as that model, at more cost")
    dt = cfg.dtype or dtype_name(base.hf_config.get("torch_dtype") or base.hf_config.get("dtype"), default="float32")
    torch_dt = DTYPES[dt]
    gates = gate_vectors(cfg, base, progress=progress)
    layers = base.hf_config["num_hidden_layers"]
    g = torch.Generator().manual_seed(cfg.seed + 1)
    names = set(base.names())
    with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes, prefix="model")
        for name in base.names():
            if ".mlp." not in name:
                writer.add(name, base.get(name).to(torch_dt))
            if arch.key == "qwen" and name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                bias = name[:-len("weight")] + "bias"  # Qwen2-MoE's q/k/v have biases: zeros where inputs have none
                if bias not in names:
                    writer.add(bias, torch.zeros(base.shape(name)[0], dtype=torch_dt))
        for layer in tqdm(range(layers), desc="experts", disable=not progress):
            pre = f"model.layers.{layer}.mlp"
            gate_up, down = [], []
            for spec, src in zip(cfg.experts, experts):
                w = _mlp(src, spec, pre, g)
                gate_up.append(torch.cat([w["gate_proj"], w["up_proj"]], dim=0))  # [2I, H]
                down.append(w["down_proj"])  # [H, I]
            writer.add(f"{pre}.gate.weight", gates[layer, :len(experts)].to(torch_dt).contiguous())
            writer.add(f"{pre}.experts.gate_up_proj", torch.stack(gate_up).to(torch_dt))
            writer.add(f"{pre}.experts.down_proj", torch.stack(down).to(torch_dt))
            for spec, src in zip(shared_specs, shared):  # (one at most)
                for p, t in _mlp(src, spec, pre, g).items():
                    writer.add(f"{pre}.shared_expert.{p}.weight", t.to(torch_dt))
                writer.add(f"{pre}.shared_expert_gate.weight", gates[layer, len(experts):].to(torch_dt).contiguous())
        writer.close()
        finish_hf_shards(tmp, writer)
        copy_side_files(base.side_files(), tmp)
        write_hf_config(tmp, moe_hf_config(arch, base.hf_config, len(experts), cfg.experts_per_token), dt)
        if model_card:
            (tmp / "README.md").write_text(_card(cfg, arch, Path(out).name))
    return {"out": str(out), "architecture": arch.hf_class, "experts": len(experts), "shared_experts": len(shared),
            "layers": layers, "dtype": dt}


_DROP = ("architectures", "model_type", "pretraining_tp", "transformers_version", "torch_dtype", "dtype",
         "_name_or_path")


def moe_hf_config(arch: MoEArchitecture, base: dict[str, Any], experts: int, per_token: int) -> dict[str, Any]:
    """The base's ``config.json`` as ``arch``'s with ``experts`` experts, ``per_token`` used per token (their
    weights renormalized to sum to 1, as Mixtral's), every layer sparse."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    drop = _DROP + (() if "attention_bias" in arch.biases else ("attention_bias",)) + ("mlp_bias",)
    keep = {k: v for k, v in base.items() if k not in drop}
    if arch.key == "mixtral":
        cfg = MixtralConfig(**keep).to_dict()
        cfg.update({"num_local_experts": experts, "num_experts_per_tok": per_token, "sliding_window": None})
    else:
        size = base["intermediate_size"]
        moe = {"num_experts": experts, "num_experts_per_tok": per_token, "decoder_sparse_step": 1,
               "norm_topk_prob": True, "moe_intermediate_size": size, "mlp_only_layers": [],
               "use_sliding_window": False, "sliding_window": None}
        if arch.key == "qwen":
            moe |= {"shared_expert_intermediate_size": size, "qkv_bias": True}
        keep = {k: v for k, v in keep.items() if k not in ("layer_types", "max_window_layers", *moe)}
        cls = Qwen2MoeConfig if arch.key == "qwen" else Qwen3MoeConfig
        cfg = cls(**keep, **moe).to_dict()  # (set here, not after: Qwen3-MoE writes num_experts as num_local_experts)
    cfg.update({"architectures": [arch.hf_class], "model_type": arch.model_type})
    return cfg


def _card(cfg: MoEConfig, arch: MoEArchitecture, name: str) -> str:
    def rows(group: list[MoEExpert], what: str) -> str:
        return "".join(f"| {what} {i} | {e.source_model} | {len(e.positive_prompts)} | {len(e.negative_prompts)} |\n"
                       for i, e in enumerate(group))

    shared = (" One shared expert (every token passes through it, weighted by its own gate) was added."
              if cfg.shared_experts else "")
    return (f"---\nbase_model: {cfg.base_model}\ntags: [merge, moe, branchmerge]\n---\n# {name}\n\n"
            f"A {arch.title} mixture of experts (`{arch.hf_class}`) built by branchmerge from fine-tunes of "
            f"`{cfg.base_model}`: each fine-tune's MLPs are an expert of every layer, {cfg.experts_per_token} used "
            f"per token; the routers were initialized from prompts (`gate_mode: {cfg.gate_mode}`), not trained."
            f"{shared}\n\n| expert | model | positive prompts | negative prompts |\n|---|---|---|---|\n"
            f"{rows(cfg.experts, 'routed')}{rows(cfg.shared_experts or [], 'shared')}")
