"""The event streams of streamed responses (server-sent events): one choice's chunks as its tokens come,
stop strings held back, several choices' streams interleaved into one reply, an answer's tool calls
read out at its end; and the reply type."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from branchmerge.runtime.text import HeldText, min_tokens_start
from branchmerge.server import protocol as P
from branchmerge.server.engine import Job
from branchmerge.server.tool_parsers import PARSERS
from branchmerge.server.tools import finish_reason, tool_calls


@dataclass
class Reply:
    """A response: a JSON ``body``, or an event ``stream`` (ending with ``[DONE]``); ``headers`` either way."""

    body: dict[str, Any] | None = None
    stream: AsyncIterator[str] | None = None
    headers: dict[str, str] | None = None


class ClientGone(Exception):
    """The client disconnected; its work was cancelled."""


class _Request:
    """The jobs one HTTP request queued (the engine takes turns between requests)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()  # arrival, for the time to a stream's first token
        self.jobs: list[Job] = []
        self.prompt_tokens = self.completion_tokens = 0  # what its streams sent, for `include_usage`


class StreamReplies:
    """Streaming parts of :class:`~branchmerge.server.api.OpenAIService` (which gives ``bundle`` and the
    time-to-first-token histogram ``_ttft``)."""

    bundle: Any
    engine: Any
    _ttft: Any
    _logprobs_of: Callable[..., dict]

    async def _once(self, kind, rid, model, text, branch, index: int, reason: str = "stop",
                    usage: tuple[int, int] | None = None) -> AsyncIterator[str]:
        yield P.chunk(kind, rid, model, text, None, branch, first=True, index=index, usage=usage)
        yield P.chunk(kind, rid, model, None, reason, branch, index=index, usage=usage)

    async def _stream(self, kind, rid, model, branch, job: Job, index: int = 0, lstrip: bool = False,
                      usage: bool = False) -> AsyncIterator[str]:
        """One choice's chunks as its job's tokens come (``lstrip``: its leading whitespace left out, as a
        pipeline stage's answer is stripped; ``usage``: each chunk with the choice's usage so far)."""
        decode = partial(self.bundle.tokenizer(branch).decode, skip_special_tokens=job.skip_special)
        eos = job.sampling.stop_set(self.bundle.stop_ids(branch))  # the tokens that end this row
        held, ids, reason, start = HeldText(job.stop, keep=job.keep_stop), [], None, 0
        sent, offset = 0, 0  # tokens whose logprobs went out; characters of text sent (completions' text_offset)

        def logprobs() -> dict | None:  # the logprobs of the tokens not yet sent (None: not asked for)
            nonlocal sent
            if job.record is None:
                return None
            out = self._logprobs_of(kind, branch, ids[sent:], job.record[sent:len(ids)], offset)
            sent = len(ids)
            return out
        so_far = (lambda: (len(job.ids), len(ids))) if usage else (lambda: None)  # noqa: E731
        try:
            yield P.chunk(kind, rid, model, None, None, branch, first=True, index=index, usage=so_far())
            while True:
                t = await job.next_token()
                if t is None:
                    break
                if not ids and reason is None and self._ttft is not None and isinstance(job.request, _Request):
                    self._ttft.observe(time.monotonic() - job.request.t0, branch)
                if reason is not None:
                    continue  # drain the rest of the batch's steps
                if t in eos:
                    reason = "stop"
                    continue
                ids.append(t)
                text = decode(ids)
                if len(ids) == max(job.sampling.min_tokens, 1):  # where a stop string may end from now on
                    start = min_tokens_start(decode, ids, job.sampling.min_tokens)
                piece = held.feed(text, start=start if len(ids) >= job.sampling.min_tokens else len(text),
                                  final=len(ids) >= job.max_tokens)
                if held.hit:
                    reason = "stop"
                    job.cancel()  # the client has its answer: free the row
                elif len(ids) >= job.max_tokens:
                    reason = "length"
                if lstrip and not offset:
                    piece = piece.lstrip()
                if piece:
                    yield P.chunk(kind, rid, model, piece, None, branch, index=index, logprobs=logprobs(),
                                  usage=so_far())
                    offset += len(piece)
            rest = held.finish() if job.error is None else ""  # held back when end of text came
            rest = rest.lstrip() if lstrip and not offset else rest
            if rest:  # (the logprobs of tokens whose text a stop string cut are not sent)
                yield P.chunk(kind, rid, model, rest, None, branch, index=index, logprobs=logprobs(), usage=so_far())
            if isinstance(job.request, _Request):
                job.request.completion_tokens += len(ids)
            if job.error is not None:
                yield P.sse(P.error_body("generation failed (see the server log)", type_="server_error"))
            yield P.chunk(kind, rid, model, None, reason or "stop", branch, index=index, usage=so_far())
        finally:  # the client went away (the generator is closed early) or the stream ended
            self.engine.withdraw([job])  # (still queued: it leaves the queue at once)

    def _sse(self, parts: list[tuple[str, list[AsyncIterator[str]]]], usage: Callable[[], str] | None = None) -> Reply:
        """One event stream from the choices' streams, chunks interleaved as they come, then the ``usage``
        chunk when asked for (``stream_options.include_usage``), then ``[DONE]``."""
        gens = [g for _, gs in parts for g in gs]

        async def merged() -> AsyncIterator[str]:
            q: asyncio.Queue[str | None] = asyncio.Queue()

            async def pump(g: AsyncIterator[str]) -> None:
                try:
                    async for c in g:
                        await q.put(c)
                finally:
                    await q.put(None)

            tasks = [asyncio.create_task(pump(g)) for g in gens]
            try:
                left = len(tasks)
                while left:
                    c = await q.get()
                    if c is None:
                        left -= 1
                    else:
                        yield c
                if usage is not None:
                    yield usage()
                yield P.DONE
            finally:  # closed early by a disconnect: stop every choice (their generators cancel their jobs)
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for g in gens:
                    await g.aclose()

        return Reply(stream=merged(), headers=P.branch_header([b for b, _ in parts]))

    def _reply(self, out: dict | tuple, usage: Callable[[], str] | None = None) -> Reply:
        if isinstance(out, tuple):
            return self._sse([out], usage)
        return Reply(body=out, headers=P.branch_header(out["branch"]))

    @staticmethod
    def _usage(req: P._Req, kind: str, rid: str, request: _Request) -> Callable[[], str] | None:
        """The last chunk of a stream that asked for ``stream_options.include_usage``: the tokens its
        streams took and sent, counted as they ended."""
        if not (req.stream and req.stream_options is not None and req.stream_options.include_usage):
            return None
        return lambda: P.usage_chunk(kind, rid, req.model, request.prompt_tokens, request.completion_tokens)


