"""vLLM's ``/tokenize`` and ``/detokenize`` through the gateway: a request for a branch (or ``auto``, routed
on its text) goes to that branch's upstream under the upstream's model name; the answer comes back with the
``branch``. vLLM serves these at its root, not under ``/v1``: the upstream's ``base_url`` without ``/v1``."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from branchmerge.server import protocol as P
from branchmerge.server.tokens import DetokenizeRequest, TokenizeRequest, branch_of, routed_text


class GatewayTokenReplies:
    """The tokenizer routes of :class:`~branchmerge.server.gateway.GatewayService` (which gives ``_resolve``,
    ``_target``, ``_read`` and ``limits``)."""

    limits: Any

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
        return {**u.answer(r, text, key, f"a {path} answer"), "branch": branch}

    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        branch = await branch_of(self._resolve, req.model, routed_text(req, self.limits), "tokenize")  # type: ignore[attr-defined]
        return await self._forward(branch, "/tokenize", req.model_dump(exclude_none=True), "tokens")

    async def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        if req.model == "auto":
            raise P.APIError(400, "detokenize needs a branch: token ids name no question to route", param="model")
        branch = await branch_of(self._resolve, req.model, "", "detokenize")  # type: ignore[attr-defined]
        return await self._forward(branch, "/detokenize", req.model_dump(), "prompt")
