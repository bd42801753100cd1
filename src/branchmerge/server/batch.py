"""OpenAI's batch file format run offline, as vLLM's ``run_batch``: a JSONL file of requests in, a JSONL file of
responses out, with no HTTP server. Each input line is ``{"custom_id", "method": "POST", "url", "body"}`` for
``/v1/chat/completions``, ``/v1/completions`` or ``/v1/responses``; each output line, in input order, is
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`` — the body an HTTP client
would have got (the answer, or OpenAI's error JSON with its 4xx status). A line that is not a request at all
(bad JSON, no ``custom_id``, another url or method) gets ``"response": null`` and ``"error": {"code",
"message"}`` naming the line. Requests run concurrently through the service's engine (mixed-branch batches,
``auto`` routed together), at most ``max_in_flight`` at once, so memory stays bounded on any file size."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from branchmerge.errors import BranchmergeError
from branchmerge.server import protocol as P
from branchmerge.server.names import model_aliases, renamed
from branchmerge.server.responses import Responses, ResponsesRequest, ResponseStore

logger = logging.getLogger(__name__)
MAX_LINE_CHARS = 4 << 20  # one input line (a request body's size, as the server's limit)
MAX_CUSTOM_ID = 512


class BatchLineError(ValueError):
    """An input line that is not a batch request; ``code`` says how."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class BatchRunner:
    """Runs batch lines through an :class:`~branchmerge.server.api.OpenAIService` (``service``)."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.responses = Responses(service, ResponseStore(0))  # (no stored responses: nothing to continue)
        self.endpoints: dict[str, tuple[type[BaseModel], Any]] = {
            "/v1/chat/completions": (P.ChatRequest, service.chat),
            "/v1/completions": (P.CompletionRequest, service.completions),
            "/v1/responses": (ResponsesRequest, self.responses.create)}

    def parse(self, n: int, line: str, seen: set[str]) -> tuple[str, str, dict[str, Any]]:
        """Line ``n`` (1-based) as ``(custom_id, url, body)``; :class:`BatchLineError` naming what is wrong."""
        if len(line) > MAX_LINE_CHARS:
            raise BatchLineError("line_too_long", f"line {n} has {len(line)} characters; at most {MAX_LINE_CHARS}")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BatchLineError("invalid_json", f"line {n} is not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:  # (a careless or hostile line of a million brackets)
            raise BatchLineError("invalid_json", f"line {n} nests too deeply to read") from None
        if not isinstance(obj, dict):
            raise BatchLineError("invalid_request", f"line {n} is not a JSON object")
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid or len(cid) > MAX_CUSTOM_ID:
            raise BatchLineError("invalid_custom_id", f"line {n}: custom_id must be a non-empty string of at most "
                                                      f"{MAX_CUSTOM_ID} characters")
        if cid in seen:
            raise BatchLineError("duplicate_custom_id", f"line {n}: custom_id {cid[:80]!r} was used by an earlier line")
        seen.add(cid)
        extra = set(obj) - {"custom_id", "method", "url", "body"}
        if extra:
            raise BatchLineError("invalid_request", f"line {n}: unknown field {sorted(extra)[0]!r} (a line has "
                                                    "custom_id, method, url, body)")
        if obj.get("method", "POST") != "POST":
            raise BatchLineError("invalid_method", f"line {n}: method must be POST, got {obj.get('method')!r}")
        url = obj.get("url")
        if url not in self.endpoints:
            raise BatchLineError("invalid_url", f"line {n}: url {str(url)[:80]!r} is not one of "
                                                f"{', '.join(self.endpoints)}")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise BatchLineError("invalid_request", f"line {n}: body must be a JSON object")
        return cid, url, body

    async def answer(self, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """``(status, body)`` of one request, as the HTTP server would answer it (never streamed)."""
        if body.get("stream"):
            return 400, P.error_body("stream is not supported in a batch", param="stream")
        model, call = self.endpoints[url]
        try:
            req = renamed(model.model_validate(body), getattr(self.service, "aliases", {}))
        except ValidationError as e:
            return 400, P.invalid(e.errors()).body()
        try:
            reply = await call(req)
        except P.APIError as e:
            return e.status, e.body()
        except BranchmergeError as e:
            return 400, P.error_body(str(e))
        except Exception:  # noqa: BLE001 — one request's failure is its line's, not the batch's
            ref = uuid.uuid4().hex[:8]
            logger.exception("batch request error %s", ref)
            return 500, P.error_body(f"internal error (error id {ref}; see the log)", type_="server_error")
        return 200, reply.body

    async def run(self, lines: Iterable[str], max_in_flight: int = 256) -> AsyncIterator[dict[str, Any]]:
        """One output record per non-blank input line, in input order; at most ``max_in_flight`` requests
        run (or wait, finished, for an earlier line) at once."""
        seen: set[str] = set()
        pending: asyncio.Queue[asyncio.Future | None] = asyncio.Queue()
        slots = asyncio.Semaphore(max_in_flight)  # a line holds one from its start until its record is out

        async def one(n: int, line: str) -> dict[str, Any]:
            rid = f"batch_req_{uuid.uuid4().hex[:24]}"
            try:
                cid, url, body = self.parse(n, line, seen)
            except BatchLineError as e:
                cid = None
                try:
                    got = json.loads(line)
                    cid = got.get("custom_id") if isinstance(got, dict) and isinstance(got.get("custom_id"), str) \
                        else None
                except (json.JSONDecodeError, RecursionError):
                    pass
                return {"id": rid, "custom_id": cid, "response": None, "error": {"code": e.code, "message": str(e)}}
            status, out = await self.answer(url, body)
            return {"id": rid, "custom_id": cid, "response": {"status_code": status, "request_id": rid, "body": out},
                    "error": None}

        async def feed() -> None:
            try:
                for n, line in enumerate(lines, 1):
                    if line.strip():
                        await slots.acquire()
                        pending.put_nowait(asyncio.ensure_future(one(n, line)))
            finally:
                await pending.put(None)

        feeder = asyncio.ensure_future(feed())
        try:
            while (fut := await pending.get()) is not None:
                rec = await fut
                slots.release()
                yield rec
            await feeder  # (an error reading the input ends the run with it)
        finally:
            feeder.cancel()
            while not pending.empty():
                left = pending.get_nowait()
                if left is not None:
                    left.cancel()


def run_batch_file(front: Any, input_path: str | Path, output_path: str | Path, *, max_batch: int = 16,
                   wait_ms: float = 10.0, limits: Any = None, max_in_flight: int = 256,
                   tool_call_parser: str | None = None, generation_config: str = "auto",
                   override_generation_config: dict[str, Any] | None = None, progress: bool = True,
                   served_model_names: list[str] | None = None) -> dict[str, int]:
    """Answer every request of the JSONL file ``input_path`` with ``front``'s bundle (a
    :class:`~branchmerge.front.Front`) into ``output_path``, written to a temporary file beside it and renamed at
    the end (an interrupted run leaves no output that looks complete). Returns the counts: ``lines``,
    ``succeeded`` (status 200), ``failed``. ``served_model_names``: as serve's (:mod:`~.names`)."""
    from tqdm.auto import tqdm

    from branchmerge.server.api import OpenAIService, ServerLimits

    src, out = Path(input_path), Path(output_path)
    if not src.is_file():
        raise BranchmergeError(f"batch input {src} is not a file")
    if out.exists() and (out.is_dir() or out.resolve() == src.resolve()):
        raise BranchmergeError(f"batch output {out} is " + ("a folder" if out.is_dir() else "the input file"))
    if not out.parent.is_dir():
        raise BranchmergeError(f"batch output {out}: folder {out.parent} does not exist")
    try:
        with src.open(encoding="utf-8") as f:
            total = sum(1 for line in f if line.strip())
    except UnicodeDecodeError as e:
        raise BranchmergeError(f"batch input {src} is not UTF-8 text (byte {e.start})") from None
    service = OpenAIService(front, limits=limits or ServerLimits(), max_batch=max_batch, wait_ms=wait_ms,
                            tool_call_parser=tool_call_parser, generation_config=generation_config,
                            override_generation_config=override_generation_config)
    service.aliases = model_aliases(served_model_names or [], front.model_ids())
    runner = BatchRunner(service)
    counts = {"lines": 0, "succeeded": 0, "failed": 0}
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")

    async def go() -> None:
        with src.open(encoding="utf-8") as f, tmp.open("w", encoding="utf-8") as w, \
                tqdm(total=total, desc="batch", unit="req", disable=not progress) as bar:
            async for rec in runner.run(f, max_in_flight=max_in_flight):
                w.write(json.dumps(rec, ensure_ascii=False) + "\n")
                ok = rec["response"] is not None and rec["response"]["status_code"] == 200
                counts["lines"] += 1
                counts["succeeded" if ok else "failed"] += 1
                bar.update()

    try:
        asyncio.run(go())
        os.replace(tmp, out)
    except UnicodeDecodeError as e:
        raise BranchmergeError(f"batch input {src} is not UTF-8 text (byte {e.start})") from None
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("batch %s: %d requests, %d succeeded, %d failed -> %s", src, counts["lines"], counts["succeeded"],
                counts["failed"], out)
    return counts
