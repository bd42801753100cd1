"""A loaded bundle: every branch generating through ``transformers``, mixed-branch batches in one pass.

    bundle = branchmerge.load("bundle/", dtype="float32")
    bundle.generate(["2+2=", "reverse abc"], branch=["math", "strings"], max_new_tokens=8)
    with bundle.use("math") as model:          # a plain transformers model for that branch
        model.generate(**tok("2+2=", return_tensors="pt"))
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from branchmerge.errors import BranchmergeError, BranchNotFoundError
from branchmerge.io.bundle import BundleReader
from branchmerge.merge import DTYPES
from branchmerge.runtime.build import build_group_model
from branchmerge.runtime.modules import BranchedLinear, BranchState
from branchmerge.runtime.scoring import (PrefixCluster, TokenLogprobs, prefix_clusters, score_cluster, score_row,
                                         shared_lengths)

logger = logging.getLogger(__name__)


@dataclass
class _GroupRuntime:
    name: str
    model: PreTrainedModel
    state: BranchState
    standalone: bool


class Bundle:
    """Every branch of a bundle, loaded once; shared weights are held once per group."""

    def __init__(self, path: str | Path, *, device: str = "cpu", dtype: str | None = None, verify: bool = True,
                 fused: bool | None = None) -> None:
        self.reader = BundleReader(path, verify=verify)
        self.path = Path(path)
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype or self.reader.manifest["dtype"]]
        self.groups: dict[str, _GroupRuntime] = {}
        for gname, g in self.reader.groups.items():
            model, state = build_group_model(self.reader, gname, device=self.device, dtype=self.dtype, fused=fused)
            self.groups[gname] = _GroupRuntime(gname, model, state, bool(g["standalone"]))
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self._hot: set[str] = set()
        self.router = None  # set by branchmerge.router when the bundle has one

    # ---- branches ---------------------------------------------------------------------------
    @property
    def branch_names(self) -> list[str]:
        return list(self.reader.branches)

    def _group_of(self, branch: str) -> _GroupRuntime:
        self.reader.branch(branch)  # raises BranchNotFoundError listing the valid names
        return self.groups[self.reader.branches[branch]["group"]]

    def tokenizer(self, branch: str) -> PreTrainedTokenizerBase:
        self.reader.branch(branch)
        tok = self._tokenizers.get(branch)
        if tok is None:
            tok = AutoTokenizer.from_pretrained(self.reader.branch_dir(branch))
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token or tok.unk_token
            self._tokenizers[branch] = tok
        return tok

    def model(self, branch: str) -> PreTrainedModel:
        """The ``transformers`` model serving ``branch``, with that branch active.

        Branches of one group share one model object: activating one branch switches it for every
        holder. Use :meth:`use` to scope the choice.
        """
        g = self._group_of(branch)
        g.state.set_rows(None)
        g.state.active = g.state.index(branch)
        return g.model

    @contextmanager
    def use(self, branch: str) -> Iterator[PreTrainedModel]:
        g = self._group_of(branch)
        prev_active, prev_rows = g.state.active, g.state.rows
        try:
            yield self.model(branch)
        finally:
            g.state.active = prev_active
            g.state.set_rows(prev_rows)

    def materialize(self, branch: str) -> int:
        """Make ``branch`` hot: dense weights for zero overhead. Returns the extra bytes held."""
        g = self._group_of(branch)
        i = g.state.index(branch)
        extra = 0
        for m in g.model.modules():
            if isinstance(m, BranchedLinear):
                m.materialize(i)
                extra += m.hot[str(i)].numel() * m.hot[str(i)].element_size()
        self._hot.add(branch)
        return extra

    def dematerialize(self, branch: str) -> None:
        g = self._group_of(branch)
        i = g.state.index(branch)
        for m in g.model.modules():
            if isinstance(m, BranchedLinear):
                m.dematerialize(i)
        self._hot.discard(branch)

    def memory_bytes(self) -> int:
        """Bytes of every parameter and buffer held, counting shared storage once."""
        seen: set[int] = set()
        total = 0
        for g in self.groups.values():
            for t in [*g.model.parameters(), *g.model.buffers()]:
                ptr = t.untyped_storage().data_ptr()
                if ptr in seen:
                    continue
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
        return total

    # ---- forward and generation ----------------------------------------------------------------
    def resolve_branches(self, prompts: Sequence[str], branch: str | Sequence[str]) -> list[str]:
        """One branch name per prompt; ``"auto"`` asks the router."""
        names = [branch] * len(prompts) if isinstance(branch, str) else list(branch)
        if len(names) != len(prompts):
            raise BranchmergeError(f"got {len(names)} branch names for {len(prompts)} prompts")
        auto = [i for i, n in enumerate(names) if n == "auto"]
        if auto:
            if self.router is None:
                raise BranchmergeError("branch 'auto' needs a router; this bundle has none (see `branchmerge router build`)")
            picked = self.router.route([prompts[i] for i in auto])
            for i, p in zip(auto, picked):
                names[i] = p
        for n in names:
            self.reader.branch(n)
        return names

    def logits(self, input_ids: torch.Tensor, branches: Sequence[str], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One forward pass over rows of different branches of one group: ``[B, T, vocab]``."""
        g, rows = self._rows_for(branches)
        g.state.set_rows(rows)
        try:
            with torch.no_grad():
                out = g.model(input_ids=input_ids.to(self.device),
                              attention_mask=None if attention_mask is None else attention_mask.to(self.device))
            return out.logits
        finally:
            g.state.set_rows(None)

    def stop_ids(self, branch: str) -> set[int]:
        """End-of-sequence token ids of ``branch``: its tokenizer's and its generation config's."""
        ids = set()
        e = self.tokenizer(branch).eos_token_id
        if e is not None:
            ids.add(e)
        gc_eos = self._group_of(branch).model.generation_config.eos_token_id
        ids.update(gc_eos if isinstance(gc_eos, list) else [gc_eos] if gc_eos is not None else [])
        return ids

    def token_logprobs(self, ids: Sequence[int], branch: str, *, top: int = 0, greedy_next: bool = False) -> TokenLogprobs:
        """Log-probability of every token of ``ids`` given the ones before it, on ``branch``.

        The first token has no context, so its entries are None (as in OpenAI's ``echo`` responses).
        ``top`` > 0 also gives that many most likely tokens at each position, most likely first.
        ``greedy_next`` appends the most likely next token, scored by the same forward pass.
        """
        return self.token_logprobs_many([ids], [branch], top=top, greedy_next=greedy_next)[0]

    def token_logprobs_many(self, seqs: Sequence[Sequence[int]], branches: Sequence[str], *, top: int = 0,
                            greedy_next: bool = False, share_prefix: bool = True) -> list[TokenLogprobs]:
        """:meth:`token_logprobs` for several sequences, one right-padded mixed-branch forward per group.

        With ``share_prefix``, sequences of one branch that share a long prefix (a context with each of
        its answers appended) run that prefix once: its KV cache is repeated for every member and only
        the suffixes run, as one batch (see :func:`~branchmerge.runtime.scoring.prefix_clusters`).
        """
        if any(len(x) == 0 for x in seqs):
            raise BranchmergeError("token_logprobs needs at least one token per sequence")
        out: list[TokenLogprobs | None] = [None] * len(seqs)
        clusters, rest = prefix_clusters(seqs, branches) if share_prefix else ([], list(range(len(seqs))))
        by_cluster_group: dict[str, list[PrefixCluster]] = {}
        for cl in clusters:
            by_cluster_group.setdefault(self._group_of(branches[cl.members[0]]).name, []).append(cl)
        for cls in by_cluster_group.values():
            for cl, (pre, sufs) in zip(cls, self._cluster_logits(cls, seqs, branches)):
                members = [seqs[i] for i in cl.members]
                for i, sc in zip(cl.members, score_cluster(pre, sufs, members, cl.shared, top=top,
                                                           greedy_next=greedy_next)):
                    out[i] = sc
        by_group: dict[str, list[int]] = {}
        for i in rest:
            by_group.setdefault(self._group_of(branches[i]).name, []).append(i)
        for idx in by_group.values():
            width = max(len(seqs[i]) for i in idx)
            x = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, i in enumerate(idx):
                x[r, :len(seqs[i])], mask[r, :len(seqs[i])] = torch.tensor(list(seqs[i])), 1
            logits = self.logits(x, [branches[i] for i in idx], attention_mask=mask)
            for r, i in enumerate(idx):
                out[i] = score_row(logits[r, :len(seqs[i])], seqs[i], top=top, greedy_next=greedy_next)
        return [o for o in out if o is not None]

    def _cluster_logits(self, clusters: Sequence[PrefixCluster], seqs: Sequence[Sequence[int]],
                        branches: Sequence[str]) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """Logits of prefix clusters of one group: per cluster, its prefix's ``[shared, vocab]`` and each
        member's own ``[len_i − shared, vocab]``.

        Two forwards: every cluster's prefix as one batch (:meth:`_prefill_clusters`), then every member's
        suffix as one right-padded batch ``[M, S]`` over its cluster's cache row, the prefix padding
        masked and positions continuing from each prefix.
        """
        members = [i for c in clusters for i in c.members]
        local, k = [], 0  # the clusters over the member list
        for c in clusters:
            local.append(PrefixCluster(list(range(k, k + len(c.members))), c.shared))
            k += len(c.members)
        mseqs = [seqs[i] for i in members]
        g, rows = self._rows_for([branches[i] for i in members])
        cache, shared, pre_logits = self._prefill_clusters(g, local, mseqs, rows, all_logits=True)
        head, suffix = max(shared), max(len(q) - sh for q, sh in zip(mseqs, shared))
        y = torch.zeros((len(mseqs), suffix), dtype=torch.long)
        mask = torch.zeros((len(mseqs), head + suffix), dtype=torch.long)
        pos = torch.zeros((len(mseqs), suffix), dtype=torch.long)
        for m, (q, sh) in enumerate(zip(mseqs, shared)):
            y[m, :len(q) - sh] = torch.tensor(list(q[sh:]))
            mask[m, :sh], mask[m, head:head + len(q) - sh] = 1, 1
            pos[m] = sh + torch.arange(suffix)
        g.state.set_rows(rows)
        try:
            with torch.no_grad():
                post = g.model(input_ids=y.to(self.device), attention_mask=mask.to(self.device),
                               position_ids=pos.to(self.device), use_cache=True, **{_cache_arg(g.model): cache})
        finally:
            g.state.set_rows(None)
        return [(pre_logits[r, :c.shared], [post.logits[m, :len(mseqs[m]) - c.shared] for m in c.members])
                for r, c in enumerate(local)]

    min_shared_prefix = 16  # generation shares a prompt prefix of at least this many tokens

    def _prefill_clusters(self, g: _GroupRuntime, clusters: Sequence[PrefixCluster], seqs: Sequence[Sequence[int]],
                          rows: Sequence[int], *, all_logits: bool = False) -> tuple[Any, list[int], torch.Tensor]:
        """Run every cluster's shared prefix as one right-padded batch ``[C, P]`` and give each sequence its
        cluster's cache row (sequences outside a cluster get row 0, to be fully masked).

        Returns:
            The cache (one row per sequence), each sequence's cached prefix length (0 outside clusters),
            and the prefixes' logits: ``[C, P, vocab]`` with ``all_logits``, else the last position's.
        """
        width = max(c.shared for c in clusters)
        x = torch.zeros((len(clusters), width), dtype=torch.long)
        m = torch.zeros_like(x)
        owner = [0] * len(seqs)
        for r, c in enumerate(clusters):
            x[r, :c.shared], m[r, :c.shared] = torch.tensor(list(seqs[c.members[0]][:c.shared])), 1
            for i in c.members:
                owner[i] = r
        g.state.set_rows([rows[c.members[0]] for c in clusters])
        try:
            with torch.no_grad():
                pre = g.model(input_ids=x.to(self.device), attention_mask=m.to(self.device), use_cache=True,
                              logits_to_keep=0 if all_logits else 1)
        finally:
            g.state.set_rows(None)
        cache = pre[_cache_arg(g.model)]
        cache.batch_select_indices(torch.tensor(owner, device=self.device))
        return cache, shared_lengths(clusters, len(seqs)), pre.logits

    def _rows_for(self, branches: Sequence[str]) -> tuple[_GroupRuntime, list[int]]:
        groups = {self._group_of(b).name for b in branches}
        if len(groups) != 1:
            raise BranchmergeError(f"one forward pass needs branches of one group; got groups {sorted(groups)}")
        g = self.groups[groups.pop()]
        if len({self.reader.hf_config(b).get("vocab_size") for b in set(branches)}) > 1:
            raise BranchmergeError("branches with different vocabularies cannot share one batch")
        return g, [g.state.index(b) for b in branches]

    def encode(self, prompt: str, branch: str, *, chat: bool | None = None, system: str | None = None) -> list[int]:
        """Token ids of ``prompt`` for ``branch``; the chat template is used when the tokenizer has one."""
        tok = self.tokenizer(branch)
        use_chat = bool(tok.chat_template) if chat is None else chat
        if use_chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        return tok(prompt)["input_ids"]

    def check_context(self, branch: str, n_prompt: int, max_new_tokens: int) -> None:
        limit = self.reader.hf_config(branch).get("max_position_embeddings")
        if limit and n_prompt + max_new_tokens > limit:
            raise BranchmergeError(
                f"prompt of {n_prompt} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                f"{limit}-token context of branch {branch!r}"
            )

    def generate(
        self,
        prompts: str | Sequence[str],
        branch: str | Sequence[str] = "auto",
        *,
        chat: bool | None = None,
        system: str | None = None,
        max_new_tokens: int = 64,
        **generation_kwargs: Any,
    ) -> list[str]:
        """Generate a completion per prompt; rows of one group run as one mixed-branch batch.

        Args:
            prompts: one prompt or a list.
            branch: a branch name, ``"auto"`` (router), or one name per prompt.
            chat: apply the tokenizer's chat template (default: when it has one).
            generation_kwargs: passed to ``transformers``' ``generate`` (e.g. ``do_sample``).

        Returns:
            The decoded new text of each prompt, in order.
        """
        ids_list, names = self.prepare(prompts, branch, chat=chat, system=system, max_new_tokens=max_new_tokens)
        return [r.text for r in self.generate_ids(ids_list, names, max_new_tokens=max_new_tokens, **generation_kwargs)]

    def prepare(self, prompts, branch, *, chat=None, system=None, max_new_tokens=64) -> tuple[list[list[int]], list[str]]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        names = self.resolve_branches(prompts, branch)
        ids_list = [self.encode(p, b, chat=chat, system=system) for p, b in zip(prompts, names)]
        for ids, b in zip(ids_list, names):
            self.check_context(b, len(ids), max_new_tokens)
        return ids_list, names

    def generate_ids(self, ids_list: list[list[int]], names: list[str], *, max_new_tokens: int = 64,
                     share_prefix: bool = True, **generation_kwargs: Any) -> list[GenerationResult]:
        """Generate from token ids; returns per row the new ids, text, branch and stop reason.

        With ``share_prefix``, rows of one branch whose prompts share a long prefix (a system prompt, or
        ``n`` samples of one prompt) prefill it once: the prefixes run as one batch, each row takes its
        prefix's KV cache row, and ``generate`` runs only the rest (padding between the two is masked).
        """
        results: list[GenerationResult | None] = [None] * len(ids_list)
        by_group: dict[str, list[int]] = {}
        for i, b in enumerate(names):
            by_group.setdefault(self._group_of(b).name, []).append(i)
        for gname, idx in by_group.items():
            g, rows = self._rows_for([names[i] for i in idx])
            tok = self.tokenizer(names[idx[0]])
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            seqs = [ids_list[i] for i in idx]
            cache, shared = None, [0] * len(seqs)
            # beam search and num_return_sequences expand the batch inside generate, past a given cache; a
            # caller's own cache (or cache kind) is left alone
            expands = max(generation_kwargs.get("num_beams") or 1, generation_kwargs.get("num_return_sequences") or 1) > 1
            own_cache = any(k in generation_kwargs for k in ("past_key_values", "cache", "cache_implementation"))
            if share_prefix and not expands and not own_cache:
                clusters, _ = prefix_clusters(seqs, [names[i] for i in idx], min_shared=self.min_shared_prefix)
                sh = shared_lengths(clusters, len(seqs))
                # positions computed: the prefix batch plus every row's own part, against every full row
                cost = len(clusters) * max(sh) + len(seqs) * max(len(q) - k for q, k in zip(seqs, sh))
                if clusters and cost < 0.8 * len(seqs) * max(map(len, seqs)):
                    cache, shared, _ = self._prefill_clusters(g, clusters, seqs, rows)
            head = max(shared)  # cached prefix columns, right-padded; then each row's own tokens, left-padded
            width = head + max(len(q) - sh for q, sh in zip(seqs, shared))
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, (q, sh) in enumerate(zip(seqs, shared)):
                input_ids[r, :sh], mask[r, :sh] = torch.tensor(q[:sh], dtype=torch.long), 1
                input_ids[r, width - len(q) + sh:] = torch.tensor(q[sh:], dtype=torch.long)
                mask[r, width - len(q) + sh:] = 1
            if cache is not None:
                generation_kwargs = {**generation_kwargs, _cache_arg(g.model): cache}
            eos = set().union(*(self.stop_ids(b) for b in {names[i] for i in idx}))
            kwargs = {"do_sample": False, "pad_token_id": pad, "eos_token_id": sorted(eos) or None, **generation_kwargs}
            if not kwargs.get("do_sample"):
                kwargs.setdefault("temperature", None)
                kwargs.setdefault("top_p", None)
                kwargs.setdefault("top_k", None)
            g.state.set_rows(rows)
            try:
                with torch.no_grad():
                    out = g.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                           max_new_tokens=max_new_tokens, **kwargs)
            finally:
                g.state.set_rows(None)
            for r, i in enumerate(idx):
                new = out[r, width:].tolist()
                reason, stop_id = "length", None
                for j, t in enumerate(new):
                    if t in eos:
                        new, reason, stop_id = new[:j], "stop", t
                        break
                text = self.tokenizer(names[i]).decode(new, skip_special_tokens=True)
                results[i] = GenerationResult(names[i], ids_list[i], new, text, reason, stop_id)
        return [r for r in results if r is not None]


