"""Baseline merges: collapse N models into one plain HF folder with a registered method, one tensor at
a time (what branchmerge exists to avoid; here to be measured against)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from branchmerge.architectures import float32_tensors
from branchmerge.common import resolve_dtype
from branchmerge.compress import tensor_seed
from branchmerge.config import MergeConfig
from branchmerge.errors import ConfigError, ModelInputError
from branchmerge.io.card import CARD, merged_card
from branchmerge.io.hf import finish_hf_shards, write_chat_template, write_hf_config
from branchmerge.io.adapters import open_model
from branchmerge.io.models import EXTRA_CONFIG_FILES, ModelSource
from branchmerge.io.writer import ShardWriter, atomic_output_dir, check_output, copy_side_files
from branchmerge.methods import METHODS
from branchmerge.methods.registry import model_weight
from branchmerge.merge.slices import sliced, whole_models
from branchmerge.merge.vocabulary import VocabularyPlan, align_rows, naming_base, plan_vocabulary

logger = logging.getLogger(__name__)


def run_baseline_merge(config: MergeConfig, out: str | Path, *, force: bool = False, progress: bool = True,
                       model_card: bool = True) -> dict:
    """Collapse the config's models into one HF folder with ``config.method``.

    Raises:
        ConfigError: unknown method, missing ``base_model`` for a method that needs one, standalone branches.
        ModelInputError: tensors missing from a model or of different shapes.
    """
    method = METHODS.get(config.method)
    if method is None or method.fn is None:
        raise ConfigError(f"unknown merge method {config.method!r}; known: {', '.join(METHODS)}")
    if any(b.standalone for b in config.branches):
        raise ConfigError(f"method {method.name!r} collapses models into one; standalone branches need method 'branch'")
    if method.needs_base and not config.base_model:
        raise ConfigError(f"method {method.name!r} needs `base_model` (the model the fine-tunes started from)")
    try:
        for sl in config.slices or [None]:
            method.check_settings({**config.parameters, **(sl.parameters if sl else {})})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    inputs = config.inputs()
    check_output(out, force=force, inputs=inputs)
    models = [open_model(b.name, b.model, b.revision, b.base, default_base=config.base_model) for b in config.branches]
    base_path = Path(config.base_model).resolve() if config.base_model else None
    takes_base = base_path is not None and (method.needs_base or method.optional_base)
    if config.slices is not None:
        jobs, hf_config = sliced(config, method, models, base_path, takes_base)
        first = models[[b.name for b in config.branches].index(config.slices[0].sources[0].branch)]
    else:
        base = None
        if takes_base:  # the base listed among the branches too is the base, no fine-tune (as mergekit's)
            models.append(ModelSource.open("base_model", config.base_model))
            base = len(models) - 1
        tuned = [i for i in range(len(config.branches))
                 if base is None or models[i].path.resolve() != models[base].path.resolve()]
        jobs = whole_models(config, method, models, tuned, base)
        first = models[tuned[0]]
        hf_config = first.hf_config
    vocab, ordered = _vocabulary(config, models) if config.tokenizer is not None or config.tokenizer_source \
        else (None, set())
    by_name = any(map(_mentions_filter, [config.parameters, *(b.parameters for b in config.branches),
                                         *(sl.parameters for sl in config.slices or []),
                                         *(src.parameters for sl in config.slices or [] for src in sl.sources)]))
    resolved: dict[tuple, dict[str, Any]] = {}
    dtype = resolve_dtype(config.dtype)
    fp32 = float32_tensors(hf_config, dtype)  # (routers transformers keeps in float32)
    with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
        writer = ShardWriter(tmp, config.max_shard_bytes, prefix="model")
        for job in tqdm(jobs, desc=f"merging ({method.name})", disable=not progress):
            ts = [models[i].get(n) for i, n in job.inputs]
            base_t = models[job.base[0]].get(job.base[1]) if job.base is not None else None
            if vocab is not None and job.out in ordered:  # embeddings, head: rows in the output's order
                named = {models[i].name: t for (i, _), t in zip(job.inputs, ts)}
                if base_t is not None:
                    named.setdefault(models[job.base[0]].name, base_t)
                lined = align_rows(vocab, named)
                ts = [lined[models[i].name] for i, _ in job.inputs]
                base_t = lined[models[job.base[0]].name] if base_t is not None else None
            for t, m in zip(ts[1:], job.models[1:]):
                if t.shape != ts[0].shape:
                    rows_only = t.dim() == 2 and t.shape[1:] == ts[0].shape[1:]
                    raise ModelInputError(f"tensor {job.inputs[0][1]} has shape {list(t.shape)} in branch {m!r} "
                                          f"but {list(ts[0].shape)} in {job.models[0]!r}" + (
                                              "; if their vocabularies differ (added tokens), `tokenizer_source: "
                                              "union` lines them up (or a branched merge keeps each branch's own)"
                                              if rows_only else ""))
            key = (job.group, job.out if by_name else "", job.t)
            if key not in resolved:
                specs = [config.branches[i] for i, _ in job.inputs]
                weights = [model_weight(p["weight"], job.out, job.t, b.weight) if "weight" in p else b.weight
                           for b, p in zip(specs, job.own)]
                resolved[key] = {"weights": weights, **method.model_params(job.shared, job.own, job.out, job.t)}
            kw: dict[str, Any] = dict(resolved[key])
            if job.base is not None:
                kw["base"] = base_t
                if kw["base"].shape != ts[0].shape:
                    raise ModelInputError(f"tensor {job.base[1]} has shape {list(kw['base'].shape)} in base_model "
                                          f"but {list(ts[0].shape)} in {job.models[0]!r}")
            if method.seeded:
                kw["generator"] = torch.Generator().manual_seed(tensor_seed(config.rsvd.seed, job.out))
            try:
                merged = method.fn(ts, **kw) if ts[0].is_floating_point() else ts[0]
            except ValueError as e:
                raise ModelInputError(f"tensor {job.out}: method {method.name!r}: {e}") from None
            if merged.is_floating_point():
                merged = merged.to(torch.float32 if fp32(job.out) else dtype)
            if any(merged.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in ts):
                merged = merged.clone()  # (an input as it is: slices may write it twice, shards must not share)
            writer.add(job.out, merged)
        writer.close()
        finish_hf_shards(tmp, writer)
        if vocab is not None:  # the merged vocabulary's tokenizer; the first model's generation config
            copy_side_files({f: p for f, p in first.side_files().items() if f in EXTRA_CONFIG_FILES}, tmp)
            vocab.tokenizer.save_pretrained(tmp)
            hf_config = {**hf_config, "vocab_size": vocab.size}
        else:
            copy_side_files(_tokenizer_source(models, first).side_files(), tmp)
        if config.chat_template is not None:
            write_chat_template(tmp, config.chat_template, [m.path for m in models])
        write_hf_config(tmp, hf_config, config.dtype)
        if model_card:
            (tmp / CARD).write_text(merged_card(Path(out).name, method.name, config.model_dump(mode="json")))
    return {"method": method.name, "out": str(out)}


def _mentions_filter(parameters: dict[str, Any]) -> bool:
    return "filter" in str(parameters)


def _tokenizer_source(models: list[ModelSource], first: ModelSource) -> ModelSource:
    """The first model, whose tokenizer the output takes when no ``tokenizer_source`` or ``tokenizer`` is given
    (mergekit's default); models whose vocabularies differ are warned about: their embeddings were merged
    entry by entry."""
    vocab = {m.name: m.vocabulary() for m in models}
    known = {k: v for k, v in vocab.items() if v is not None}
    if len(set(known.values())) > 1:
        a = first.name if first.name in known else next(iter(known))
        b = next(k for k, v in known.items() if v != known[a])
        logger.warning("the models' vocabularies differ (%r and %r have different tokenizers), so their embeddings "
                       "do not line up entry by entry; the output takes %r's tokenizer (`tokenizer_source: union` "
                       "lines them up)", a, b, first.name)
    return first


def _vocabulary(config: MergeConfig, models: list[ModelSource]) -> tuple[VocabularyPlan, set[str]]:
    """The merged vocabulary (``tokenizer_source`` or ``tokenizer``) and the tensors it orders (per-branch
    tensors whose rows are the first model's ``vocab_size``: embeddings and head)."""
    from branchmerge.architectures import for_hf_config
    from branchmerge.config import TokenizerConfig

    base = None
    if config.base_model:
        base = next((m for m in models if m.path.resolve() == Path(config.base_model).resolve()), None) \
            or ModelSource.open("base_model", config.base_model)
    named = {m.name: m for m in models}
    if base is not None:
        named.setdefault(base.name, base)
    spec = naming_base(config.tokenizer or TokenizerConfig(source=config.tokenizer_source),
                       base.name if base is not None else None)
    plan = plan_vocabulary(spec, named, base.name if base is not None else None)
    first = models[0]
    arch = for_hf_config(first.hf_config)
    rows = first.hf_config.get("vocab_size")
    ordered = {n for n in first.names() if len(sh := tuple(first.shape(n))) >= 2 and sh[0] == rows
               and arch.role(n, sh) != "compress"}
    return plan, ordered
