"""vLLM's ``/tokenize`` and ``/detokenize`` through the gateway: a request for a branch (or ``auto``, routed
on its text) goes to that branch's upstream under the upstream's model name; the answer comes back with the
``branch``. vLLM serves these at its root, not under ``/v1``: the upstream's ``base_url`` without ``/v1``."""

from __future__ import annotations

from typing import Any

from branchmerge.server import protocol as P
from branchmerge.server.tokens import DetokenizeRequest, TokenizeRequest, branch_of, routed_text


class GatewayTokenReplies:
    """The tokenizer routes of :class:`~branchmerge.server.gateway.GatewayService` (which gives ``_resolve``,
    ``_target``, ``_post`` and ``limits``)."""

    limits: Any

    async def _forward(self, branch: str, path: str, body: dict[str, Any], key: str) -> dict[str, Any]:
        """POST ``body`` to ``path`` at the root of the branch's upstream (as the gateway's other calls: within
        its concurrency and time limits); its JSON answer must carry ``key``."""
        u, _ = self._target(branch)  # type: ignore[attr-defined]
        url = str(u.cfg.base_url).rstrip("/").removesuffix("/v1") + path
        return await self._post(branch, url, body, None, key, f"a {path} answer")  # type: ignore[attr-defined]

    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        branch = await branch_of(self._resolve, req.model, routed_text(req, self.limits), "tokenize")  # type: ignore[attr-defined]
        return await self._forward(branch, "/tokenize", req.model_dump(exclude_none=True), "tokens")

    async def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        if req.model == "auto":
            raise P.APIError(400, "detokenize needs a branch: token ids name no question to route", param="model")
        branch = await branch_of(self._resolve, req.model, "", "detokenize")  # type: ignore[attr-defined]
        return await self._forward(branch, "/detokenize", req.model_dump(), "prompt")