@dataclass
class GenerationResult:
    branch: str
    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    finish_reason: str  # "stop" or "length"
    stop_id: int | None = None  # the end-of-sequence token that ended it (not in new_ids)


def _cache_arg(model: PreTrainedModel) -> str:
    """The name of the KV-cache argument and output of ``model``: ``past_key_values``, renamed ``cache``
    in transformers 5.2x."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def load(path: str | Path, *, device: str = "cpu", dtype: str | None = None, verify: bool = True,
         router=None, fused: bool | None = None) -> Bundle:
    """Load a bundle: one model per group with branched layers, standalone branches as their own models.

    Args:
        router: optional :class:`~branchmerge.router.RouterConfig` replacing the stored one (its embedder
            and template must be those the stored sample embeddings were made with).
        fused: kernel layout of the branched layers. True stores ``W̄`` and every ``V_i`` as one weight, so
            a layer is two GEMMs (fewer launches: the GPU's choice); False keeps them apart, so one branch
            reads only its own factors (fewer bytes: the CPU's choice). None picks by device.

    Raises:
        BundleError: not a bundle, unknown format version, a shard failing its sha256, or a router
            whose stored embeddings do not match the embedder/template.
    """
    from branchmerge.router import attach_router

    bundle = Bundle(path, device=device, dtype=dtype, verify=verify, fused=fused)
    attach_router(bundle, router)
    return bundle


__all__ = ["Bundle", "GenerationResult", "load", "BranchNotFoundError"]
