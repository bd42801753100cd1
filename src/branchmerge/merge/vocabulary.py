"""Baseline merges of models whose vocabularies differ (mergekit's tokenizer merge).

A baseline method merges tensors entry by entry, so the embeddings and head of models with other
tokenizers must first be lined up: :func:`plan_vocabulary` builds the output tokenizer (every model's tokens,
``union``; the base's; or one model's) and, per model, the row each output token has in it (-1 where the model
lacks the token); :func:`align_rows` then gives each model's vocabulary tensor in the output's order, a token
a model lacks taking the row of the one model that has it, the base's, their mean, or what ``tokens`` says
(another model's, another token's, zeros) — as mergekit's ``PermutedVocabulary``. Padding rows
(``pad_to_multiple_of``) are each model's mean row.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from branchmerge.config import ModelToken, TokenEmbedding, TokenizerConfig, ZeroToken
from branchmerge.errors import ConfigError, ModelInputError

logger = logging.getLogger(__name__)


@dataclass
class VocabularyPlan:
    """The output tokenizer, its row count, and per model (by name) each output token's row (-1: lacking)."""

    tokenizer: Any
    size: int
    vocab: dict[str, int]  # output token → id
    rows: dict[str, list[int]]  # model → row of each output id in that model (-1: not there)
    original: dict[str, dict[str, int]]  # model → its own token → id
    base: str | None  # the base model's name when it is among the inputs
    tokens: dict[str, TokenEmbedding]

    def embedding_sources(self, models: list[str]) -> tuple[dict[str, TokenEmbedding], set[str]]:
        """Where each token some of ``models`` lack comes from (``tokens`` first; a token only one model has:
        that model's; the base's where it has it), and the tokens to average over the models that have them."""
        sources = dict(self.tokens)
        average: set[str] = set()
        for tok, i in self.vocab.items():
            if tok in sources:
                continue
            has = [self.rows[m][i] >= 0 for m in models]
            if sum(has) == 1:
                sources[tok] = TokenEmbedding(source=models[has.index(True)])
            elif not any(has):
                sources[tok] = TokenEmbedding(source=ZeroToken(kind="zero"))
                logger.warning("token %r is in none of the models this tensor is merged from (%s); its rows are "
                               "zeros", tok, ", ".join(models))
            elif self.base in models and self.rows[self.base][i] >= 0:
                sources[tok] = TokenEmbedding(source=self.base)
            else:
                average.add(tok)
        return sources, average


def naming_base(spec: TokenizerConfig, base: str | None) -> TokenizerConfig:
    """``spec`` with its models named ``base`` (the config's word for ``base_model``) by ``base``'s own name."""
    def ref(r: str) -> str:
        return base if r == "base" and base is not None else r

    def source(e: TokenEmbedding) -> TokenEmbedding:
        src = e.source
        if isinstance(src, str):
            return e.model_copy(update={"source": ref(src)})
        if isinstance(src, ModelToken):
            return e.model_copy(update={"source": src.model_copy(update={"model": ref(src.model)})})
        return e

    return spec.model_copy(update={"source": ref(spec.source), "tokens": {t: source(e) for t, e in spec.tokens.items()}})


def _load_tokenizer(path, where: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, use_fast=True)
    except Exception as e:  # noqa: BLE001 - tokenizers fail in many ways on a bad folder
        raise ModelInputError(f"{where}: its tokenizer in {path} cannot be loaded ({type(e).__name__}: {e})") from None


def plan_vocabulary(spec: TokenizerConfig, models: dict[str, Any], base: str | None) -> VocabularyPlan:
    """The output vocabulary of ``models`` (name → :class:`~branchmerge.io.models.ModelSource`, in merge order;
    ``base``: the base model's name among them, or None) as ``spec`` asks.

    Raises:
        ModelInputError: a tokenizer that cannot be loaded, no tokenizer at all, or a base tokenizer with tokens
            past its model's ``vocab_size`` (mergekit strips them from BPE tokenizers; not done here). A model
            without tokenizer files is taken to share the base's (or the first model's) vocabulary.
        ConfigError: a ``tokens`` entry naming a token its model lacks.
    """
    toks = {n: _load_tokenizer(m.path, f"model {n!r}") for n, m in models.items() if m.vocabulary() is not None}
    if not toks:
        raise ModelInputError(f"none of the models ({', '.join(models)}) has a tokenizer to merge")
    first = base if base in toks else next(iter(toks))
    for n in models:
        if n not in toks:  # (as mergekit: a model without a tokenizer is taken to have the base's)
            logger.warning("model %r has no tokenizer; taken to share %r's vocabulary", n, first)
            toks[n] = toks[first]
    sizes = {n: m.hf_config.get("vocab_size") or len(toks[n].get_vocab()) for n, m in models.items()}
    beyond = [t for t, i in toks[first].get_vocab().items() if i >= sizes[first]]
    if beyond:
        raise ModelInputError(f"model {first!r}: its tokenizer has {len(beyond)} token(s) past its vocab_size "
                              f"{sizes[first]} (e.g. {beyond[0]!r}); merging vocabularies over it is not supported")
    if spec.source == "union":
        out = _union(first, toks, sizes)
    else:
        out = _reloaded(toks[spec.source])
    have = set(out.get_vocab())
    for t in spec.tokens:  # a token given a source is in the output, added if no model has it
        if t not in have:
            out.add_tokens(t)
            have.add(t)
    vocab = out.get_vocab()
    size = len(vocab)
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size += spec.pad_to_multiple_of - size % spec.pad_to_multiple_of
    rows = {}
    for n, tok in toks.items():
        own = tok.get_vocab()
        r = [-1] * len(vocab)
        for t, i in vocab.items():
            j = own.get(t)
            if j is not None and j < sizes[n]:
                r[i] = j
        rows[n] = r
    for t, emb in spec.tokens.items():
        src = emb.source
        if isinstance(src, ModelToken) and src.token is not None and src.token not in toks[src.model].get_vocab():
            raise ConfigError(f"tokenizer.tokens[{t!r}]: token {src.token!r} is not in model {src.model!r}'s vocabulary")
    logger.info("output vocabulary: %d tokens (%d rows) from %s", len(vocab), size, spec.source)
    return VocabularyPlan(out, size, vocab, rows, {n: t.get_vocab() for n, t in toks.items()}, base, spec.tokens)


