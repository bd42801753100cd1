"""A loaded bundle: every branch generating through ``transformers``, mixed-branch batches in one pass.

    bundle = branchmerge.load("bundle/", dtype="float32")
    bundle.generate(["2+2=", "reverse abc"], branch=["math", "strings"], max_new_tokens=8)
    with bundle.use("math") as model:          # a plain transformers model for that branch
        model.generate(**tok("2+2=", return_tensors="pt"))
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from branchmerge.architectures import registry
from branchmerge.common import resolve_device, resolve_dtype
from branchmerge.errors import BranchmergeError, BranchNotFoundError, BundleError
from branchmerge.io.bundle import BundleReader
from branchmerge.runtime import adapters
from branchmerge.runtime.adapters import LoadedAdapter, Prepared
from branchmerge.runtime.build import Unmixable, build_group_model
from branchmerge.runtime.generation import BatchGeneration, GenerationResult, cache_arg
from branchmerge.runtime.modules import BranchedLinear, BranchState
from branchmerge.runtime.siblings import group_siblings
from branchmerge.runtime.scoring import (PrefixCluster, TokenLogprobs, prefix_clusters, score_cluster, score_row,
                                         shared_lengths)
from branchmerge.runtime.text import encode_messages, ensure_pad_token, pad_rows

logger = logging.getLogger(__name__)


@dataclass
class _GroupRuntime:
    name: str
    model: PreTrainedModel
    state: BranchState
    standalone: bool


class WeightsLock:
    """A reentrant lock around the weights of a running bundle (a server's engine holds it per generation
    segment; ``materialize``, ``load_lora`` and ``unload_lora`` take it to change them). A loop that takes it
    again right after releasing it would keep a waiting thread out for as long as traffic lasts (a lock has
    no queue); such a loop calls :meth:`let_waiters_first` before each turn."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._cv = threading.Condition(threading.Lock())
        self._waiting = 0

    def __enter__(self) -> WeightsLock:
        with self._cv:
            self._waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._cv:
                self._waiting -= 1
                self._cv.notify_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def let_waiters_first(self, timeout: float = 60.0) -> None:
        """Wait until every thread waiting for the lock has taken it (at most ``timeout`` seconds)."""
        with self._cv:
            self._cv.wait_for(lambda: self._waiting == 0, timeout)


class BranchRouter(Protocol):
    """What the runtime needs of a router (``branchmerge.router.Router``): a branch name per text."""

    def route(self, texts: Sequence[str]) -> list[str]: ...


