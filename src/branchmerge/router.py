"""The training-free router: template-phrase embeddings of a decoder LM, cosine to stored samples.

A decoder-only LM reads ``"{input}.\\n Let's think about what task these questions belong to. These
questions belong to the field of"``; the hidden states of the tokens of the final phrase (``These
questions belong to the field of``), pooled over the attention mask and L2-normalized, embed the
question. A few representative samples per branch are embedded ahead of time and stored in the bundle
with a fingerprint of the embedder and template; a question goes to the branch of its best match.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from branchmerge.config import read_yaml, safe_load, validate
from branchmerge.errors import BundleError, ConfigError
from branchmerge.io.writer import atomic_output_dir
from branchmerge.runtime.text import ensure_pad_token, pad_rows

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = (
    "{input}.\n Let's think about what task these questions belong to. These questions belong to the field of"
)
DEFAULT_PHRASE = "These questions belong to the field of"
ROUTER_DIR = "router"


class RouterConfig(BaseModel):
    """Samples per branch and how questions are embedded and matched."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    samples: dict[str, list[str]] = Field(description="Representative questions per branch name.")
    embedder: str | None = Field(
        default=None, description="A branch of the bundle, or an HF causal-LM folder; default: the first branch."
    )
    template: str = DEFAULT_TEMPLATE
    phrase: str = DEFAULT_PHRASE
    pooling: Literal["mean", "last"] = "mean"
    layer: int = Field(default=-1, description="Hidden-state layer (-1 = last; 0 = embeddings).")
    aggregate: Literal["max", "mean"] = Field(default="max", description="Per-branch score from its samples.")
    top_k: int = Field(default=1, ge=1, description="Samples per branch averaged when aggregate is mean.")
    threshold: float | None = Field(default=None, description="Below this best score, use `fallback`.")
    fallback: str | None = None
    batch_size: int = Field(default=16, ge=1, le=1024)
    max_input_chars: int = Field(
        default=2000, ge=1, description="Longer questions are cut to this many characters before embedding "
        "(the field of a question shows early; a 1 MB prompt must not hold the router for minutes)."
    )
    cache_size: int = Field(
        default=1024, ge=0, le=1_000_000, description="Routed questions remembered (least recently used "
        "dropped first): a repeated question, or a pipeline's next `auto` stage, is not embedded again. 0: off."
    )

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        if "{input}" not in v:
            raise ValueError("`template` must contain the placeholder {input}")
        return v

    @model_validator(mode="after")
    def _check(self) -> RouterConfig:
        if not self.phrase.strip():
            raise ValueError("`phrase` must not be empty")
        if self.phrase not in self.template.replace("{input}", ""):
            raise ValueError(f"`phrase` {self.phrase!r} does not occur in `template` {self.template!r}")
        if not self.samples:
            raise ValueError("`samples` must list at least one branch")
        for b, qs in self.samples.items():
            if not qs:
                raise ValueError(f"branch {b!r} has no samples: give it at least one representative question")
            for q in qs:
                if not q.strip():
                    raise ValueError(f"branch {b!r} has an empty sample")
        if self.threshold is not None and self.fallback is None:
            raise ValueError("`threshold` needs a `fallback` branch")
        return self


def load_router_config(path: str | Path) -> RouterConfig:
    """Read a router YAML (its top level, or a ``router:`` section of a larger file)."""
    data = read_yaml(path, "router config")
    if isinstance(data, dict) and "router" in data and "samples" not in data:
        data = data["router"]
    return validate(RouterConfig, data, str(path))


