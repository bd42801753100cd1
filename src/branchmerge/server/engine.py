"""The batching engine: one worker thread gathers waiting jobs into mixed-branch batches.

- **Fair**: jobs wait in one queue per request; a batch takes one job from each request in turn, so a
  request of 1,000 prompts cannot hold back one of a single prompt.
- **Bounded**: at most ``max_batch`` rows a batch, ``max_queued`` jobs waiting in all (then
  :class:`Busy`), and a batch's padded width plus its ``max_tokens`` fits every member's context.
- **Continuous**: a batch runs in segments; jobs that ended leave it and waiting ones join it between
  two, the others going on from their KV cache (see :class:`Engine`).
- **Cancellable**: a job whose client went away is cancelled; its row stops at the next decoding step
  (and so does every row that reached its own ``max_tokens`` or one of its stop strings), and a batch of
  only cancelled jobs is skipped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from branchmerge.errors import BranchNotFoundError
from branchmerge.runtime.kvcache import PrefixStore
from branchmerge.runtime.sampling import RowSampler, RowSettings

logger = logging.getLogger(__name__)


class Busy(Exception):
    """The engine's queue is full."""


@dataclass(eq=False)
class Job:
    """One prompt to generate from (or, with ``score``, to score), as the engine runs it."""

    ids: list[int]
    branch: str
    max_tokens: int
    sampling: RowSettings = field(default_factory=RowSettings)  # how its row samples and ends (greedy default)
    stop: list[str] = field(default_factory=list)
    salt: str = ""  # vLLM's cache_salt: only finished jobs of the same salt lend it their KV cache
    keep_stop: bool = False  # the text ends with the stop string that ended it (vLLM's include_stop_str_in_output)
    skip_special: bool = True  # special tokens are left out of its text (stop strings are found without them)
    stream: bool = False
    request: Any = None  # jobs of one request share a queue (fairness)
    score: tuple[int, bool] | None = None  # a scoring job: (top-k, greedy next token)
    beams: tuple[int, float] | None = None  # a beam search job: (beams, length penalty); its answers in `beamed`
    # results
    new_ids: list[int] = field(default_factory=list)
    stop_id: int | None = None  # end-of-sequence token that ended generation (not in new_ids)
    scored: Any = None  # TokenLogprobs of a scoring job
    beamed: list | None = None  # a beam search job's GenerationResults, best first
    error: Exception | None = None
    generator: Any = None  # its row's random generator (set when queued), kept from one segment to the next
    kv: Any = None  # its row's KV cache (a CachedRow) from the last segment: the next one goes on from it
    constraint: Any = None  # its structure's grammar state (a structured.Constraint), kept between segments
    record: list | None = None  # with sampling.logprobs: each new id's TokenLogprob, as they come (streams read it)
    # signalling
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    _loop: asyncio.AbstractEventLoop | None = None
    _future: asyncio.Future | None = None
    _aqueue: asyncio.Queue | None = None
    group: str = ""

    def bind(self, loop: asyncio.AbstractEventLoop) -> Job:
        """Signal this job's results into ``loop`` (``await job.wait()``, ``await job.next_token()``)."""
        self._loop, self._future = loop, loop.create_future()
        self._aqueue = asyncio.Queue() if self.stream else None
        return self

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share one batch."""
        if self.score is not None:
            return ("score", self.group, *self.score)
        if self.beams is not None:
            return ("beam", self.group)  # (each runs alone: its beams are its batch)
        return ("generate", self.group)  # each row samples with its own settings (RowSampler)

    def _emit(self, token: int | None) -> None:
        if self.stream and self._loop is not None:  # streamed ids, then None, into the bound event loop
            self._call(self._aqueue.put_nowait, token)

    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the waiting event loop is gone (its client too): nobody to tell
            self.cancelled.set()

    def _finish(self) -> None:
        self.kv = None  # (its batch's cache is freed once no row going on holds it)
        self.constraint = None
        self._emit(None)
        self.finished.set()
        if self._loop is not None:
            self._call(lambda: self._future.done() or self._future.set_result(None))

    async def wait(self) -> Job:
        await asyncio.shield(self._future)
        return self

    async def next_token(self) -> int | None:
        return await self._aqueue.get()


class _RowStreamer(BaseStreamer):
    """Receives each decoding step's ``[B]`` token ids and forwards each row's id to its job."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs, self.first = jobs, True

    def put(self, value) -> None:
        if self.first:  # the prompt ids come first
            self.first = False
            return
        for job, t in zip(self.jobs, value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            job._emit(t)

    def end(self) -> None:
        pass


class _Cancelled(StoppingCriteria):
    """Per row: done once its job is cancelled (its own ``max_tokens`` and stop strings end it in
    ``generate_ids``); ``generate`` ends when every row is done."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
        done = [j.cancelled.is_set() for j in self.jobs]
        if len(done) != input_ids.shape[0]:  # batch expanded or split: leave stopping to max_new_tokens
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _Gone(StoppingCriteria):
    """Every row (a beam search's beams): done once ``job`` is cancelled."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.job.cancelled.is_set(), dtype=torch.bool,
                          device=input_ids.device)


class _Yield(StoppingCriteria):
    """Ends a generation segment (every row; those that did not end go on in the next) once it ran
    ``min_steps`` and either a row ended (its job can be answered now) or the batch has a free row and only
    jobs that may join it are waiting.

    A row counts as ended when its last token is one of its stop tokens or the padding that ``generate``
    gives rows it ended (at a stop string), or it reached its ``max_tokens``; a wrong guess costs one
    segment more, not a wrong answer."""

    def __init__(self, engine: Engine, jobs: list[Job], key: tuple, stops: list[set[int]], min_steps: int) -> None:
        self.engine, self.jobs, self.key, self.stops, self.min_steps = engine, jobs, key, stops, min_steps
        self.left = [j.max_tokens - len(j.new_ids) for j in jobs]
        self.ended = [False] * len(jobs)
        self.steps = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
        self.steps += 1
        if input_ids.shape[0] == len(self.jobs):
            for r, t in enumerate(input_ids[:, -1].tolist()):
                self.ended[r] = (self.ended[r] or t in self.stops[r] or self.steps >= self.left[r]
                                 or self.jobs[r].cancelled.is_set())
        e = self.engine
        if self.steps < self.min_steps or e._paused or all(self.ended):  # (all ended: generate ends by itself)
            go = False
        else:
            free = len(self.jobs) < e.max_batch or any(self.ended)
            go = any(self.ended) or (free and e._stalled != self.key and 0 < e._n == e._keys[self.key])
        return torch.full((input_ids.shape[0],), go, dtype=torch.bool, device=input_ids.device)


class Engine:
    """One worker thread; jobs waiting together run as one mixed-branch ``generate`` (or scoring) call.

    Generation is continuous: a batch runs in segments, and a segment ends early (after ``min_segment``
    steps) when one of its rows ended, or when it has a free row and jobs that may join it are waiting.
    Then the jobs that ended are answered, waiting ones join, and the next segment prefills only their
    prompts: the rows that go on keep their KV cache (:mod:`~branchmerge.runtime.kvcache`), and each row's
    sampling, penalties and stop strings go on where they were. A long answer no longer holds back the
    short ones of its batch, nor the requests that arrive while it runs. With other jobs waiting (another
    group, or scoring), the batch takes no one in, so it ends and they get their turn.
    """

    def __init__(self, bundle, *, max_batch: int = 16, wait_ms: float = 10.0, max_queued: int = 4096,
                 min_segment: int = 8, continuous: bool = True, keep_kv: bool = True,
                 prefix_cache_tokens: int = 0) -> None:
        self.bundle, self.max_batch, self.wait, self.max_queued = bundle, max_batch, wait_ms / 1000, max_queued
        # jobs join running batches (not with a static KV cache, whose compiled graphs want one batch shape)
        self.continuous = continuous and not getattr(bundle, "static_cache", False)
        self.min_segment = min_segment
        self.keep_kv = keep_kv  # rows going on keep their KV cache between segments (else their text is prefilled)
        # finished rows' caches, for later jobs that begin the same way (0 tokens: none kept)
        self.prefix = PrefixStore(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self.segments = 0  # generation segments run (a batch is one or more)
        self._keys: Counter = Counter()  # jobs waiting, per key
        # the key of a running batch whose waiting jobs did not fit it: no segment ends to take them in
        # until one of its rows ends
        self._stalled: tuple | None = None
        self.batches = 0  # batches run (tests and /health read it)
        self.cancelled_jobs = 0
        self.reused_tokens = 0  # tokens of running rows not prefilled again at a segment: their KV cache was kept
        self.running = 0  # jobs in the batch running now
        self._current: list[Job] = []  # and those jobs
        self.metrics: Any = None  # an EngineMetrics (serve's /metrics), told of each finished batch
        self._queues: OrderedDict[Any, deque[Job]] = OrderedDict()
        self._n = 0
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._paused = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name="branchmerge-engine")
        self._thread.start()

    # ---- queueing -----------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue ``job``.

        Raises:
            Busy: ``max_queued`` jobs are already waiting.
        """
        job.group = self.bundle.runtime_group(job.branch).name
        if job.branch in self.bundle.retiring:
            raise BranchNotFoundError(f"adapter {job.branch!r} is being unloaded")
        job.generator = job.sampling.generator(self.bundle.device)
        job.record = [] if job.sampling.logprobs is not None else None
        with self._cv:
            if self._n >= self.max_queued:
                raise Busy(f"the server has {self._n} jobs waiting (its limit); retry later")
            key = job.request if job.request is not None else ("job", next(self._ids))
            self._queues.setdefault(key, deque()).append(job)
            self._n += 1
            self._keys[job.key] += 1
            self._cv.notify()
        return job

    def submit_many(self, jobs: list[Job]) -> list[Job]:
        """Queue all of ``jobs`` or none (Busy)."""
        with self._cv:
            if self._n + len(jobs) > self.max_queued:
                raise Busy(f"the server has {self._n} jobs waiting; {len(jobs)} more would pass its limit of "
                           f"{self.max_queued}; retry later")
        return [self.submit(j) for j in jobs]

    def withdraw(self, jobs: list[Job]) -> None:
        """Cancel ``jobs``; those still waiting leave the queue at once (a failed or abandoned request)."""
        with self._cv:
            for j in jobs:
                j.cancel()
                key = j.request if j.request is not None else None
                q = self._queues.get(key)
                if q is not None and j in q:
                    q.remove(j)
                    self._n -= 1
                    self._keys[j.key] -= 1
                    if not q:
                        del self._queues[key]
                    j._finish()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No new batch starts inside the block (one running finishes); jobs still queue. Afterwards the
        queued jobs are batched as usual: with the engine paused while requests arrive, the batches are
        exactly those the scheduling rules make, whatever the timing."""
        with self._cv:
            self._paused = True
        try:
            yield
        finally:
            with self._cv:
                self._paused = False
                self._cv.notify_all()

    def uses(self, branch: str) -> int:
        """Jobs of ``branch`` waiting or running."""
        with self._cv:
            waiting = sum(j.branch == branch for q in self._queues.values() for j in q)
        return waiting + sum(j.branch == branch for j in self._current)

    def cancel_branch(self, branch: str) -> None:
        """Cancel every job of ``branch``: waiting ones leave the queue, running ones end at their next token."""
        with self._cv:
            waiting = [j for q in self._queues.values() for j in q if j.branch == branch]
        self.withdraw(waiting)
        for j in list(self._current):
            if j.branch == branch:
                j.cancel()

    def queued(self) -> int:
        with self._cv:
            return self._n

    def _take(self, batch: list[Job]) -> Job | None:
        """Next job, round-robin over requests; with a ``batch`` begun, only one that may join it."""
        for key in list(self._queues):
            q = self._queues[key]
            pick = None
            if not batch:
                pick = q[0]
            else:
                pick = next((j for j in q if j.key == batch[0].key), None)
                if pick is not None and not self._fits([*batch, pick]):
                    pick = None
            if pick is None:
                continue
            q.remove(pick)
            self._n -= 1
            self._keys[pick.key] -= 1
            del self._queues[key]
            if q:
                self._queues[key] = q  # to the back: the next request goes first next time
            return pick
        return None

    def _fits(self, batch: list[Job]) -> bool:
        """Padded to its longest text so far plus its most tokens left, ``batch`` fits every member's context."""
        limit = self.bundle.tightest_context(j.branch for j in batch)
        if limit is None:
            return True
        return (max(len(j.ids) + len(j.new_ids) for j in batch)
                + max(j.max_tokens - len(j.new_ids) for j in batch) <= limit)

    def _loop(self) -> None:
        while True:
            try:
                self._step()
            except Exception:  # noqa: BLE001 - the worker must outlive any one batch
                logger.exception("engine step failed")

    def _step(self) -> None:
        """Gather one batch (round-robin over requests, waiting at most ``wait_ms`` for more) and run it."""
        with self._cv:
            while self._n == 0 or self._paused:
                self._cv.wait()
            jobs = [self._take([])]
            self._current = jobs  # (taken jobs are no longer queued: uses() sees them here)
        try:
            deadline = time.monotonic() + self.wait
            while len(jobs) < self.max_batch:
                with self._cv:
                    j = self._take(jobs)
                    if j is None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cv.wait(timeout=left)
                        continue
                    jobs.append(j)
            live = [j for j in jobs if not j.cancelled.is_set()]
            self.cancelled_jobs += len(jobs) - len(live)
            for j in jobs:
                if j.cancelled.is_set():
                    j._finish()
            if live:
                self._run(live)
        finally:
            self._current = []

    # ---- running ------------------------------------------------------------------------------------
    def _run(self, jobs: list[Job]) -> None:
        self.batches += 1
        while jobs:  # segments: the batch's jobs that go on, and those that joined
            self.bundle.weights_lock.let_waiters_first()  # (a load or materialize waiting goes before the next one)
            with self.bundle.weights_lock:  # materialize() waits for a segment, and a segment for it
                self.running, self._current = len(jobs), jobs
                try:
                    jobs = self._segment(jobs)
                finally:
                    self.running = 0
                self._current = jobs  # (between segments too: uses() sees the jobs going on)

    def _segment(self, jobs: list[Job]) -> list[Job]:
        """Run ``jobs`` (scoring, or a generation segment); finish those that ended; returns the others,
        with the waiting jobs that join them."""
        t = time.monotonic()
        ended = jobs
        try:
            if jobs[0].beams is not None:
                for j in jobs:
                    j.beamed = self.bundle.beam_search(j.ids, j.branch, beams=j.beams[0], max_new_tokens=j.max_tokens,
                                                       length_penalty=j.beams[1],
                                                       stopping_criteria=StoppingCriteriaList([_Gone(j)]))
                    j.new_ids = j.beamed[0].new_ids
            elif jobs[0].score is not None:
                top, greedy = jobs[0].score
                outs = self.bundle.token_logprobs_many([j.ids for j in jobs], [j.branch for j in jobs],
                                                       top=top, greedy_next=greedy)
                for j, o in zip(jobs, outs):
                    j.scored = o
            else:
                ended = self._generate(jobs)
        except Exception as e:  # noqa: BLE001 - reported to each waiting request
            logger.exception("%s failed for a batch of %d", "scoring" if jobs[0].score else "generation", len(jobs))
            for j in jobs:
                j.error = e
            ended = jobs
        if self.metrics is not None:  # before the answers go out: a client that reads /metrics next sees them
            try:
                self.metrics.batch(jobs, time.monotonic() - t, finished=ended)
            except Exception:  # noqa: BLE001 - counting must never fail a batch
                logger.exception("metrics for a batch failed")
        done = {id(j) for j in ended}
        if ended:
            self._stalled = None  # a row left: the waiting jobs may fit now
        for j in ended:
            j._finish()
        going = [j for j in jobs if id(j) not in done]
        return [*going, *self._admit(going)] if going else []

    def _generate(self, jobs: list[Job]) -> list[Job]:
        """One segment of ``jobs``' generation, each row going on from its text so far; returns those that
        ended (end of text, a stop string or token, their ``max_tokens``, or cancelled)."""
        criteria: list[StoppingCriteria] = [_Cancelled(jobs)]
        if self.continuous:
            stops = [j.sampling.stop_set(self.bundle.stop_ids(j.branch))  # and the padding of rows generate ended
                     | {self.bundle.tokenizer(j.branch).pad_token_id or 0} for j in jobs]
            criteria.append(_Yield(self, jobs, jobs[0].key, stops, self.min_segment))
        sampler = RowSampler([j.sampling for j in jobs], self.bundle.device, generators=[j.generator for j in jobs],
                             constraints=[j.constraint for j in jobs], records=[j.record for j in jobs])
        keep = self.continuous and self.keep_kv
        if keep and self.prefix is not None:  # a new job that begins as a finished one: from its cache
            for j in jobs:
                if j.kv is None and not j.new_ids:
                    j.kv = self.prefix.lookup(j.branch, j.ids, j.salt)
        outs = self.bundle.generate_ids(
            [j.ids + j.new_ids for j in jobs], [j.branch for j in jobs],
            max_new_tokens=[j.max_tokens - len(j.new_ids) for j in jobs], stop=[j.stop for j in jobs],
            generated=[len(j.new_ids) for j in jobs], row_sampler=sampler,
            past=[j.kv for j in jobs] if self.continuous else None, keep_cache=keep,
            streamer=_RowStreamer(jobs) if any(j.stream for j in jobs) else None,
            stopping_criteria=StoppingCriteriaList(criteria))
        self.segments += 1
        ended = []
        for j, c in zip(jobs, sampler.constraints):
            j.constraint = c
        for j, o in zip(jobs, outs):
            j.new_ids, j.stop_id, j.kv = j.new_ids + o.new_ids, o.stop_id, o.cache
            self.reused_tokens += o.reused
            if o.finish_reason == "stop" or len(j.new_ids) >= j.max_tokens or j.cancelled.is_set():
                ended.append(j)
                if self.prefix is not None and o.cache is not None and not j.cancelled.is_set():
                    self.prefix.add(o.cache, j.salt)
        return ended

    def _admit(self, going: list[Job]) -> list[Job]:
        """Waiting jobs that join the running ``going`` (continuous batching): none while the engine is
        paused or jobs that may not join are waiting (the batch then ends, and they get their turn)."""
        if not self.continuous or going[0].score is not None:
            return []
        out: list[Job] = []
        with self._cv:
            if self._paused or self._n != self._keys[going[0].key]:
                return []
            while len(going) + len(out) < self.max_batch:
                j = self._take([*going, *out])
                if j is None:
                    break
                out.append(j)
            # waiting jobs that do not fit: wait for a row to end rather than break segments for them
            self._stalled = going[0].key if not out and self._keys[going[0].key] else None
        for j in out:
            if j.cancelled.is_set():
                self.cancelled_jobs += 1
                j._finish()
        return [j for j in out if not j.cancelled.is_set()]