async def stream_calls(chunks: AsyncIterator[str], choice: str, parser: str = "hermes") -> AsyncIterator[str]:
    """A chat completion's event stream (one choice) whose answer may hold tool calls: for ``"auto"`` its text
    streams as content up to where a call may begin (:meth:`~.tool_parsers.ToolParser.safe`), the rest is held;
    otherwise (an answer made under a call structure) all of it is held. At the end one delta carries the
    calls (or the held text, when the answer has none or was cut short), then the finish reason as
    :func:`~.tools.answer_calls` gives it."""
    text: list[str] = []
    sent = 0  # characters of the text streamed as content
    reader = PARSERS[parser] if choice == "auto" else None
    async for event in chunks:
        data = json.loads(event[len("data: "):]) if event.startswith("data: {") else None
        if not data or not data.get("choices"):
            yield event  # an error body
            continue
        ch = data["choices"][0]
        text.append(ch["delta"].pop("content", None) or "")
        ch.pop("logprobs", None)
        if ch["finish_reason"] is None:
            whole = "".join(text)
            safe = reader.safe(whole) if reader is not None else 0
            if safe > sent:
                ch["delta"]["content"] = whole[sent:safe]
                sent = safe
            if ch["delta"]:  # the first chunk's role, or text
                yield P.sse(data)
            continue
        reason, whole = ch["finish_reason"], "".join(text)
        content, calls = tool_calls(whole, choice, parser)
        delta: dict[str, Any] = {}
        if calls:
            if content and sent == 0:
                delta["content"] = content
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
        elif whole[sent:]:
            delta["content"] = whole[sent:]
        if delta:
            yield P.sse({**data, "choices": [{**ch, "delta": delta, "finish_reason": None}]})
        yield P.sse({**data, "choices": [{**ch, "delta": {}, "finish_reason": finish_reason(choice, calls, reason)}]})
