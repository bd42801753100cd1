"""Routing for ``model: auto`` in a server, batched across requests (``serve`` and ``gateway``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from branchmerge.errors import BranchmergeError


class RouteBatcher:
    """Routing for ``auto``, batched across requests: texts that arrive while a routing batch runs form the
    next one (one embedding forward for all of them, on a worker thread), as the engine batches generation.
    A batch that fails on one text's input is routed again text by text, so the error is that request's."""

    def __init__(self, route_many: Callable[[list[str]], list], pool: ThreadPoolExecutor, max_batch: int = 64,
                 cached: Callable[[str], Any] | None = None) -> None:
        """``route_many(texts)`` gives one route per text (a BranchmergeError for input it refuses);
        ``cached(text)``, the route of a text the router remembers (None otherwise), answered at once
        instead of waiting behind a routing batch."""
        self.route_many, self.pool, self.max_batch, self.cached = route_many, pool, max_batch, cached
        self.pending: list[tuple[str, asyncio.Future]] = []
        self.task: asyncio.Task | None = None
        self.sizes: Any = None  # a histogram of batch sizes, on /metrics

    async def route(self, text: str) -> Any:
        if self.cached is not None and (hit := self.cached(text)) is not None:
            return hit
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((text, fut))
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._drain())
        return await fut

    def _work(self, texts: list[str]) -> list:
        try:
            return list(self.route_many(texts))
        except BranchmergeError as e:
            if len(texts) == 1:
                return [e]
        out: list = []
        for t in texts:
            try:
                out.append(self.route_many([t])[0])
            except BranchmergeError as e:
                out.append(e)
        return out

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending:
            batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch:]
            batch = [(t, f) for t, f in batch if not f.done()]  # a request cancelled meanwhile routes nothing
            if not batch:
                continue
            if self.sizes is not None:
                self.sizes.observe(len(batch))
            try:
                results = await loop.run_in_executor(self.pool, self._work, [t for t, _ in batch])
            except Exception as e:  # noqa: BLE001 - every waiting request gets it (a 500 each)
                results = [e] * len(batch)
            for (_, f), r in zip(batch, results):
                if not f.done():
                    f.set_exception(r) if isinstance(r, Exception) else f.set_result(r)