# ---- pure decision ------------------------------------------------------------------------------
def route(
    query_embs: Tensor,
    sample_embs: Tensor,
    sample_branch: Tensor,
    n_branches: int,
    *,
    aggregate: str = "max",
    top_k: int = 1,
    threshold: float | None = None,
    fallback: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Pick a branch per query by cosine similarity to the samples.

    Args:
        query_embs: ``[Q, H]`` L2-normalized query embeddings.
        sample_embs: ``[S, H]`` L2-normalized sample embeddings.
        sample_branch: ``[S]`` branch index of each sample.
        n_branches: number of branches ``B``.
        aggregate: ``max`` (best sample) or ``mean`` (of each branch's ``top_k`` best samples).
        threshold: below this best score the query goes to ``fallback``.

    Returns:
        ``(branch [Q], scores [Q, B])``; a branch without samples scores ``-inf``.
    """
    sims = query_embs.float() @ sample_embs.float().T  # [Q, S]
    scores = torch.full((sims.shape[0], n_branches), float("-inf"))
    for b in range(n_branches):
        cols = sims[:, sample_branch == b]  # [Q, S_b]
        if cols.shape[1] == 0:
            continue
        if aggregate == "max":
            scores[:, b] = cols.max(dim=1).values
        else:
            k = min(top_k, cols.shape[1])
            scores[:, b] = cols.topk(k, dim=1).values.mean(dim=1)
    best = scores.max(dim=1)
    choice = best.indices
    if threshold is not None and fallback is not None:
        choice = torch.where(best.values < threshold, torch.full_like(choice, fallback), choice)
    return choice, scores


# ---- embedding ----------------------------------------------------------------------------------
def phrase_mask(offsets: Tensor, spans: list[tuple[int, int]]) -> Tensor:
    """Which tokens overlap each row's character span: ``offsets`` ``[B, T, 2]`` → mask ``[B, T]``."""
    starts = torch.tensor([s for s, _ in spans]).view(-1, 1)
    ends = torch.tensor([e for _, e in spans]).view(-1, 1)
    tok_s, tok_e = offsets[..., 0], offsets[..., 1]
    return (tok_e > starts) & (tok_s < ends) & (tok_e > tok_s)


def pool(hidden: Tensor, mask: Tensor, how: str) -> Tensor:
    """Pool ``hidden`` ``[B, T, H]`` over ``mask`` ``[B, T]`` (padding is never in the mask); L2-normalize."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    if how == "mean":
        out = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    else:  # last token of the mask
        idx = (mask.long() * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
        out = hidden[torch.arange(hidden.shape[0]), idx]
    return torch.nn.functional.normalize(out.float(), dim=-1)


class Embedder:
    """Embeds questions with a causal LM: the template phrase (or the whole input) pooled."""

    def __init__(self, model, tokenizer, *, template: str = DEFAULT_TEMPLATE, phrase: str = DEFAULT_PHRASE,
                 pooling: str = "mean", layer: int = -1, batch_size: int = 16, max_input_chars: int = 2000,
                 select: Callable[[], AbstractContextManager] | None = None) -> None:
        """``select``, when given, is entered around each forward (a bundle branch selects itself)."""
        self.model, self.tok = model, ensure_pad_token(tokenizer)
        self.template, self.phrase, self.pooling, self.layer = template, phrase, pooling, layer
        self.batch_size, self.max_input_chars = batch_size, max_input_chars
        self.select = select or nullcontext
        # only hidden states are used: the LM head over every position (a [N, T, vocab] tensor) is skipped
        # where the model's forward can be told so
        params = inspect.signature(model.forward).parameters if hasattr(model, "forward") else {}
        self._few_logits = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if isinstance(n_layers, int) and not -(n_layers + 1) <= layer <= n_layers:
            raise ConfigError(f"router `layer` {layer} is out of range: the embedder has {n_layers} layers, so "
                              f"hidden states {-(n_layers + 1)}..{n_layers} (-1 = last, 0 = embeddings)")

    @classmethod
    def from_config(cls, model, tokenizer, cfg: RouterConfig, select=None) -> Embedder:
        return cls(model, tokenizer, template=cfg.template, phrase=cfg.phrase, pooling=cfg.pooling, layer=cfg.layer,
                   batch_size=cfg.batch_size, max_input_chars=cfg.max_input_chars, select=select)

    def _spans(self, inputs: Sequence[str], templated: bool) -> tuple[list[str], list[tuple[int, int]]]:
        texts, spans = [], []
        for q in inputs:
            if not q.strip():
                raise ConfigError("cannot route an empty question")
            q = q[:self.max_input_chars]
            if templated:
                t = self.template.replace("{input}", q)
                start = t.rfind(self.phrase)
                spans.append((start, start + len(self.phrase)))
            else:
                t = q
                spans.append((0, len(q)))
            texts.append(t)
        return texts, spans

    @torch.no_grad()
    def embed(self, inputs: Sequence[str], *, templated: bool = True) -> Tensor:
        """``[N, H]`` L2-normalized embeddings; ``templated=False`` pools the input alone (baseline)."""
        return self.embed_many(inputs, [(self.pooling, self.layer)], templated=templated)[(self.pooling, self.layer)]

    @torch.no_grad()
    def embed_many(self, inputs: Sequence[str], combos: Sequence[tuple[str, int]], *,
                   templated: bool = True) -> dict[tuple[str, int], Tensor]:
        """Embeddings for several ``(pooling, layer)`` settings from one forward pass per batch."""
        if not self.tok.is_fast:
            raise ConfigError("the router embedder needs a fast tokenizer (tokenizer.json) for token offsets")
        out: dict[tuple[str, int], list[Tensor]] = {c: [] for c in combos}
        device = next(self.model.parameters()).device
        for i in range(0, len(inputs), self.batch_size):
            texts, spans = self._spans(inputs[i:i + self.batch_size], templated)
            # unpadded, then padded here: asking the tokenizer to pad switches padding on in its shared Rust
            # state, and a request encoding with it on another thread at that moment switches it off again
            enc = self.tok(texts, return_offsets_mapping=True)
            ids, attn = pad_rows(enc["input_ids"], pad=self.tok.pad_token_id or 0)
            offsets = torch.zeros(*ids.shape, 2, dtype=torch.long)  # padding: (0, 0), in no span
            for r, o in enumerate(enc["offset_mapping"]):
                if o:
                    offsets[r, :len(o)] = torch.tensor(o, dtype=torch.long)
            mask = phrase_mask(offsets, spans) & attn.bool()
            if not bool(mask.any(1).all()):
                raise ConfigError("the phrase produced no tokens for some input; check `phrase`/`template`")
            # positions count real tokens only, so left and right padding embed alike
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            with self.select():
                hs = self.model(input_ids=ids.to(device), attention_mask=attn.to(device),
                                position_ids=pos.to(device), output_hidden_states=True, **self._few_logits
                                ).hidden_states
            for how, layer in combos:
                out[(how, layer)].append(pool(hs[layer], mask.to(device), how).cpu())
        return {c: torch.cat(v) for c, v in out.items()}


# ---- stored router ------------------------------------------------------------------------------
def _fingerprint(identity: dict[str, Any], cfg: RouterConfig) -> str:
    payload = {"embedder": identity, "template": cfg.template, "phrase": cfg.phrase, "pooling": cfg.pooling,
               "layer": cfg.layer}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def folder_identity(path: Path) -> dict[str, Any]:
    """Identity of an HF model folder used as embedder: sha256 over its config and every weight file,
    whole (a change anywhere in the weights changes it)."""
    from branchmerge.io.writer import sha256_file

    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return {"folder": h.hexdigest()}


# (embedder, identity) for a router config: supplied by the front end, which knows the bundle
EmbedderFactory = Callable[["RouterConfig"], tuple[Embedder, dict[str, Any]]]


class Router:
    """Embeds questions and picks one of ``branches`` (by name) for each."""

    def __init__(self, cfg: RouterConfig, embedder: Embedder, branches: Sequence[str], sample_embs: Tensor,
                 sample_branch: Tensor) -> None:
        self.cfg, self.embedder = cfg, embedder
        # (branches, [S, H] sample embeddings, [S] their branch ids): replaced whole when a branch joins or leaves
        self._table: tuple[list[str], Tensor, Tensor] = (list(branches), sample_embs, sample_branch)
        # question (as embedded: cut to max_input_chars) -> (branch index, [B] scores); least recent first
        self._cache: OrderedDict[str, tuple[int, Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.embedded = 0  # questions embedded so far (cache misses)

    @property
    def branches(self) -> list[str]:
        return self._table[0]

    @property
    def sample_embs(self) -> Tensor:
        return self._table[1]

    @property
    def sample_branch(self) -> Tensor:
        return self._table[2]

    def add_branch(self, name: str, samples: Sequence[str]) -> None:
        """Route to ``name`` too, by its ``samples`` embedded now (a branch added at runtime, such as a loaded
        adapter); the remembered routes are forgotten.

        Raises:
            ValueError: ``name`` is routed already, or no samples.
        """
        if not samples:
            raise ValueError(f"branch {name!r} needs at least one router sample")
        embs = self.embedder.embed(list(samples))  # [S, H]
        with self._lock:
            branches, e, ids = self._table
            if name in branches:
                raise ValueError(f"the router routes to {name!r} already")
            self._table = ([*branches, name], torch.cat([e, embs.to(e)]),
                           torch.cat([ids, torch.full((len(samples),), len(branches), dtype=ids.dtype)]))
            self._cache.clear()

    def remove_branch(self, name: str) -> None:
        """Stop routing to ``name`` (added by :meth:`add_branch`, or any other but the fallback); the remembered
        routes are forgotten. Nothing happens when it is not routed to."""
        with self._lock:
            branches, e, ids = self._table
            if name not in branches:
                return
            if name == self.cfg.fallback or len(branches) == 1:
                raise ValueError(f"branch {name!r} is the router's fallback or its only branch")
            i = branches.index(name)
            keep = ids != i
            self._table = ([b for b in branches if b != name], e[keep], ids[keep] - (ids[keep] > i).to(ids.dtype))
            self._cache.clear()

    def scores(self, questions: Sequence[str]) -> tuple[list[str], Tensor]:
        """Branch name per question and the ``[Q, B]`` per-branch scores (columns in ``branches`` order).

        Questions seen recently (up to ``cache_size``) are answered from memory; the others, each distinct
        one once, are embedded in one pass."""
        keys = [q[:self.cfg.max_input_chars] for q in questions]
        with self._lock:
            table = self._table  # (one table for the whole call: a branch may join or leave meanwhile)
            known = {k: self._cache[k] for k in keys if k in self._cache}
            for k in known:
                self._cache.move_to_end(k)
        branches, embs, ids = table
        new = list(dict.fromkeys(k for k in keys if k not in known))
        if new:
            fb = branches.index(self.cfg.fallback) if self.cfg.fallback else None
            choice, scores = route(self.embedder.embed(new), embs, ids, len(branches), aggregate=self.cfg.aggregate,
                                   top_k=self.cfg.top_k, threshold=self.cfg.threshold, fallback=fb)
            fresh = {k: (int(c), s.clone()) for k, c, s in zip(new, choice.tolist(), scores)}
            known.update(fresh)
            with self._lock:
                self.embedded += len(new)
                if self._table is table:  # (else these indices are of a table that is gone)
                    for k, v in fresh.items():
                        self._cache[k] = v
                    while len(self._cache) > self.cfg.cache_size:
                        self._cache.popitem(last=False)
        got = [known[k] for k in keys]
        rows = torch.stack([s for _, s in got]) if got else torch.zeros(0, len(branches))
        return [branches[c] for c, _ in got], rows

    def route(self, questions: Sequence[str]) -> list[str]:
        return self.scores(questions)[0]

    def cached(self, question: str) -> str | None:
        """The branch ``question`` was routed to, if the router still remembers it (no forward; None else)."""
        key = question[:self.cfg.max_input_chars]
        with self._lock:
            hit = self._cache.get(key)
            if hit is None:
                return None
            self._cache.move_to_end(key)
            return self._table[0][hit[0]]


def build_router(folder: Path, branches: Sequence[str], cfg: RouterConfig, make_embedder: EmbedderFactory) -> Router:
    """Embed every sample once and store them in ``folder`` (written atomically).

    Raises:
        ConfigError: samples for a branch not in ``branches``, a branch with no samples, a bad fallback.
    """
    branches = list(branches)
    unknown = [b for b in cfg.samples if b not in branches]
    if unknown:
        raise ConfigError(f"router samples name unknown branch(es) {unknown}; the bundle has: {', '.join(branches)}")
    missing = [b for b in branches if b not in cfg.samples]
    if missing:
        raise ConfigError(f"branch(es) {missing} have no router samples; give each branch at least one")
    if cfg.fallback is not None and cfg.fallback not in branches:
        raise ConfigError(f"router fallback {cfg.fallback!r} is not a branch ({', '.join(branches)})")
    texts, ids = [], []
    for b, qs in cfg.samples.items():
        texts += qs
        ids += [branches.index(b)] * len(qs)
    embedder, ident = make_embedder(cfg)
    embs = embedder.embed(texts)
    from safetensors.torch import save_file

    with atomic_output_dir(folder, force=True, owned_only=False) as tmp:
        save_file({"embeddings": embs.contiguous(), "branch": torch.tensor(ids)}, str(tmp / "samples.safetensors"))
        (tmp / "router.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        (tmp / "meta.json").write_text(json.dumps({"fingerprint": _fingerprint(ident, cfg), "embedder": ident,
                                                   "branches": branches}, indent=2))
    logger.debug("router built: %d samples over %d branches", len(texts), len(cfg.samples))
    return Router(cfg, embedder, branches, embs, torch.tensor(ids))


def load_router(folder: Path, branches: Sequence[str], make_embedder: EmbedderFactory,
                override: RouterConfig | None = None) -> Router | None:
    """The router stored in ``folder`` (None when there is none), its fingerprint checked against the
    embedder it would use now.

    Args:
        override: use this embedder/template/decision config instead of the stored one; its
            embedding settings must match those the samples were embedded with.

    Raises:
        BundleError: the stored embeddings were made with another embedder or template, for other
            branches, or the stored files are malformed.
    """
    if not (folder / "meta.json").is_file():
        if override is not None:
            raise BundleError(f"{folder.parent} has no router; build one with `branchmerge router build`")
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        cfg = override or validate(RouterConfig, safe_load((folder / "router.yaml").read_text()),
                                   str(folder / "router.yaml"))
        meta = json.loads((folder / "meta.json").read_text())
        fingerprint, stored_branches = meta["fingerprint"], meta["branches"]
    except (OSError, yaml.YAMLError, json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
        raise BundleError(f"router in {folder} is unreadable: {e}") from None
    embedder, ident = make_embedder(cfg)
    if _fingerprint(ident, cfg) != fingerprint:
        stored = meta.get("embedder", {})
        raise BundleError(
            f"router in {folder} was built with another embedder or template than the one configured now "
            f"(stored embedder {stored.get('bundle_branch', 'folder') if isinstance(stored, dict) else '?'}); "
            "rebuild it with `branchmerge router build`"
        )
    if stored_branches != list(branches):
        raise BundleError(f"router in {folder} was built for branches {stored_branches}, bundle has {list(branches)}")
    try:
        t = load_file(str(folder / "samples.safetensors"))
        embs, ids = t["embeddings"], t["branch"].long()
    except (OSError, SafetensorError, KeyError) as e:
        raise BundleError(f"router in {folder}: samples.safetensors is unreadable: {e}") from None
    if embs.ndim != 2 or ids.shape != (embs.shape[0],) or (ids.numel() and not 0 <= int(ids.min()) <= int(ids.max())
                                                             < len(stored_branches)):
        raise BundleError(f"router in {folder}: samples.safetensors does not match its branches")
    width = getattr(getattr(embedder.model, "config", None), "hidden_size", None)
    if isinstance(width, int) and embs.shape[1] != width:
        raise BundleError(f"router in {folder}: samples.safetensors holds {embs.shape[1]}-wide embeddings; its "
                          f"embedder's hidden states are {width} wide")
    if not embs.is_floating_point() or not bool(torch.isfinite(embs).all()):
        raise BundleError(f"router in {folder}: samples.safetensors `embeddings` must be finite floating-point values")
    return Router(cfg, embedder, branches, embs.float(), ids)