class Bundle(BatchGeneration):
    """Every branch of a bundle, loaded once; shared weights are held once per group.

    The runtime does no routing of its own: ``branch="auto"`` asks :attr:`router`, which the front end
    (:func:`branchmerge.load`) attaches when the bundle has one.
    """

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                 verify: bool = True, fused: bool | None = None, factors: str | None = None,
                 kernels: str = "auto", static_cache: bool = False) -> None:
        if factors not in (None, "dequantize", "quantized"):
            raise ValueError(f"factors must be 'dequantize' or 'quantized', got {factors!r}")
        self.static_cache = static_cache
        self.reader = BundleReader(path, verify=verify)
        self.path = Path(path)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, default=self.reader.manifest.dtype)
        from branchmerge.runtime import kernels as k  # imports triton, when installed: only once a bundle loads

        self.kernels = k.resolve(kernels, self.device)
        if self.kernels == "triton" and not k.STATE["ok"]:  # turned off earlier in this process
            self.kernels = "torch"
        self.groups = self._build_groups(fused, factors or "dequantize")
        if self.kernels == "triton" and not k.STATE["ok"]:
            # the kernels failed or disagreed at load: rebuild in the torch paths' own best layout (fused on
            # CUDA) rather than serve the kernels' split layout through the slower torch fallback
            logger.warning("Triton kernels are off (%s): loading %s for the torch paths", k.STATE["why"],
                           self.path)
            self.kernels = "torch"
            self.groups = self._build_groups(fused, factors or "dequantize")
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self._chat_templates: dict[str | None, str] = {}
        self._max_model_len: int | None = None  # set_chat_template's: per branch, None for every one
        self._generation_configs: dict[str, Any] = {}
        self._hot: set[str] = set()
        # held by a server's engine around each batch, and by materialize/dematerialize, so a branch never
        # changes between hot and factored in the middle of someone's forward pass
        self.weights_lock = WeightsLock()
        self.router: BranchRouter | None = None
        self.loras: dict[str, LoadedAdapter] = {}  # PEFT LoRA adapters loaded at runtime (load_lora)
        self.retiring: set[str] = set()  # adapters being unloaded: no new work is taken for them

    def _build_groups(self, fused: bool | None, factors: str) -> dict[str, _GroupRuntime]:
        """Every group's model; with the Triton kernels, sibling layers grouped and the kernels warmed up."""
        triton = self.kernels == "triton"
        if fused is None and triton:
            fused = False  # the kernels read W̄ and V apart; split layers can be grouped with their siblings
        groups: dict[str, _GroupRuntime] = {}
        self._split: dict[str, dict[str, str]] = {}  # group → {branch: the runtime group of its own model}
        for gname, g in self.reader.groups.items():
            kw: dict[str, Any] = dict(device=self.device, dtype=self.dtype, fused=fused, factors=factors)
            try:
                built = {gname: build_group_model(self.reader, gname, **kw)}
            except Unmixable as e:  # one model per branch, holding the mean weights and shared tensors once
                logger.info("group %r: %s, so each branch runs as a model of its own (sharing the group's mean "
                            "weights and shared tensors); a batch mixes no branches of it", gname, e)
                cache: dict[str, torch.Tensor] = {}
                self._split[gname] = {b: f"{gname}:{b}" for b in g.branches}
                built = {f"{gname}:{b}": build_group_model(self.reader, gname, only=b, cache=cache, **kw)
                         for b in g.branches}
            arch = registry().get(g.architecture)
            for name, (model, state) in built.items():
                for m in model.modules():
                    if isinstance(m, BranchedLinear):
                        m.use_triton = triton
                if triton and arch is not None and arch.siblings:
                    made = group_siblings(model, arch.siblings)
                    logger.info("group %r: %d sibling groups (q/k/v, gate/up) run as one kernel call each", name,
                                made)
                groups[name] = _GroupRuntime(name, model, state, g.standalone)
                if triton:
                    self._warm_kernels(model, state)
        return groups

    @staticmethod
    def _warm_kernels(model: PreTrainedModel, state: BranchState) -> None:
        """One token through the model: the kernels compile now rather than on a user's first request, and
        their first-use check against the torch path (which may turn them off) runs eagerly, outside any
        compiled graph or CUDA-graph capture."""
        dev = next(model.parameters()).device
        with state.select(branch=0), torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=dev), use_cache=False)

    # ---- branches ---------------------------------------------------------------------------
    @property
    def branch_names(self) -> list[str]:
        return list(self.reader.branches)

    def _group_of(self, branch: str) -> _GroupRuntime:
        group = self.reader.branch(branch).group  # BranchNotFoundError lists the valid names
        split = self._split.get(group)
        if split is not None:  # (a runtime adapter runs in its base's model)
            return self.groups[split[self.reader.runtime_branches().get(branch, branch)]]
        return self.groups[group]

    def runtime_group(self, branch: str) -> _GroupRuntime:
        """The model (and its branch selection) that runs ``branch``: its group's, or its own where the group's
        branches cannot share one model (see :class:`~branchmerge.runtime.build.Unmixable`)."""
        return self._group_of(branch)

    def tokenizer(self, branch: str) -> PreTrainedTokenizerBase:
        tok = self._tokenizers.get(branch)
        if tok is None:
            folder = self.reader.branch_dir(branch)
            try:  # never the bundle's own Python: an `auto_map` in its tokenizer config is an error here
                tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
            except Exception as e:  # noqa: BLE001 - transformers fails on bad files in many ways (a config whose
                # validator divides by zero, say); each is this bundle's error, named, never a traceback
                why = " ".join(f"{type(e).__name__}: {e}".split())[:500]
                raise BundleError(f"branch {branch!r}: the tokenizer in {folder} cannot be loaded (its files are "
                                  f"missing or invalid, or it needs code, which a bundle never runs): {why}") from None
            template = self._chat_templates.get(branch, self._chat_templates.get(None))
            if template is not None:
                tok.chat_template = template
            self._tokenizers[branch] = ensure_pad_token(tok)
        return tok

    def set_chat_template(self, template: str, branch: str | None = None) -> None:
        """Render ``branch``'s conversations (every branch's, and adapters' loaded later, when None) with the
        Jinja ``template`` instead of its tokenizer's own, as vLLM's ``--chat-template`` (see
        :func:`~branchmerge.io.hf.chat_template_text` for names and files).

        Raises:
            BranchNotFoundError: an unknown branch.
            ConfigError: the template cannot render a conversation (its error named); nothing changes then.
        """
        if branch is not None:
            self.reader.branch(branch)  # (an unknown one: BranchNotFoundError)
        names = self.branch_names if branch is None else [branch]
        for b in names:  # a template that fails fails here, for every branch, before any is changed
            tok = copy.copy(self.tokenizer(b))
            tok.chat_template = template
            encode_messages(tok, [{"role": "user", "content": "hello"}], chat=True,
                            what=f"the chat template given for branch {b!r}")
        if branch is None:  # (the latest setting wins: one for every branch replaces each branch's)
            self._chat_templates.clear()
        self._chat_templates[branch] = template
        for b in names:
            self.tokenizer(b).chat_template = template

    def model(self, branch: str) -> PreTrainedModel:
        """The ``transformers`` model serving ``branch``, with that branch active on this thread.

        Branches of one group share one model object; the selection is per thread, so another thread
        keeps its own. Use :meth:`use` to scope the choice.
        """
        g = self._group_of(branch)
        g.state.set_rows(None)
        g.state.active = g.state.index(branch)
        return g.model

    @contextmanager
    def use(self, branch: str) -> Iterator[PreTrainedModel]:
        """``with bundle.use("medical") as model:`` a plain transformers model running that branch (on
        this thread, inside the block)."""
        g = self._group_of(branch)
        with g.state.select(branch=g.state.index(branch)):
            yield g.model

    def materialize(self, branch: str) -> int:
        """Make ``branch`` hot: dense weights for zero overhead. Returns the extra bytes held."""
        g = self._group_of(branch)
        i = g.state.index(branch)
        extra = 0
        with self.weights_lock:
            for m in g.model.modules():
                if isinstance(m, BranchedLinear):
                    m.materialize(i)
                    extra += m.hot[str(i)].numel() * m.hot[str(i)].element_size()
            self._hot.add(branch)
        return extra

    def dematerialize(self, branch: str) -> None:
        g = self._group_of(branch)
        i = g.state.index(branch)
        with self.weights_lock:
            for m in g.model.modules():
                if isinstance(m, BranchedLinear):
                    m.dematerialize(i)
            self._hot.discard(branch)

    def load_lora(self, name: str, folder: str | Path, *, base: str | None = None,
                  max_rank: int | None = None) -> LoadedAdapter:
        """Load the PEFT LoRA adapter in ``folder`` as the new branch ``name`` over the branch ``base`` (default:
        the bundle's one base branch), kept exactly; it is served at once, in mixed batches too, and lives in
        memory only (:mod:`branchmerge.runtime.adapters`). The adapter is read and checked before the model
        changes, which then waits for a running forward of its group to end.

        Raises:
            ModelInputError: a bad adapter, or one changing what a loaded adapter may not (the message says).
            BundleError: a taken name, a base that cannot take adapters, or a static-cache bundle.
        """
        return self.add_lora(self.read_lora(name, folder, base=base, max_rank=max_rank))

    def read_lora(self, name: str, folder: str | Path, *, base: str | None = None,
                  max_rank: int | None = None) -> Prepared:
        """:meth:`load_lora`'s first half: the adapter read and checked (every error it can raise), the model
        untouched."""
        if self.static_cache:
            raise BundleError("adapters cannot be loaded into a bundle loaded with static_cache=True")
        return adapters.prepare(self, name, Path(folder), base=base, max_rank=max_rank)

    def add_lora(self, prep: Prepared) -> LoadedAdapter:
        """:meth:`load_lora`'s second half: a read adapter added to its group's model."""
        with self.weights_lock:
            loaded = adapters.apply(self, prep)
        self.loras[prep.name] = loaded
        return loaded

    def unload_lora(self, name: str) -> None:
        """Take out an adapter :meth:`load_lora` loaded (its slot is reused by the next one). Generations of it
        must have ended (the server waits for them).

        Raises:
            BranchNotFoundError: ``name`` is no adapter loaded at runtime.
        """
        with self.weights_lock:
            adapters.remove(self, name)
        self.loras.pop(name, None)
        self._tokenizers.pop(name, None)
        self._generation_configs.pop(name, None)
        self._hot.discard(name)
        self.retiring.discard(name)

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
        """One branch name per prompt; ``"auto"`` asks the router (a bundle of one branch needs none)."""
        names = [branch] * len(prompts) if isinstance(branch, str) else list(branch)
        if len(names) != len(prompts):
            raise BranchmergeError(f"got {len(names)} branch names for {len(prompts)} prompts")
        auto = [i for i, n in enumerate(names) if n == "auto"]
        if auto and self.router is None and len(self.branch_names) == 1:
            names = [self.branch_names[0] if n == "auto" else n for n in names]
        elif auto:
            if self.router is None:
                raise BranchmergeError("branch 'auto' needs a router; this bundle has none (see `branchmerge router "
                                       "build`, and load it with branchmerge.load)")
            picked = self.router.route([prompts[i] for i in auto])
            for i, p in zip(auto, picked):
                names[i] = p
        for n in names:
            self.reader.branch(n)
        return names

    def logits(self, input_ids: torch.Tensor, branches: Sequence[str], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One forward pass over rows of different branches of one group: ``[B, T, vocab]``.

        Branches whose vocabularies differ in size (a fine-tune that added tokens) give ``vocab`` = the
        largest; a row's columns past its own vocabulary are ``-inf``.
        """
        g, rows = self._rows_for(branches)
        with g.state.select(rows), torch.no_grad():
            out = g.model(input_ids=input_ids.to(self.device),
                          attention_mask=None if attention_mask is None else attention_mask.to(self.device))
        return out.logits

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
        self.check_ids(seqs, branches)
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
            x, mask = pad_rows([seqs[i] for i in idx])
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
        head = max(shared)
        pre_mask, _ = pad_rows([[1] * sh for sh in shared], width=head)  # each prefix's cached columns
        y, suf_mask = pad_rows([q[sh:] for q, sh in zip(mseqs, shared)])
        mask = torch.cat([pre_mask, suf_mask], dim=1)
        pos = torch.tensor(shared).view(-1, 1) + torch.arange(y.shape[1])
        with g.state.select(rows), torch.no_grad():
            post = g.model(input_ids=y.to(self.device), attention_mask=mask.to(self.device),
                           position_ids=pos.to(self.device), use_cache=True, **{cache_arg(g.model): cache})
        return [(pre_logits[r, :c.shared], [post.logits[m, :len(mseqs[m]) - c.shared] for m in c.members])
                for r, c in enumerate(local)]

    def _prefill_clusters(self, g: _GroupRuntime, clusters: Sequence[PrefixCluster], seqs: Sequence[Sequence[int]],
                          rows: Sequence[int], *, all_logits: bool = False) -> tuple[Any, list[int], torch.Tensor]:
        """Run every cluster's shared prefix as one right-padded batch ``[C, P]`` and give each sequence its
        cluster's cache row (sequences outside a cluster get row 0, to be fully masked).

        Returns:
            The cache (one row per sequence), each sequence's cached prefix length (0 outside clusters),
            and the prefixes' logits: ``[C, P, vocab]`` with ``all_logits``, else the last position's.
        """
        x, m = pad_rows([list(seqs[c.members[0]][:c.shared]) for c in clusters])
        owner = [0] * len(seqs)
        for r, c in enumerate(clusters):
            for i in c.members:
                owner[i] = r
        with g.state.select([rows[c.members[0]] for c in clusters]), torch.no_grad():
            pre = g.model(input_ids=x.to(self.device), attention_mask=m.to(self.device), use_cache=True,
                          logits_to_keep=0 if all_logits else 1)
        cache = pre[cache_arg(g.model)]
        cache.batch_select_indices(torch.tensor(owner, device=self.device))
        return cache, shared_lengths(clusters, len(seqs)), pre.logits

    def _rows_for(self, branches: Sequence[str]) -> tuple[_GroupRuntime, list[int]]:
        groups = {self._group_of(b).name for b in branches}
        if len(groups) != 1:
            raise BranchmergeError(f"one forward pass needs branches of one group; got groups {sorted(groups)}"
                                   + (" (branches of a group whose modules hold per-branch parameters of their own "
                                      "run as models of their own)" if self._split else ""))
        g = self.groups[groups.pop()]
        return g, [g.state.index(b) for b in branches]

    def encode(self, prompt: str, branch: str, *, chat: bool | None = None, system: str | None = None) -> list[int]:
        """Token ids of ``prompt`` for ``branch``; the chat template is used when the tokenizer has one."""
        tok = self.tokenizer(branch)
        if not (bool(tok.chat_template) if chat is None else chat):
            return list(tok(prompt)["input_ids"])
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return encode_messages(tok, msgs, chat=True, what=f"the chat template of branch {branch!r}")

    def encode_messages(self, messages: Sequence[Mapping[str, Any]], branch: str, *, chat: bool | None = None,
                        tools: Sequence[Mapping[str, Any]] | None = None, **template: Any) -> list[int]:
        """Token ids of a conversation (``{"role", "content"}`` dicts, OpenAI ``tools`` for the template) for
        ``branch``, ready for its answer; ``template``: ``add_generation_prompt``, ``continue_final_message``,
        ``template_kwargs`` (see :func:`~.text.encode_messages`)."""
        return encode_messages(self.tokenizer(branch), messages, chat=chat, tools=tools,
                               what=f"the chat template of branch {branch!r}", **template)

    def context_limit(self, branch: str) -> int | None:
        """The branch's context length in tokens (``max_position_embeddings`` or ``n_positions``), if known,
        within :attr:`max_model_len` (vLLM's ``--max-model-len``) when that is set."""
        cfg = self.reader.hf_config(branch)
        limit = cfg.get("max_position_embeddings") or cfg.get("n_positions")
        limit = int(limit) if limit else None
        cap = self.max_model_len
        return cap if cap is not None and (limit is None or cap < limit) else limit

    @property
    def max_model_len(self) -> int | None:
        """At most this many tokens (prompt and answer) per row on every branch (None: each branch's own
        context): vLLM's ``--max-model-len``, which bounds one request's KV cache and prefill."""
        return self._max_model_len

    @max_model_len.setter
    def max_model_len(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
            raise ValueError(f"max_model_len must be an integer of at least 2 tokens, got {value!r}")
        self._max_model_len = value

    def tightest_context(self, branches: Iterable[str]) -> int | None:
        """The smallest context among ``branches`` (what a batch of them must fit), if any is known."""
        return min((x for x in map(self.context_limit, branches) if x), default=None)

    def check_context(self, branch: str, n_prompt: int, max_new_tokens: int) -> None:
        """Raises BranchmergeError (``context_length_exceeded`` in the server) when the prompt and the
        tokens to generate do not fit the branch's context."""
        limit = self.context_limit(branch)
        if limit and n_prompt + max_new_tokens > limit:
            raise ContextLengthError(
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
        max_new_tokens: int | None = None,
        stop: str | Sequence[str] | None = None,
        **generation_kwargs: Any,
    ) -> list[str]:
        """Generate a completion per prompt; rows of one group run as one mixed-branch batch.

        Args:
            prompts: one prompt or a list.
            branch: a branch name, ``"auto"`` (router), or one name per prompt.
            chat: apply the tokenizer's chat template (default: when it has one).
            max_new_tokens: tokens to generate; default: 64, or what the context leaves when that is less.
            stop: a string (or strings) that ends a completion once it appears; the text stops before it.
            generation_kwargs: passed to ``transformers``' ``generate`` (e.g. ``do_sample``).

        Returns:
            The decoded new text of each prompt, in order.
        """
        ids_list, names, mt = self.prepare(prompts, branch, chat=chat, system=system, max_new_tokens=max_new_tokens)
        stops = None if stop is None else [[stop] if isinstance(stop, str) else list(stop)] * len(ids_list)
        return [r.text for r in self.generate_ids(ids_list, names, max_new_tokens=mt, stop=stops, **generation_kwargs)]

    default_max_new_tokens = 64

    def fit_max_new_tokens(self, ids_list: Sequence[Sequence[int]], names: Sequence[str],
                           requested: int | None = None, *, default: int | None = None) -> int:
        """``requested``, checked against every row's context; or, when None, ``default`` (None: 64) cut to
        what the tightest row's context leaves.

        Raises:
            ContextLengthError: a prompt leaves no room (or less than ``requested``).
        """
        if requested is None:
            room = [(lim - len(ids)) for ids, b in zip(ids_list, names) if (lim := self.context_limit(b))]
            requested = min([default or self.default_max_new_tokens, *room])
            if requested <= 0:
                requested = 1  # let check_context name the prompt that does not fit
        for ids, b in zip(ids_list, names):
            self.check_context(b, len(ids), requested)
        return requested

    def prepare(self, prompts, branch, *, chat: bool | None = None, system: str | None = None,
                max_new_tokens: int | None = None) -> tuple[list[list[int]], list[str], int]:
        """Token ids and branch per prompt (routing ``auto``), and the checked ``max_new_tokens``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        names = self.resolve_branches(prompts, branch)
        ids_list = [self.encode(p, b, chat=chat, system=system) for p, b in zip(prompts, names)]
        return ids_list, names, self.fit_max_new_tokens(ids_list, names, max_new_tokens)

    def check_ids(self, ids_list: Sequence[Sequence[int]], names: Sequence[str], *,
                  rows: Sequence[str] | None = None) -> None:
        """Raise :class:`BranchmergeError` for an empty row or a token id outside its branch's vocabulary.

        An embedding lookup past the table's end is a device-side assert on a GPU, after which the process
        cannot use the device again. ``rows`` names the rows in the message (default ``row 0``, ``row 1``…).
        """
        for i, (ids, b) in enumerate(zip(ids_list, names)):
            row = rows[i] if rows is not None else f"row {i}"
            if len(ids) == 0:
                raise BranchmergeError(f"{row} has no tokens")
            vocab = self.reader.hf_config(b).get("vocab_size")
            lo, hi = min(ids), max(ids)  # two C-level passes: this runs for every generated batch
            bad = lo if lo < 0 else hi if isinstance(vocab, int) and hi >= vocab else None
            if bad is not None:
                raise BranchmergeError(f"{row}: token id {bad} is outside the vocabulary of branch {b!r} "
                                       f"(size {vocab})")


class ContextLengthError(BranchmergeError):
    """A prompt plus the tokens to generate does not fit a branch's context."""


def load(path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         verify: bool = True, fused: bool | None = None, factors: str | None = None, kernels: str = "auto",
         static_cache: bool = False, max_model_len: int | None = None) -> Bundle:
    """Load a bundle's branches (no router: :func:`branchmerge.load` attaches the stored one).

    Args:
        dtype: compute dtype: a name, an alias (``bf16``, ``fp16``, ``auto``) or a torch dtype; default
            the bundle's storage dtype.
        fused: kernel layout of the branched layers. True stores ``W̄`` and every ``V_i`` as one weight, so
            a layer is two GEMMs (fewer launches: the GPU's choice); False keeps them apart, so one branch
            reads only its own factors (fewer bytes: the CPU's choice). None picks by device.
        factors: for bundles with int8/int4 factors: ``dequantize`` them once at load (the default: faster
            per token, see bench/RESULTS.md) or keep them ``quantized`` in memory, dequantized per forward
            (resident memory as stored).
        kernels: ``triton`` runs each branched layer as two Triton kernels (shrink, then a GEMM with the
            expand, scale and bias in its epilogue) for one branch or mixed rows; ``torch`` the torch paths;
            ``auto`` picks Triton on CUDA when it is installed.
        static_cache: generate with a static KV cache (``cache_implementation="static"``), which
            ``transformers`` compiles into CUDA graphs on a GPU; no prefix sharing then.
        max_model_len: at most this many tokens per row, prompt and answer (vLLM's ``--max-model-len``);
            default each branch's context.

    Raises:
        BundleError: not a bundle, an invalid manifest, unknown format version, a shard failing its sha256.
    """
    bundle = Bundle(path, device=device, dtype=dtype, verify=verify, fused=fused, factors=factors, kernels=kernels,
                    static_cache=static_cache)
    bundle.max_model_len = max_model_len
    return bundle


__all__ = ["Bundle", "BranchRouter", "ContextLengthError", "GenerationResult", "load", "BranchNotFoundError"]
