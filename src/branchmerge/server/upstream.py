"""The gateway's upstreams: their configuration, and one HTTP client each with a concurrency limit, bounded
reads (time and bytes) and failures as OpenAI errors naming the upstream."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from branchmerge.server import protocol as P
from branchmerge.server.api import ClientGone
from branchmerge.server.metrics import Family


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UpstreamConfig(_Frozen):
    base_url: str = Field(description="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.")
    api_key: str | None = Field(default=None, description="Bearer key sent upstream (prefer api_key_env).")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the key.")
    max_concurrency: int = Field(default=16, ge=1, le=4096, description="Requests in flight to this upstream.")
    queue_timeout_s: float = Field(default=30.0, gt=0, description="Longest wait for a free slot before a 503.")
    timeout_s: float = Field(default=120.0, gt=0, description=(
        "Longest wait for the upstream's whole answer; in a stream, for each next event."))
    connect_timeout_s: float = Field(default=5.0, gt=0)
    max_response_bytes: int = Field(default=64 << 20, ge=1024,
                                    description="Largest upstream response read (a stream's too).")
    lora: bool = Field(default=False, description="Loads LoRA adapters at runtime (see server.gateway_lora).")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^\s/]+(/\S*)?$", v):
            raise ValueError(f"base_url must be an http(s) URL, got {v!r}")
        return v.rstrip("/")

    def key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else self.api_key


class Upstream:
    """One upstream: its HTTP client, a concurrency limit, and its failures as OpenAI errors naming it."""

    def __init__(self, name: str, cfg: UpstreamConfig) -> None:
        self.name, self.cfg = name, cfg
        self.slots = asyncio.Semaphore(cfg.max_concurrency)
        self.in_flight = 0
        self.errors: Family | None = None  # upstream errors by code, on /metrics
        headers = {"Authorization": f"Bearer {cfg.key()}"} if cfg.key() else {}
        self.client = httpx.AsyncClient(base_url=cfg.base_url, headers=headers, timeout=httpx.Timeout(
            cfg.timeout_s, connect=cfg.connect_timeout_s), limits=httpx.Limits(max_connections=cfg.max_concurrency))

    def _counted(self, e: P.APIError) -> P.APIError:
        if self.errors is not None:
            self.errors.inc(self.name, e.code or str(e.status))
        return e

    def error(self, e: Exception) -> P.APIError:
        where = f"upstream {self.name!r} ({self.cfg.base_url})"
        if isinstance(e, httpx.TimeoutException):
            return self._counted(P.APIError(504, f"{where} did not answer within {self.cfg.timeout_s:g} s",
                                            type_="upstream_error", code="upstream_timeout"))
        return self._counted(P.APIError(502, f"{where} is unreachable ({type(e).__name__})", type_="upstream_error",
                                        code="upstream_unreachable"))

    async def acquire(self) -> None:
        try:
            await asyncio.wait_for(self.slots.acquire(), self.cfg.queue_timeout_s)
        except TimeoutError:
            raise self._counted(P.APIError(
                503, f"upstream {self.name!r} is at its limit of {self.cfg.max_concurrency} requests; try again later",
                type_="server_error", code="upstream_busy")) from None
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self.slots.release()

    def bad_response(self, what: str) -> P.APIError:
        return self._counted(P.APIError(502, f"upstream {self.name!r} answered with {what}", type_="upstream_error",
                                        code="upstream_bad_response"))

    def too_large(self) -> P.APIError:
        return self._counted(P.APIError(502, f"upstream {self.name!r} sent a response larger than its limit of "
                                             f"{self.cfg.max_response_bytes} bytes", type_="upstream_error",
                                        code="upstream_response_too_large"))

    def answer(self, r: httpx.Response, text: str, key: str, what: str) -> dict[str, Any]:
        """The upstream's JSON object answer holding ``key`` (a list for ``choices``); else its error, or a 502."""
        if r.status_code != 200:
            raise self.status_error(r, text)
        try:
            out = json.loads(text)
            assert isinstance(out, dict) and key in out and (key != "choices" or isinstance(out[key], list))
        except (ValueError, AssertionError):
            raise self.bad_response(f"something that is not {what} (a JSON object with `{key}`)") from None
        return out

    def status_error(self, r: httpx.Response, text: str) -> P.APIError:
        try:
            err = json.loads(text).get("error") or {}
            msg = err.get("message") or text[:300]
        except (ValueError, AttributeError):
            err, msg = {}, text[:300]
        if self.errors is not None:  # by status: the upstream's own codes are not a bounded set
            self.errors.inc(self.name, f"http_{r.status_code}")
        return P.APIError(r.status_code if 400 <= r.status_code < 600 else 502, f"upstream {self.name!r}: {msg}",
                          type_=err.get("type") or "upstream_error", code=err.get("code"))

    async def body(self, r: httpx.Response) -> str:
        """The response's body, at most ``max_response_bytes`` of it (a 502 past that)."""
        parts, seen = [], 0
        async for chunk in r.aiter_bytes():
            seen += len(chunk)
            if seen > self.cfg.max_response_bytes:
                raise self.too_large()
            parts.append(chunk)
        return b"".join(parts).decode(errors="replace")

    async def read(self, path: str, body: dict[str, Any]) -> tuple[httpx.Response, str]:
        """POST and read the answer (capped)."""
        async with self.client.stream("POST", path, json=body) as r:
            return r, await self.body(r)

    async def exchange(self, path: str, body: dict[str, Any],
                       disconnected: Callable[[], Awaitable[bool]] | None = None) -> tuple[httpx.Response, str]:
        """POST ``body`` to ``path`` (under ``base_url``, or a URL) in one of this upstream's slots and read the
        answer: ``timeout_s`` bounds the whole of it (a trickle too), and a client that goes away
        (``disconnected``) cancels it, which closes the connection so the upstream stops its work.

        Raises:
            ClientGone: the client went away. APIError: a 503 (no slot in time), 504 or 502 naming the upstream.
        """
        await self.acquire()
        try:
            call = asyncio.ensure_future(self.read(path, body))
            deadline = asyncio.get_running_loop().time() + self.cfg.timeout_s
            while not call.done():
                await asyncio.wait({call}, timeout=0.25)
                if call.done():
                    break
                if disconnected is not None and await disconnected():
                    call.cancel()
                    raise ClientGone()
                if asyncio.get_running_loop().time() > deadline:
                    call.cancel()
                    raise self.error(httpx.ReadTimeout("total"))
            return call.result()
        except httpx.HTTPError as e:
            raise self.error(e) from None
        finally:
            self.release()

    async def lines(self, r: httpx.Response) -> AsyncIterator[str]:
        """A stream's non-empty lines. Each must come within ``timeout_s`` of the one before (bytes that never
        end a line do not count) and the stream holds at most ``max_response_bytes``: an upstream that
        drips, or sends one endless line, is cut off instead of holding memory and a slot for ever."""
        loop = asyncio.get_running_loop()
        chunks, buf, seen = r.aiter_bytes(), b"", 0
        deadline = loop.time() + self.cfg.timeout_s
        while True:
            try:
                chunk = await asyncio.wait_for(anext(chunks), max(deadline - loop.time(), 0.0))
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise httpx.ReadTimeout("no complete event in time") from None
            seen += len(chunk)
            if seen > self.cfg.max_response_bytes:
                raise self.too_large()
            *done, buf = (buf + chunk).split(b"\n")
            for line in done:
                deadline = loop.time() + self.cfg.timeout_s
                if line.strip():
                    yield line.decode(errors="replace").rstrip("\r")
        if buf.strip():
            yield buf.decode(errors="replace")
