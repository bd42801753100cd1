"""Extract a PEFT LoRA adapter from a fine-tune: each changed linear's difference from the base as a
low-rank pair (mergekit's ``mergekit-extract-lora``, PEFT's format), one tensor at a time.

A changed bias of a linear layer the LoRA targets is stored with its pair (PEFT's ``bias="lora_only"``:
``base_layer.bias``). What a LoRA cannot carry is kept whole in ``modules_to_save`` (PEFT stores the module's
tensors and uses them in place of the base's): embeddings (unless ``embed_lora``, or only some of their rows
changed or were added: then those rows, as PEFT's trainable tokens), modules other than plain linear layers
(read off the model's meta skeleton: OPT's learned positions), and any other module with a changed norm
weight or bias. Modules are named as transformers names them (GPT-NeoX's ``embed_out`` is ``lm_head``). A head tied to the embeddings gets the embeddings' change too (PEFT's embedding LoRA
changes only the lookup). ``skip_undecomposable`` drops those instead, and the report says what was lost.

Writes ``OUT/adapter_config.json``, ``OUT/adapter_model.safetensors``, the fine-tune's tokenizer files and
``OUT/extract_report.json`` (each module's rank and relative error), atomically. A fine-tune whose vocabulary
grew (added tokens) gets its embeddings and head saved whole; the base must be resized to it before loading
(``model.resize_token_embeddings(N)``, as PEFT expects).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from branchmerge.architectures import known
from branchmerge.common import DTYPES, dtype_name
from branchmerge.compress import tensor_seed
from branchmerge.compress.lora import extract_lora_factors
from branchmerge.compress.rows import changed_rows, patch_pays
from branchmerge.errors import BranchmergeError, ConfigError, ModelInputError
from branchmerge.io.models import ModelSource
from branchmerge.io.writer import atomic_output_dir, check_output, copy_side_files

logger = logging.getLogger(__name__)

_EMBED = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embeddings)$")
REPORT = "extract_report.json"


def _compile(patterns: Sequence[str], flag: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"{flag} {p!r} is not a regular expression: {e}") from None
    return out


def _matches(module: str, names: Sequence[str]) -> bool:
    return any(module == n or module.endswith("." + n) for n in names)


def extract_lora(base: str | Path, model: str | Path, out: str | Path, *, rank: int = 128, sv_epsilon: float = 0.0,
                 target_error: float | None = None, exact: bool = False, embed_lora: bool = False,
                 modules_to_save: Sequence[str] = (), include: Sequence[str] = (), exclude: Sequence[str] = (),
                 skip_undecomposable: bool = False, token_rows: bool = True, dtype: str | None = None,
                 force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write the LoRA adapter that turns ``base`` into (approximately) ``model``.

    Args:
        rank: the largest rank of a module's pair (each module gets at most this).
        sv_epsilon: drop singular values at or below this.
        target_error: the smallest rank whose relative error (of the difference) is at most this, per module.
        exact: full SVD instead of the randomized one.
        embed_lora: embeddings as LoRA pairs (``lora_embedding_A/B``) rather than saved whole.
        modules_to_save: modules saved whole (names or suffixes, e.g. ``lm_head``).
        token_rows: embeddings (and an untied head) that differ from the base's in few rows (a fine-tune that
            trained only some tokens, or added tokens to embeddings it left alone) are saved as those rows,
            PEFT's trainable tokens (``trainable_token_indices``), when that at least halves them; else whole.
        include, exclude: regular expressions on module names: only modules matching ``include`` (when
            given) and none of ``exclude`` are extracted; the others stay the base's.
        dtype: of the written tensors (default: the fine-tune's).

    Raises:
        ConfigError: bad options. ModelInputError: models of different layouts (naming the tensor).
    """
    if not 1 <= rank <= 65536:
        raise ConfigError(f"--rank must be in [1, 65536], got {rank}")
    if target_error is not None and not 0.0 <= target_error < 1.0:
        raise ConfigError(f"--target-error must be in [0, 1), got {target_error}")
    if sv_epsilon < 0:
        raise ConfigError(f"--sv-epsilon must be >= 0, got {sv_epsilon}")
    inc, exc = _compile(include, "--include"), _compile(exclude, "--exclude")
    check_output(out, force=force, inputs=[str(base), str(model)])
    b_src, m_src = ModelSource.open("base", str(base)), ModelSource.open("model", str(model))
    archs = [s.hf_config.get("architectures") for s in (b_src, m_src)]
    if archs[0] != archs[1]:
        raise ModelInputError(f"the base is {archs[0]} but the model is {archs[1]}: a LoRA needs the same layout")
    names = m_src.names()
    arch = known(m_src.hf_config)  # (an MoE's experts and routers cannot be LoRA targets)

    def peft_path(module: str) -> str:  # PEFT names transformers' modules (GPT-NeoX's embed_out is lm_head)
        return arch.module_path(module + ".weight") if arch is not None else module

    from branchmerge.io.skeleton import module_kinds

    kinds = module_kinds(m_src.hf_config)  # (on the model's meta skeleton: which modules a LoRA can target)

    def embedding(module: str) -> bool:
        return kinds.get(peft_path(module)) == "embedding" if kinds is not None else bool(_EMBED.search(module))

    def lora_target(module: str) -> bool:  # a plain linear layer (not OPT's positions, not a router of its own)
        return kinds is None or kinds.get(peft_path(module)) == "linear"

    def vocabulary(module: str) -> bool:
        return embedding(module) or peft_path(module).rsplit(".", 1)[-1] == "lm_head"
    for name in sorted(set(names) ^ set(b_src.names())):
        where = "model" if name in names else "base"
        raise ModelInputError(f"tensor {name} is only in the {where}; a LoRA needs the same tensors in both")
    dt = dtype_name(dtype, field="--dtype") if dtype and dtype != "auto" else _model_dtype(m_src, names)
    torch_dt = DTYPES[dt]
    modules: dict[str, list[str]] = {}
    for name in names:
        modules.setdefault(name.rpartition(".")[0], []).append(name)

    def wanted(module: str) -> bool:
        return (not inc or any(p.search(module) for p in inc)) and not any(p.search(module) for p in exc)

    # which modules a LoRA cannot carry: shape changes, changed 1-D tensors (norms, biases), embeddings; a
    # changed bias of a linear layer the LoRA targets rides along instead (PEFT's bias="lora_only")
    whole: set[str] = {m for m in modules if _matches(m, modules_to_save) and wanted(m)}
    carried: set[str] = set()  # modules whose bias is stored with their LoRA pair
    lost: dict[str, float] = {}
    resized: int | None = None
    for name in names:
        module = name.rpartition(".")[0]
        ms, bs = m_src.shape(name), b_src.shape(name)
        if ms != bs:  # only a resized vocabulary can be carried: the embeddings / head saved whole
            vocab = len(ms) == 2 and ms[1:] == bs[1:] and vocabulary(module)
            if not vocab or not wanted(module):
                why = "it is excluded" if vocab else "a LoRA cannot carry it"
                raise ModelInputError(f"tensor {name} has shape {list(ms)} in the model but {list(bs)} in the base"
                                      f"{' (a resized vocabulary)' if vocab else ''}; {why}")
            resized = ms[0]
            whole.add(module)
            continue
        if module in whole or not wanted(module):
            continue
        if len(ms) == 2 and arch is not None and arch.expert_or_router(module) and not torch.equal(
                m_src.get(name), b_src.get(name)):
            raise ModelInputError(f"tensor {name} (an expert's or router's weight of a {arch.name} model) changed; "
                                  "PEFT's LoRAs cannot target transformers' fused experts or its routers: merge the "
                                  "fine-tune as a branch instead, or leave them out with --exclude "
                                  "'experts|gate' (the adapter then lacks their change)")
        if len(ms) == 2 and (embed_lora if embedding(module) else lora_target(module)):
            continue
        mt, bt = m_src.get(name), b_src.get(name)
        if torch.equal(mt, bt):
            continue
        weight = f"{module}.weight"
        if name == f"{module}.bias" and sorted(modules[module]) == sorted([weight, name]) \
                and len(m_src.shape(weight)) == 2 and not embedding(module) and lora_target(module):
            carried.add(module)  # (stored with the pair; saved whole after all if the weight did not change)
            continue
        if skip_undecomposable:
            lost[name] = float(torch.linalg.vector_norm(mt.float() - bt.float()) /
                               torch.linalg.vector_norm(mt.float()).clamp(min=1e-30))
        else:
            whole.add(module)
    tied = not any(peft_path(n.rpartition(".")[0]) == "lm_head" for n in names)
    rows = _token_rows(m_src, b_src, modules, whole - {m for m in whole if _matches(m, modules_to_save)},
                       DTYPES[dt].itemsize, vocabulary) if token_rows else {}
    whole -= set(rows)
    # a head tied to the embeddings (no lm_head tensor): PEFT changes the embedding lookup only, so the head
    # gets the same change (saved whole, or the same LoRA pair on lm_head; trainable tokens tie on their own)
    if tied and any(embedding(m) for m in whole):
        whole.add("lm_head")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    report: dict[str, Any] = {"base": str(base), "model": str(model), "modules": {},
                              "trainable_tokens": {m: r.numel() for m, r in rows.items()},
                              "lost": lost, "resized_vocabulary": resized}
    if resized is not None:
        logger.warning("the fine-tune's vocabulary has %d entries: resize the base's embeddings to match before "
                       "loading the adapter (model.resize_token_embeddings(%d)); its tokenizer is in the adapter "
                       "folder", resized, resized)
    carried -= whole
    for name in tqdm(names, desc="extracting LoRA", disable=not progress):
        module, _, param = name.rpartition(".")
        key = f"base_model.model.{peft_path(module)}"
        if module in rows:  # PEFT's TrainableTokensLayer: the rows' new values
            tensors[f"{key}.token_adapter.trainable_tokens_delta"] = m_src.get(name)[rows[module]].to(torch_dt)
            continue
        if module in whole:
            tensors[f"{key}.{param}"] = m_src.get(name).to(torch_dt).contiguous()
            if tied and embedding(module) and param == "weight":
                tensors["base_model.model.lm_head.weight"] = tensors[f"{key}.{param}"].clone()
            continue
        if param != "weight" or len(m_src.shape(name)) != 2 or not wanted(module):
            continue
        mt, bt = m_src.get(name).float(), b_src.get(name).float()
        delta = mt - bt
        k = 0
        if delta.any():
            is_embedding = embedding(module)
            gen = torch.Generator().manual_seed(tensor_seed(0, name, "extract-lora"))
            lb, la, err = extract_lora_factors(delta, rank, sv_epsilon=sv_epsilon, target_error=target_error,
                                               exact=exact, generator=gen)  # [out, k], [k, in]
            k = la.shape[0]
        if module in carried:  # its changed bias: with the pair (bias="lora_only"), or the module whole
            if k:
                tensors[f"{key}.base_layer.bias"] = m_src.get(f"{module}.bias").to(torch_dt).contiguous()
            else:
                whole.add(module)
                carried.discard(module)
                for p in modules[module]:
                    tensors[f"{key}.{p.rpartition('.')[2]}"] = m_src.get(p).to(torch_dt).contiguous()
        if k == 0:
            continue
        if is_embedding:  # PEFT's embedding LoRA: Δ = (B A)ᵀ with lora_embedding_A [k, vocab], B [hidden, k]
            tensors[f"{key}.lora_embedding_A"] = lb.T.to(torch_dt).contiguous()
            tensors[f"{key}.lora_embedding_B"] = la.T.to(torch_dt).contiguous()
            if tied:
                tensors["base_model.model.lm_head.lora_A.weight"] = la.to(torch_dt).contiguous()
                tensors["base_model.model.lm_head.lora_B.weight"] = lb.to(torch_dt).contiguous()
                ranks["lm_head"] = k
        else:
            tensors[f"{key}.lora_A.weight"] = la.to(torch_dt).contiguous()
            tensors[f"{key}.lora_B.weight"] = lb.to(torch_dt).contiguous()
        ranks[peft_path(module)] = k
        weight_err = float(torch.linalg.vector_norm(delta - lb @ la) / torch.linalg.vector_norm(mt).clamp(min=1e-30))
        report["modules"][peft_path(module)] = {"rank": k, "rel_error_of_difference": err,
                                                "rel_error_of_weight": weight_err}
        if is_embedding and tied:
            report["modules"]["lm_head"] = dict(report["modules"][peft_path(module)])
    if not tensors:
        raise BranchmergeError(f"the model equals the base in every extracted tensor: no adapter to write "
                               f"({model} vs {base})")
    r = max(ranks.values(), default=1)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": r,
           "lora_alpha": r, "rank_pattern": {re.escape(m): k for m, k in ranks.items()},
           "alpha_pattern": {re.escape(m): k for m, k in ranks.items()},
           "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}), "lora_dropout": 0.0,
           "bias": "lora_only" if carried else "none", "fan_in_fan_out": False, "inference_mode": True,
           "modules_to_save": sorted(peft_path(m) for m in whole) or None,
           "use_rslora": False, "use_dora": False, "init_lora_weights": True}
    if rows:  # the list form for the embeddings alone, else per module (its last name part, as PEFT matches)
        short = {peft_path(m).rsplit(".", 1)[-1]: r.tolist() for m, r in rows.items()}
        only = next(iter(short.values())) if len(rows) == 1 and embedding(next(iter(rows))) else None
        cfg["trainable_token_indices"] = only if only is not None else short
    adapter_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    model_bytes = sum(_numel(m_src, n) for n in names) * torch_dt.itemsize
    report.update({"modules_to_save": sorted(peft_path(m) for m in whole), "biases_with_pairs": sorted(carried),
                   "rank": r, "dtype": dt, "adapter_bytes": adapter_bytes, "model_bytes": model_bytes,
                   "max_rel_error_of_difference": max((v["rel_error_of_difference"]
                                                       for v in report["modules"].values()), default=0.0)})
    with atomic_output_dir(out, force=force, inputs=[str(base), str(model)]) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        copy_side_files({k: v for k, v in m_src.side_files().items() if k != "generation_config.json"}, tmp)
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
    logger.info("LoRA of rank ≤ %d on %d modules (%d saved whole): %.1f MB, %.1f%% of the model; worst relative "
                "error of a difference %.3g", r, len(ranks), len(whole), adapter_bytes / 1e6,
                100 * adapter_bytes / max(model_bytes, 1), report["max_rel_error_of_difference"])
    return report


def _token_rows(m_src: ModelSource, b_src: ModelSource, modules: dict[str, list[str]], candidates: set[str],
                esize: int, vocabulary: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Of the ``candidates`` saved whole, the embeddings and heads (a ``weight`` alone, rows = vocabulary) whose
    rows that differ from the base's, and the rows the base lacks, take at most half their bytes: module → those
    rows ``[k]``."""
    out = {}
    for module in sorted(candidates):
        params = modules.get(module, [])
        if params != [f"{module}.weight"] or not vocabulary(module):
            continue
        mt = m_src.get(params[0])
        rows = changed_rows(mt, b_src.get(params[0]))
        if rows is not None and rows.numel() and patch_pays(rows.numel(), mt.shape, esize):
            out[module] = rows
    return out


def _numel(src: ModelSource, name: str) -> int:
    n = 1
    for d in src.shape(name):
        n *= d
    return n


def _model_dtype(src: ModelSource, names: list[str]) -> str:
    for name in names:
        t = src.get(name, check_finite=False)
        if t.is_floating_point():
            return dtype_name(t.dtype)
    return "float32"