def _reloaded(tok):
    """A copy of ``tok`` (saved and loaded again: adding tokens must not change the model's own)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return AutoTokenizer.from_pretrained(d, trust_remote_code=False, use_fast=True)


def _union(first: str, toks: dict[str, Any], sizes: dict[str, int]):
    """The base tokenizer (``first``'s) with every other model's tokens added, models in merge order: regular ones
    first, then added (special) ones with their settings (the first model's where they differ)."""
    regular: dict[str, int] = {}
    added: dict[str, Any] = {}
    base_tok = toks[first]
    for n in [first, *(m for m in toks if m != first)]:
        tok = toks[n]
        specials = tok.added_tokens_decoder
        special_text = {info.content for info in specials.values()}
        for t, i in tok.get_vocab().items():
            if i < sizes[n] and t not in special_text and t not in regular:
                regular[t] = len(regular)
        for i, info in specials.items():
            if i < sizes[n] and info.content not in added:
                added[info.content] = info
            elif i < sizes[n] and added[info.content] != info:
                logger.warning("token %r is added with different settings by %r; the first's are kept",
                               info.content, n)
    out = _reloaded(base_tok)
    known = base_tok.get_vocab()
    for t in regular:
        if t not in added and t not in known:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def align_rows(plan: VocabularyPlan, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each model's vocabulary tensor (``[V_m, ...]``, rows by its own token ids) as ``[plan.size, ...]`` rows
    in the output's token order (see the module docstring)."""
    models = list(tensors)
    shape = next(iter(tensors.values())).shape[1:]
    dtype = next(iter(tensors.values())).dtype
    for t in tensors.values():
        dtype = torch.promote_types(dtype, t.dtype)
    sources, average = plan.embedding_sources(models)
    defaults: dict[str, Tensor] = {}
    for tok, i in plan.vocab.items():
        cfg = plan.tokens.get(tok)
        if not (cfg and cfg.force) and all(plan.rows[m][i] >= 0 for m in models):
            continue
        if tok in average:
            e, count = torch.zeros(shape, dtype=dtype), 0
            for m in models:
                if plan.rows[m][i] >= 0:
                    e = e + tensors[m][plan.rows[m][i]]
                    count += 1
            defaults[tok] = e / count
        elif tok in sources:
            defaults[tok] = _default_row(plan, tensors, sources[tok], tok, i, shape, dtype)
    forced = {plan.vocab[t] for t, e in plan.tokens.items() if e.force and t in plan.vocab}
    out = {}
    for m in models:
        new = torch.zeros((plan.size, *shape), dtype=dtype)
        idx = torch.tensor(plan.rows[m], dtype=torch.long)  # [len(vocab)]
        keep = idx >= 0
        if forced:
            keep[list(forced)] = False
        ids = keep.nonzero().flatten()
        new[ids] = tensors[m][idx[ids]].to(dtype)
        for tok, i in plan.vocab.items():
            if keep[i]:
                continue
            if tok in defaults:
                new[i] = defaults[tok]
            else:
                logger.error("no row for token %r in model %r", tok, m)
        if plan.size > len(plan.vocab):
            new[len(plan.vocab):] = new[:len(plan.vocab)].mean(0)
        out[m] = new
    return out


def _default_row(plan: VocabularyPlan, tensors: dict[str, Tensor], emb: TokenEmbedding, tok: str, i: int,
                 shape: torch.Size, dtype: torch.dtype) -> Tensor:
    src = emb.source
    if isinstance(src, ZeroToken) or src is None:
        return torch.zeros(shape, dtype=dtype)
    model = src.model if isinstance(src, ModelToken) else src
    if model not in tensors:
        raise ConfigError(f"token {tok!r} takes its row from model {model!r}, which does not hold this tensor")
    if isinstance(src, ModelToken):
        j = src.token_id if src.token_id is not None else plan.original[model][src.token]
        if not 0 <= j < tensors[model].shape[0]:
            raise ConfigError(f"tokenizer.tokens[{tok!r}]: token id {j} is outside model {model!r}'s "
                              f"{tensors[model].shape[0]} rows")
        return tensors[model][j]
    j = plan.rows[model][i]
    if j < 0:
        raise ConfigError(f"tokenizer.tokens[{tok!r}]: model {model!r} does not have the token")
    return tensors[model][j]
