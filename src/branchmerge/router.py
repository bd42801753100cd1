"""The training-free router: template-phrase embeddings of a decoder LM, cosine to stored samples.

A decoder-only LM reads ``"{input}.\\n Let's think about what task these questions belong to. These
questions belong to the field of"``; the hidden states of the tokens of the final phrase (``These
questions belong to the field of``), pooled over the attention mask and L2-normalized, embed the
question. A few representative samples per branch are embedded ahead of time and stored in the bundle
with a fingerprint of the embedder and template; a question goes to the branch of its best match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from branchmerge.config import read_yaml, validate
from branchmerge.errors import BundleError, ConfigError

if TYPE_CHECKING:
    from branchmerge.runtime.bundle import Bundle

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
    batch_size: int = Field(default=16, ge=1)

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
                 pooling: str = "mean", layer: int = -1, batch_size: int = 16) -> None:
        self.model, self.tok = model, tokenizer
        self.template, self.phrase, self.pooling, self.layer = template, phrase, pooling, layer
        self.batch_size = batch_size
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token or self.tok.unk_token

    def _spans(self, inputs: Sequence[str], templated: bool) -> tuple[list[str], list[tuple[int, int]]]:
        texts, spans = [], []
        for q in inputs:
            if not q.strip():
                raise ConfigError("cannot route an empty question")
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
            enc = self.tok(texts, return_tensors="pt", padding=True, return_offsets_mapping=True)
            offsets = enc.pop("offset_mapping")
            attn = enc["attention_mask"]
            mask = phrase_mask(offsets, spans) & attn.bool()
            if not bool(mask.any(1).all()):
                raise ConfigError("the phrase produced no tokens for some input; check `phrase`/`template`")
            # positions count real tokens only, so left and right padding embed alike
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            hs = self.model(input_ids=enc["input_ids"].to(device), attention_mask=attn.to(device),
                            position_ids=pos.to(device), output_hidden_states=True).hidden_states
            for how, layer in combos:
                out[(how, layer)].append(pool(hs[layer], mask.to(device), how).cpu())
        return {c: torch.cat(v) for c, v in out.items()}


# ---- stored router ------------------------------------------------------------------------------
def _fingerprint(identity: dict[str, Any], cfg: RouterConfig) -> str:
    payload = {"embedder": identity, "template": cfg.template, "phrase": cfg.phrase, "pooling": cfg.pooling,
               "layer": cfg.layer}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _folder_identity(path: Path) -> dict[str, Any]:
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return {"folder": h.hexdigest()}


class Router:
    """A router bound to a bundle: embeds questions and picks a branch name."""

    def __init__(self, bundle: Bundle, cfg: RouterConfig, sample_embs: Tensor, sample_branch: Tensor) -> None:
        self.bundle, self.cfg = bundle, cfg
        self.branches = bundle.branch_names
        self.sample_embs, self.sample_branch = sample_embs, sample_branch

    def scores(self, questions: Sequence[str]) -> tuple[list[str], Tensor]:
        """Branch name per question and the ``[Q, B]`` per-branch scores (columns in bundle order)."""
        q = embed_with(self.bundle, self.cfg, list(questions))
        fb = self.branches.index(self.cfg.fallback) if self.cfg.fallback else None
        choice, scores = route(q, self.sample_embs, self.sample_branch, len(self.branches),
                               aggregate=self.cfg.aggregate, top_k=self.cfg.top_k,
                               threshold=self.cfg.threshold, fallback=fb)
        return [self.branches[i] for i in choice.tolist()], scores

    def route(self, questions: Sequence[str]) -> list[str]:
        return self.scores(questions)[0]


def _embedder_for(bundle: Bundle, cfg: RouterConfig):
    """(model context manager, tokenizer, identity) of the configured embedder."""
    from contextlib import nullcontext

    name = cfg.embedder or bundle.branch_names[0]
    if name in bundle.branch_names:
        ident = {"bundle_branch": name, "shards": sorted(bundle.reader.manifest["shards"].values())}
        return bundle.use(name), bundle.tokenizer(name), ident
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ConfigError(f"router embedder {name!r} is neither a branch of the bundle "
                          f"({', '.join(bundle.branch_names)}) nor an HF model folder")
    cache = getattr(bundle, "_router_models", {})
    if name not in cache:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cache[name] = (AutoModelForCausalLM.from_pretrained(path, dtype=bundle.dtype).eval().to(bundle.device),
                       AutoTokenizer.from_pretrained(path))
        bundle._router_models = cache
    model, tok = cache[name]
    return nullcontext(model), tok, _folder_identity(path)


def embed_with(bundle: Bundle, cfg: RouterConfig, texts: Sequence[str], *, templated: bool = True) -> Tensor:
    ctx, tok, _ = _embedder_for(bundle, cfg)
    with ctx as model:
        emb = Embedder(model, tok, template=cfg.template, phrase=cfg.phrase, pooling=cfg.pooling,
                       layer=cfg.layer, batch_size=cfg.batch_size)
        return emb.embed(texts, templated=templated)


def build_router(bundle: Bundle, cfg: RouterConfig) -> Router:
    """Embed every sample once, store them in ``BUNDLE/router/`` (atomically) and attach the router.

    Raises:
        ConfigError: samples for a branch the bundle lacks, or a branch with no samples.
    """
    unknown = [b for b in cfg.samples if b not in bundle.branch_names]
    if unknown:
        raise ConfigError(f"router samples name unknown branch(es) {unknown}; the bundle has: "
                          f"{', '.join(bundle.branch_names)}")
    missing = [b for b in bundle.branch_names if b not in cfg.samples]
    if missing:
        raise ConfigError(f"branch(es) {missing} have no router samples; give each branch at least one")
    if cfg.fallback is not None and cfg.fallback not in bundle.branch_names:
        raise ConfigError(f"router fallback {cfg.fallback!r} is not a branch ({', '.join(bundle.branch_names)})")
    texts, ids = [], []
    for b, qs in cfg.samples.items():
        texts += qs
        ids += [bundle.branch_names.index(b)] * len(qs)
    embs = embed_with(bundle, cfg, texts)
    _, _, ident = _embedder_for(bundle, cfg)
    from safetensors.torch import save_file

    final = bundle.path / ROUTER_DIR
    tmp = bundle.path / f".{ROUTER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({"embeddings": embs.contiguous(), "branch": torch.tensor(ids)}, str(tmp / "samples.safetensors"))
    (tmp / "router.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    (tmp / "meta.json").write_text(json.dumps({"fingerprint": _fingerprint(ident, cfg), "embedder": ident,
                                               "branches": bundle.branch_names}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    router = Router(bundle, cfg, embs, torch.tensor(ids))
    bundle.router = router
    logger.info("router built: %d samples over %d branches", len(texts), len(cfg.samples))
    return router


def attach_router(bundle: Bundle, override: RouterConfig | None = None) -> Router | None:
    """Load ``BUNDLE/router/`` if present, checking the stored fingerprint against the embedder.

    Args:
        override: use this embedder/template/decision config instead of the stored one; its
            embedding settings must match those the samples were embedded with.

    Raises:
        BundleError: the stored embeddings were made with another embedder or template.
    """
    folder = bundle.path / ROUTER_DIR
    if not (folder / "meta.json").is_file():
        if override is not None:
            raise BundleError(f"bundle {bundle.path} has no router; build one with `branchmerge router build`")
        return None
    from safetensors.torch import load_file

    cfg = override or RouterConfig.model_validate(yaml.safe_load((folder / "router.yaml").read_text()))
    meta = json.loads((folder / "meta.json").read_text())
    _, _, ident = _embedder_for(bundle, cfg)
    if _fingerprint(ident, cfg) != meta["fingerprint"]:
        raise BundleError(
            f"router in {folder} was built with another embedder or template than the one configured now "
            f"(stored embedder {meta['embedder'].get('bundle_branch', 'folder')}); rebuild it with "
            "`branchmerge router build`"
        )
    if meta["branches"] != bundle.branch_names:
        raise BundleError(f"router in {folder} was built for branches {meta['branches']}, bundle has {bundle.branch_names}")
    t = load_file(str(folder / "samples.safetensors"))
    bundle.router = Router(bundle, cfg, t["embeddings"], t["branch"])
    return bundle.router
