"""Batched generation over a bundle's branches: mixed-branch rows of one group as one ``generate`` call.

:class:`BatchGeneration` is mixed into :class:`~branchmerge.runtime.bundle.Bundle` (which gives it the
groups, tokenizers, context limits and prefix prefill it uses): per row its own ``max_new_tokens``, stop
strings (vLLM's ``stop``), sampling settings (:class:`~.sampling.RowSampler`), a text generated in an
earlier call going on (``generated``), shared prompt prefixes prefilled once, and KV caches kept from one
call to the next (:mod:`~.kvcache`: the serving engine's continuous batching).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from transformers import LogitsProcessorList, PreTrainedModel, StoppingCriteriaList

from branchmerge.errors import BundleError
from branchmerge.io.generation_config import honored_config, sampling_defaults
from branchmerge.runtime import kvcache
from branchmerge.runtime.kvcache import CachedRow
from branchmerge.runtime.sampling import RowSampler, StopStrings, StopTokens, TokenLogprob
from branchmerge.runtime.scoring import prefix_clusters, shared_lengths
from branchmerge.runtime.structured import Structurer
from branchmerge.runtime.text import context_chunks, cut_at_stop, min_tokens_start, pad_rows

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    branch: str
    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    finish_reason: str  # "stop" or "length"
    stop_id: int | None = None  # the end-of-sequence token that ended it (not in new_ids)
    cache: CachedRow | None = field(default=None, repr=False)  # its KV cache, with generate_ids(keep_cache=True)
    reused: int = 0  # tokens of its ids not prefilled: they were in its cache from an earlier call (``past``)
    # with a RowSettings.logprobs: each of new_ids' log-probability and likeliest tokens (TokenLogprob)
    logprobs: list[TokenLogprob] | None = field(default=None, repr=False)


# GenerationConfig fields that are tokens, lengths or sampling, which each call sets itself: the rest (penalties,
# n-gram bans, suppressed or forced tokens…) change logits, so rows of branches that differ there are not batched
_CALL_FIELDS = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "do_sample", "temperature",
                "top_p", "top_k", "min_p", "typical_p", "max_length", "max_new_tokens", "transformers_version",
                "_from_model_config", "cache_implementation", "use_cache"}


def processing(gc: Any) -> str:
    """What of generation config ``gc`` changes logits beyond what a call sets (its penalties, bans…), as text:
    equal for branches whose rows may share one ``generate``."""
    return json.dumps({k: v for k, v in sorted(gc.to_diff_dict().items()) if k not in _CALL_FIELDS}, default=str)


def cache_arg(model: PreTrainedModel) -> str:
    """The name of the KV-cache argument and output of ``model``: ``past_key_values``, renamed ``cache``
    in transformers 5.2x."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class BatchGeneration:
    """:meth:`generate_ids` and its parts, for :class:`~branchmerge.runtime.bundle.Bundle`."""

    min_shared_prefix = 16  # generation shares a prompt prefix of at least this many tokens

    def generation_config(self, branch: str) -> Any:
        """``branch``'s own ``GenerationConfig`` (its ``generation_config.json``, else its ``config.json``'s token
        ids), read once per branch: what of it generation honors (its tokens, sampling defaults, penalties and
        bans; see :func:`~.generation.honored_config`), the rest ignored with a warning.

        Raises:
            BundleError: the file is invalid, a value out of range, or a ban naming a token outside the
                branch's vocabulary (named).
        """
        known = self._generation_configs
        if branch not in known:
            from transformers import GenerationConfig

            folder = self.reader.branch_dir(branch)
            cfg = self.reader.hf_config(branch)  # (without a file: the token ids of config.json, as transformers does)
            try:
                gc = GenerationConfig(**{k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg})
            except (ValueError, TypeError) as err:
                raise BundleError(f"branch {branch!r}: the token ids of its config.json are invalid: {err}") from None
            path = folder / "generation_config.json"
            if path.is_file():
                try:
                    read = GenerationConfig.from_pretrained(folder, trust_remote_code=False)
                except (ValueError, TypeError, OSError) as err:
                    raise BundleError(f"branch {branch!r}: {path} is invalid: {err}") from None
                try:
                    kept, ignored = honored_config(read.to_diff_dict(), cfg.get("vocab_size"), str(path))
                    gc = GenerationConfig(**kept)
                except (ValueError, TypeError) as err:
                    raise BundleError(f"branch {branch!r}: {err}") from None
                if ignored:
                    logger.warning("branch %s: %s sets %s, which branchmerge ignores (it takes a generation "
                                   "config's end tokens, sampling defaults, penalties and bans)",
                                   branch, path.name, ", ".join(ignored))
            known[branch] = gc
        return known[branch]

    def sampling_defaults(self, branch: str) -> dict[str, float | int]:
        """The sampling defaults ``branch``'s generation config sets (``temperature``, ``top_p``, ``top_k``,
        ``min_p``, ``repetition_penalty``, ``max_new_tokens``; see :func:`~.generation.sampling_defaults`): what
        the server answers a request that leaves them out with, as vLLM's ``--generation-config auto``.

        Raises:
            BundleError: the generation config is invalid (see :meth:`generation_config`).
        """
        return sampling_defaults(self.generation_config(branch).to_diff_dict(), f"branch {branch!r}")

    def stop_ids(self, branch: str) -> set[int]:
        """End-of-sequence token ids of ``branch``: its tokenizer's and its own generation config's."""
        ids = set()
        e = self.tokenizer(branch).eos_token_id
        if e is not None:
            ids.add(e)
        eos = self.generation_config(branch).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return ids

    def structurer(self, branch: str) -> Structurer:
        """The :class:`~.structured.Structurer` of ``branch``'s vocabulary, made at its first use (~0.15 s for
        a 49k-token vocabulary) and shared by branches with the same tokenizer, vocabulary size and end of text."""
        mine = self.__dict__.setdefault("_structurers", {})
        if branch not in mine:
            tok = self.tokenizer(branch)
            vocab = self.reader.hf_config(branch).get("vocab_size") or len(tok)
            words = (tok.backend_tokenizer.to_str() if getattr(tok, "is_fast", False)
                     else repr(sorted(tok.get_vocab().items())))
            stops = tuple(sorted(self.stop_ids(branch)))
            key = (hashlib.sha256(words.encode()).hexdigest(), vocab, stops)
            shared = self.__dict__.setdefault("_structurers_by_vocab", {})
            if key not in shared:
                shared[key] = Structurer(tok, vocab, stops)
            mine[branch] = shared[key]
        return mine[branch]

    def generate_ids(self, ids_list: list[list[int]], names: list[str], *, max_new_tokens: int | Sequence[int] = 64,
                     stop: Sequence[Sequence[str]] | None = None, generated: Sequence[int] | None = None,
                     share_prefix: bool = True, row_sampler: RowSampler | None = None,
                     past: Sequence[CachedRow | None] | None = None, keep_cache: bool = False,
                     **generation_kwargs: Any) -> list[GenerationResult]:
        """Generate from token ids; returns per row the new ids, text, branch and stop reason.

        ``max_new_tokens``: one number, or one per row (the batch runs to the largest; each row ends at its
        own). ``stop``: per row, strings that end it once its new text holds one (its ``text`` is cut before
        it; its ``new_ids`` end with the token that completed it), as vLLM's ``stop``. ``generated``: per row,
        how many of its ids it generated in an earlier call (a row going on): they count for its stop
        strings, penalties and ``min_tokens``, and ``max_new_tokens`` is what it has left.
        ``row_sampler`` runs each row with its own :class:`~.sampling.RowSettings` (sampling, penalties, stop
        tokens); each ``generate`` call (per group, per context chunk) gets its rows' part of it. A row whose
        settings ask for ``logprobs`` gets its tokens' log-probabilities in its result's ``logprobs`` (and in
        ``row_sampler.records``, which go on from one call to the next).

        With ``share_prefix``, rows of one branch whose prompts share a long prefix (a system prompt, or
        ``n`` samples of one prompt) prefill it once: the prefixes run as one batch, each row takes its
        prefix's KV cache row, and ``generate`` runs only the rest (padding between the two is masked).

        ``keep_cache``: each result's ``cache`` is the KV cache its row ended with (a
        :class:`~.kvcache.CachedRow`; None where the model's cache kind cannot be kept). ``past``: per row,
        such a cache from an earlier call (of the row's branch); a row goes on from it as far as it agrees
        with the row's ids and prefills only the rest (nothing, for a running row of continuous batching),
        and all rows run as one batch (see :meth:`_carry`).
        """
        self.check_ids(ids_list, names)
        if past is not None and len(past) != len(ids_list):
            raise ValueError(f"past has {len(past)} rows for {len(ids_list)} prompts")
        limits = [max_new_tokens] * len(ids_list) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != len(ids_list) or stop is not None and len(stop) != len(ids_list):
            raise ValueError(f"{len(ids_list)} prompts, but max_new_tokens has {len(limits)} rows and stop "
                             f"{'none' if stop is None else len(stop)}")
        if any(m < 1 for m in limits):
            raise ValueError(f"max_new_tokens must be at least 1 for every row, got {limits}")
        max_new_tokens = max(limits, default=1)
        results: list[GenerationResult | None] = [None] * len(ids_list)
        if row_sampler is not None and len(row_sampler) != len(ids_list):
            raise ValueError(f"row_sampler has {len(row_sampler)} rows for {len(ids_list)} prompts")
        own = [row_sampler is not None and row_sampler.settings[i].repetition_penalty is not None
               for i in range(len(names))]
        configs = {bo: self._row_config(*bo) for bo in set(zip(names, own))}
        by_group: dict[tuple[str, str], list[int]] = {}  # rows of one group whose configs process logits alike
        config_of: dict[tuple[str, str], Any] = {}
        for i, bo in enumerate(zip(names, own)):
            gc, key = configs[bo]
            by_group.setdefault(key, []).append(i)
            config_of.setdefault(key, gc)
        if row_sampler is not None:
            for i, what, tokens in row_sampler.token_ids():
                self.check_ids([tokens], [names[i]], rows=[f"{what} of row {i}"])
            before = [None if rec is None else len(rec) for rec in row_sampler.records]
        for key, idx in by_group.items():
            limit = self.tightest_context(names[i] for i in idx)
            for chunk in context_chunks(idx, [len(q) for q in ids_list], max_new_tokens, limit):
                kw = {"generation_config": config_of[key], **generation_kwargs}
                stops = None
                if row_sampler is not None and row_sampler.needed:
                    sub = row_sampler.rows(chunk, eos=[self.stop_ids(names[i]) for i in chunk],
                                           prompts=[ids_list[i] for i in chunk],
                                           generated=None if generated is None else [generated[i] for i in chunk],
                                           structurers=[self.structurer(names[i])
                                                        if row_sampler.settings[i].structure is not None else None
                                                        for i in chunk])
                    kw = {**kw, "logits_processor": LogitsProcessorList([*kw.get("logits_processor", []), sub])}
                    stops = sub.stops if sub.ends_own_way else None
                until = None
                if stop is not None and any(stop[i] for i in chunk) or any(limits[i] < max_new_tokens for i in chunk):
                    until = StopStrings([partial(self.tokenizer(names[i]).decode, skip_special_tokens=True)
                                         for i in chunk], [stop[i] if stop else [] for i in chunk],
                                        [limits[i] for i in chunk],
                                        None if generated is None else [generated[i] for i in chunk],
                                        None if row_sampler is None else [row_sampler.settings[i].min_tokens
                                                                          for i in chunk])
                outs = self._generate_group(chunk, ids_list, names, max_new_tokens, share_prefix, kw, stops, until,
                                            past=None if past is None else [past[i] for i in chunk],
                                            keep_cache=keep_cache)
                for i, r in zip(chunk, outs):
                    results[i] = r
        if row_sampler is not None:  # each record keeps its row's own tokens' entries (not the padding steps')
            for i, (rec, start) in enumerate(zip(row_sampler.records, before)):
                if rec is not None and results[i] is not None:
                    del rec[start + len(results[i].new_ids):]
                    results[i].logprobs = rec[start:]
        return [r for r in results if r is not None]

    def _row_config(self, branch: str, own_penalty: bool) -> tuple[Any, tuple[str, str]]:
        """The generation config rows of ``branch`` run with, and the key of the rows that may share its
        ``generate`` (group, logits processing). A row that sets its own ``repetition_penalty`` has it instead
        of its branch's (as a request's replaces the model's default in vLLM), not on top of it."""
        gc = self.generation_config(branch)
        if own_penalty and gc.repetition_penalty not in (None, 1.0):
            gc = copy.deepcopy(gc)
            gc.repetition_penalty = 1.0
        return gc, (self._group_of(branch).name, processing(gc))

    def beam_search(self, ids: Sequence[int], branch: str, *, beams: int, max_new_tokens: int,
                    length_penalty: float = 1.0, **generation_kwargs: Any) -> list[GenerationResult]:
        """Beam search (vLLM's ``use_beam_search``) for one prompt on ``branch``: the ``beams`` best
        continuations found with that many beams, best first, ranked as transformers and vLLM rank them
        (sum of log-probabilities / length ** ``length_penalty``). Each ends at the branch's end of text or
        after ``max_new_tokens``. ``generation_kwargs`` go to ``generate`` (``stopping_criteria``, say)."""
        if beams < 1:
            raise ValueError(f"beams must be at least 1, got {beams}")
        self.check_ids([ids], [branch])
        self.check_context(branch, len(ids), max_new_tokens)
        g, rows = self._rows_for([branch])
        tok = self.tokenizer(branch)
        eos = sorted(self.stop_ids(branch))
        x = torch.tensor([list(ids)], device=self.device)
        gc = copy.deepcopy(self.generation_config(branch))  # the branch's own (penalties, bans…)
        rest = gc.update(max_new_tokens=max_new_tokens, num_beams=beams, num_return_sequences=beams,
                         length_penalty=length_penalty, early_stopping=True, do_sample=False, temperature=None,
                         top_p=None, top_k=None, pad_token_id=0 if tok.pad_token_id is None else tok.pad_token_id,
                         eos_token_id=eos or None, **generation_kwargs)
        with g.state.select(rows), torch.no_grad():  # (the one row's branch serves every beam)
            out = g.model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc, **rest)
        results = []
        for row in out[:, x.shape[1]:].tolist():
            new, reason, stop_id = row, "length", None
            for j, t in enumerate(row):
                if t in eos:  # (and the padding after it)
                    new, reason, stop_id = row[:j], "stop", t
                    break
            results.append(GenerationResult(branch, list(ids), new, tok.decode(new, skip_special_tokens=True),
                                            reason, stop_id))
        return results

    def _generate_group(self, idx: list[int], ids_list: Sequence[Sequence[int]], names: Sequence[str],
                        max_new_tokens: int, share_prefix: bool, generation_kwargs: dict[str, Any],
                        stops: list[set[int]] | None = None, until: StopStrings | None = None, *,
                        past: Sequence[CachedRow | None] | None = None,
                        keep_cache: bool = False) -> list[GenerationResult]:
        """One ``generate`` call over rows ``idx`` of one group: a mixed-branch batch, left-padded (after a
        right-padded cached prefix when prompts share one). ``stops``: the tokens that end each row, when
        they are not its branch's end of text (then each row ends on its own, not through ``generate``);
        ``until``: the criterion that ends rows at their stop strings and own lengths; ``past``/``keep_cache``:
        as :meth:`generate_ids`."""
        g, rows = self._rows_for([names[i] for i in idx])
        pad = self.tokenizer(names[idx[0]]).pad_token_id
        pad = 0 if pad is None else pad
        seqs = [list(ids_list[i]) for i in idx]
        cache, shared = None, [0] * len(seqs)
        # beam search and num_return_sequences expand the batch inside generate, past a given cache; a
        # caller's own cache (or cache kind) is left alone
        expands = max(generation_kwargs.get("num_beams") or 1, generation_kwargs.get("num_return_sequences") or 1) > 1
        if self.static_cache and not any(k in generation_kwargs for k in ("past_key_values", "cache")):
            generation_kwargs = {"cache_implementation": "static", **generation_kwargs}
        own_cache = any(k in generation_kwargs for k in ("past_key_values", "cache", "cache_implementation"))
        plain = not expands and not own_cache  # our caches may be given and kept
        limit = self.tightest_context(names[i] for i in idx)
        keep_cache = keep_cache and plain
        carried, going = None, {}
        if past is not None and any(p is not None for p in past) and plain:
            mine = [p if p is not None and p.branch == names[i] else None for p, i in zip(past, idx)]
            carried = self._carry(g, rows, seqs, mine, pad, None if limit is None else limit - max_new_tokens)
        if carried is not None:
            cache, input_ids, mask, going = carried
        elif share_prefix and plain:
            clusters, _ = prefix_clusters(seqs, [names[i] for i in idx], min_shared=self.min_shared_prefix)
            sh = shared_lengths(clusters, len(seqs))
            # positions computed: the prefix batch plus every row's own part, against every full row
            width = max(sh) + max(len(q) - k for q, k in zip(seqs, sh)) if clusters else 0
            cost = len(clusters) * max(sh) + len(seqs) * max(len(q) - k for q, k in zip(seqs, sh))
            fits = limit is None or width + max_new_tokens <= limit
            if clusters and fits and cost < 0.8 * len(seqs) * max(map(len, seqs)):
                cache, shared, _ = self._prefill_clusters(g, clusters, seqs, rows)
        if carried is None:
            head_ids, head_mask = pad_rows([q[:sh] for q, sh in zip(seqs, shared)], pad=pad, width=max(shared))
            own_ids, own_mask = pad_rows([q[sh:] for q, sh in zip(seqs, shared)], pad=pad, left=True)
            input_ids, mask = torch.cat([head_ids, own_ids], 1), torch.cat([head_mask, own_mask], 1)
        width = input_ids.shape[1]
        if cache is not None:
            generation_kwargs = {**generation_kwargs, cache_arg(g.model): cache}
        own = {b: self.stop_ids(b) for b in {names[i] for i in idx}}
        eos = set().union(*own.values())
        if stops is None and len({frozenset(s) for s in own.values()}) > 1:
            stops = [own[names[i]] for i in idx]  # branches that end on other tokens: each row on its own
        kwargs = {"do_sample": False, "pad_token_id": pad, "eos_token_id": sorted(eos) or None, **generation_kwargs}
        if stops is not None:
            kwargs["eos_token_id"] = None
        own = [c for c in (StopTokens(stops) if stops is not None else None, until) if c is not None]
        if own:
            kwargs["stopping_criteria"] = StoppingCriteriaList([*kwargs.get("stopping_criteria", []), *own])
        if not kwargs.get("do_sample"):
            kwargs.setdefault("temperature", None)
            kwargs.setdefault("top_p", None)
            kwargs.setdefault("top_k", None)
        if keep_cache:
            kwargs["return_dict_in_generate"] = True
        # the rows' branches process logits alike (see generate_ids): their own config, with this call's settings
        gc = copy.deepcopy(kwargs.pop("generation_config", None) or self.generation_config(names[idx[0]]))
        rest = gc.update(max_new_tokens=max_new_tokens, **kwargs)  # (what is no config field goes to generate)
        with g.state.select(rows), torch.no_grad():
            out = g.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                   generation_config=gc, **rest)
        out_cache = None
        if keep_cache:
            out_cache, out = getattr(out, "cache", None) or getattr(out, "past_key_values", None), out.sequences
        results = []
        for r, i in enumerate(idx):
            new = out[r, width:].tolist()
            if until is not None and until.ended[r] is not None:
                new = new[:until.ended[r]]  # the tokens after are padding
            reason, stop_id = "length", None
            for j, t in enumerate(new):
                if t in (eos if stops is None else stops[r]):
                    new, reason, stop_id = new[:j], "stop", t
                    break
            decode = partial(self.tokenizer(names[i]).decode, skip_special_tokens=True)
            text = decode(new)
            if until is not None:
                start = min_tokens_start(decode, new, until.min_tokens[r] - until.generated[r])
                text, hit = cut_at_stop(text, until.stops[r], start=start)
                reason = "stop" if hit or until.hit[r] else reason  # (a stop string may begin before new_ids)
            results.append(GenerationResult(names[i], list(ids_list[i]), new, text, reason, stop_id,
                                            reused=going.get(r, 0)))
        if out_cache is not None:  # each row's cache: its ids and new_ids but the last (the padding after, masked)
            kept = kvcache.keep(out_cache, out, mask, [len(r.new_ids) for r in results])
            for r, res in enumerate(results):
                res.cache = None if kept is None else CachedRow(kept, r, res.branch)
        return results

    def _carry(self, g: Any, rows: Sequence[int], seqs: Sequence[Sequence[int]],
               past: Sequence[CachedRow | None], pad: int, max_width: int | None
               ) -> tuple[Any, torch.Tensor, torch.Tensor, dict[int, int]] | None:
        """``(cache, input_ids [B, W+1], attention_mask [B, W+1], {row going on: its tokens cached})`` for
        rows that go on from ``past`` and rows prefilled now; None when no row's cache holds a useful part of
        its ids, or the merged batch would be wider than ``max_width``.

        A row's cache is used up to where it agrees with the row's ids (:meth:`~.kvcache.CachedRow.shared`),
        when that is at least half of what it holds; the rest of its ids but the last (all of them for a
        row without a cache) run as one left-padded prefill over those caches, then every row's last token
        goes to ``generate``. A row whose cache holds all its ids but the last (a running row of the
        serving engine) needs no prefill."""
        held = [0] * len(seqs)
        for r, p in enumerate(past):
            if p is not None:
                n = p.shared(seqs[r])
                held[r] = n if n and 2 * n >= p.size else 0
        if not any(held):
            return None
        going = [r for r in range(len(seqs)) if held[r]]
        todo = [r for r in range(len(seqs)) if len(seqs[r]) - 1 > held[r]]  # ids to prefill (from their cache on)
        parts = self._parts([r for r in going if r not in set(todo)], past, held)
        if todo:
            part = self._extend(g, [rows[r] for r in todo], [seqs[r][held[r]:-1] for r in todo], pad,
                                self._parts(range(len(todo)), [past[r] for r in todo], [held[r] for r in todo]))
            if part is None:
                return None
            parts.append((part, list(range(len(todo))), todo))
        cache, ids, mask = kvcache.merge(parts, len(seqs))
        if max_width is not None and ids.shape[1] + 1 > max_width:
            return None
        input_ids, attention = kvcache.layout(seqs, ids, mask, pad)
        logger.debug("%d rows go on from their KV cache (%d tokens), %d prefilled", len(going), sum(held), len(todo))
        return cache, input_ids, attention, {r: held[r] for r in going}

    @staticmethod
    def _parts(which: Iterable[int], past: Sequence[CachedRow | None], held: Sequence[int]
               ) -> list[tuple[kvcache.SegmentCache, list[int], list[int]]]:
        """:func:`~.kvcache.merge`'s parts for rows ``which`` (those with ``held`` > 0), each row's cache cut
        to the ``held`` tokens it shares with the row's ids; rows of one uncut cache make one part."""
        parts: dict[int, tuple[kvcache.SegmentCache, list[int], list[int]]] = {}
        for r in which:
            if not held[r]:
                continue
            row = past[r]
            if row.size > held[r]:
                row = row.prefix(held[r])
            part = parts.setdefault(id(row.source), (row.source, [], []))
            part[1].append(row.row)
            part[2].append(r)
        return list(parts.values())

    def _extend(self, g: Any, rows: Sequence[int], tails: Sequence[Sequence[int]], pad: int,
                parts: list[tuple[kvcache.SegmentCache, list[int], list[int]]]) -> kvcache.SegmentCache | None:
        """One forward of ``tails`` (left-padded) over the rows' merged caches (``parts``; rows in none start
        from nothing), positions counted from each row's first token; its cache as a SegmentCache."""
        x, m = pad_rows(tails, pad=pad, left=True)
        width = x.shape[1]  # the columns this forward runs (after those cached)
        kw: dict[str, Any] = {}
        if parts:
            cache, ids, mask = kvcache.merge(parts, len(tails))
            kw[cache_arg(g.model)] = cache
            x, m = torch.cat([torch.where(mask.bool(), ids, pad), x], 1), torch.cat([mask, m], 1)
        pos = (m.cumsum(1) - 1).clamp(min=0)[:, -width:]
        with g.state.select(list(rows)), torch.no_grad():
            out = g.model(input_ids=x[:, -width:].to(self.device), attention_mask=m.to(self.device),
                          position_ids=pos.to(self.device), use_cache=True, logits_to_keep=1, **kw)
        return kvcache.snapshot(out[cache_arg(g.model)], x, m)
