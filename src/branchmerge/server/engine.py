"""The batching engine: one worker thread gathers waiting jobs into mixed-branch batches.

- **Fair**: jobs wait in one queue per request; a batch takes one job from each request in turn, so a
  request of 1,000 prompts cannot hold back one of a single prompt.
- **Bounded**: at most ``max_batch`` rows a batch, ``max_queued`` jobs waiting in all (then
  :class:`Busy`), and a batch's padded width plus its ``max_tokens`` fits every member's context.
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
from collections import OrderedDict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

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
    keep_stop: bool = False  # the text ends with the stop string that ended it (vLLM's include_stop_str_in_output)
    stream: bool = False
    request: Any = None  # jobs of one request share a queue (fairness)
    score: tuple[int, bool] | None = None  # a scoring job: (top-k, greedy next token)
    # results
    new_ids: list[int] = field(default_factory=list)
    stop_id: int | None = None  # end-of-sequence token that ended generation (not in new_ids)
    scored: Any = None  # TokenLogprobs of a scoring job
    error: Exception | None = None
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


class Engine:
    """One worker thread; jobs waiting together run as one mixed-branch ``generate`` (or scoring) call."""

    def __init__(self, bundle, *, max_batch: int = 16, wait_ms: float = 10.0, max_queued: int = 4096) -> None:
        self.bundle, self.max_batch, self.wait, self.max_queued = bundle, max_batch, wait_ms / 1000, max_queued
        self.batches = 0  # batches run (tests and /health read it)
        self.cancelled_jobs = 0
        self.running = 0  # jobs in the batch running now
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
        job.group = self.bundle.reader.branch(job.branch).group
        with self._cv:
            if self._n >= self.max_queued:
                raise Busy(f"the server has {self._n} jobs waiting (its limit); retry later")
            key = job.request if job.request is not None else ("job", next(self._ids))
            self._queues.setdefault(key, deque()).append(job)
            self._n += 1
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
            del self._queues[key]
            if q:
                self._queues[key] = q  # to the back: the next request goes first next time
            return pick
        return None

    def _fits(self, batch: list[Job]) -> bool:
        """Padded to its longest prompt plus its largest ``max_tokens``, ``batch`` fits every member's context."""
        limit = self.bundle.tightest_context(j.branch for j in batch)
        if limit is None:
            return True
        return max(len(j.ids) for j in batch) + max(j.max_tokens for j in batch) <= limit

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

    # ---- running ------------------------------------------------------------------------------------
    def _run(self, jobs: list[Job]) -> None:
        self.batches += 1
        with self.bundle.weights_lock:  # materialize() waits for the batch, and the batch for it
            self.running = len(jobs)
            try:
                self._run_locked(jobs)
            finally:
                self.running = 0

    def _run_locked(self, jobs: list[Job]) -> None:
        t = time.monotonic()
        try:
            if jobs[0].score is not None:
                top, greedy = jobs[0].score
                outs = self.bundle.token_logprobs_many([j.ids for j in jobs], [j.branch for j in jobs],
                                                       top=top, greedy_next=greedy)
                for j, o in zip(jobs, outs):
                    j.scored = o
            else:
                streamer = _RowStreamer(jobs) if any(j.stream for j in jobs) else None
                sampler = RowSampler([j.sampling for j in jobs], self.bundle.device)
                outs = self.bundle.generate_ids(
                    [j.ids for j in jobs], [j.branch for j in jobs], max_new_tokens=[j.max_tokens for j in jobs],
                    stop=[j.stop for j in jobs], streamer=streamer, row_sampler=sampler,
                    stopping_criteria=StoppingCriteriaList([_Cancelled(jobs)]))
                for j, o in zip(jobs, outs):
                    j.new_ids, j.stop_id = o.new_ids, o.stop_id
        except Exception as e:  # noqa: BLE001 - reported to each waiting request
            logger.exception("%s failed for a batch of %d", "scoring" if jobs[0].score else "generation", len(jobs))
            for j in jobs:
                j.error = e
        if self.metrics is not None:  # before the answers go out: a client that reads /metrics next sees them
            try:
                self.metrics.batch(jobs, time.monotonic() - t)
            except Exception:  # noqa: BLE001 - counting must never fail a batch
                logger.exception("metrics for a batch failed")
        for j in jobs:
            j._finish()
