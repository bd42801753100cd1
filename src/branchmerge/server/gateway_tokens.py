"""vLLM's ``/tokenize`` and ``/detokenize`` through the gateway: a request for a branch (or ``auto``, routed
on its text) goes to that branch's upstream under the upstream's model name; the answer comes back with the
``branch``. vLLM serves these at its root, not under ``/v1``: the upstream's ``base_url`` without ``/v1``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from branchmerge.server import protocol as P
from branchmerge.server.tokens import DetokenizeRequest, TokenizeRequest


class GatewayTokenReplies:
    """The tokenizer routes of :class:`~branchmerge.server.gateway.GatewayService` (which gives ``_resolve``,
    ``_target``, ``_read`` and ``limits``)."""

    limits: Any

    async def _branch(self, model: str, text: str, what: str) -> str:
        branch, pipeline = await self._resolve(model, text)  # type: ignore[attr-defined]
        if pipeline is not None or branch is None:
            raise P.APIError(400, f"{what} needs a branch, not pipeline {pipeline!r} (its stages may use "
                                  "different tokenizers)", param="model")
        return branch

    async def _forward(self, branch: str, path: str, body: dict[str, Any], key: str) -> dict[str, Any]:
        """POST ``body`` to ``path`` at the root of the branch's upstream within its ``timeout_s`` (its
        concurrency limit held); its JSON answer must carry ``key``."""
        u, name = self._target(branch)  # type: ignore[attr-defined]
        root = str(u.cfg.base_url).rstrip("/").removesuffix("/v1")
        await u.acquire()
        try:
            r, text = await asyncio.wait_for(self._read(u, root + path, {**body, "model": name}),  # type: ignore[attr-defined]
                                             timeout=u.cfg.timeout_s)
        except TimeoutError:
            raise u.error(httpx.ReadTimeout("total")) from None
        except httpx.HTTPError as e:
            raise u.error(e) from None
        finally:
            u.release()
        if r.status_code != 200:
            raise u.status_error(r, text)
        try:
            out = json.loads(text)
            assert isinstance(out, dict) and key in out
        except (ValueError, AssertionError):
            raise u.bad_response(f"something that is not a {path} answer (a JSON object with `{key}`)") from None
        return {**out, "branch": branch}

    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        if (req.prompt is None) == (req.messages is None):
            raise P.APIError(400, "give one of prompt and messages", param="prompt")
        if req.prompt is not None:
            text = req.prompt
            self.limits.check_chars(text, "prompt")
        else:
            text = next((m.text() for m in reversed(req.messages) if m.role == "user"), req.messages[-1].text())
            self.limits.check_chars("".join(m.text() for m in req.messages), "messages")
        branch = await self._branch(req.model, text, "tokenize")
        return await self._forward(branch, "/tokenize", req.model_dump(exclude_none=True), "tokens")

    async def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        if req.model == "auto":
            raise P.APIError(400, "detokenize needs a branch: token ids name no question to route", param="model")
        branch = await self._branch(req.model, "", "detokenize")
        return await self._forward(branch, "/detokenize", req.model_dump(), "prompt")
