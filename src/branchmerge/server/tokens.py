"""vLLM's ``/tokenize`` and ``/detokenize``: a prompt or a conversation as the token ids of the branch that
would answer it, and token ids back to text. Clients use them to count tokens against ``max_model_len``
and to build token-id prompts.

    POST /tokenize    {"model": "medical", "prompt": "..."}          -> {"count", "max_model_len", "tokens",
                      {"model": "auto", "messages": [...]}              "token_strs"}
    POST /detokenize  {"model": "medical", "tokens": [1, 2, 3]}      -> {"prompt": "..."}
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from branchmerge.errors import BranchmergeError
from branchmerge.server import protocol as P
from branchmerge.server.tools import MAX_TOOLS, Tool

MAX_DETOKENIZE = 1 << 20  # token ids in one /detokenize request


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=256)
    prompt: str | None = None
    messages: list[P.Message] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = Field(default=True, description="With a prompt: the tokenizer's BOS/EOS tokens.")
    add_generation_prompt: bool = Field(default=True, description="With messages: ready for the answer.")
    continue_final_message: bool = Field(default=False, description="With messages: the last (the assistant's) "
                                         "left open.")
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, description="With messages: more variables "
                                                        "for the chat template.")
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS, description="With messages: the tools "
                                     "the template renders (vLLM's, as chat's).")
    return_token_strs: bool = False

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return P.checked_template_kwargs(v)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=256)
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE)


def routed_text(req: TokenizeRequest, limits: Any) -> str:
    """What ``auto`` routes a tokenize request on (its prompt, or its conversation's last user message), its
    text checked against ``limits``' character limit.

    Raises:
        APIError: neither or both of prompt and messages; too long.
    """
    if (req.prompt is None) == (req.messages is None):
        raise P.APIError(400, "give one of prompt and messages", param="prompt")
    if req.prompt is not None:
        limits.check_chars(req.prompt, "prompt")
        return req.prompt
    limits.check_chars("".join(m.text() for m in req.messages), "messages")
    return next((m.text() for m in reversed(req.messages) if m.role == "user"), req.messages[-1].text())


async def branch_of(resolve: Callable[[str, str], Awaitable[tuple[str | None, str | None]]], model: str, text: str,
                    what: str) -> str:
    """The branch ``model`` names (``auto``: routed on ``text``) by a service's ``_resolve``; a pipeline is a
    400: its stages may use different tokenizers."""
    branch, pipeline = await resolve(model, text)
    if pipeline is not None or branch is None:
        raise P.APIError(400, f"{what} needs a branch, not pipeline {pipeline!r} (its stages may use "
                              "different tokenizers)", param="model")
    return branch


class TokenReplies:
    """``/tokenize`` and ``/detokenize`` of :class:`~branchmerge.server.api.OpenAIService` (which gives
    ``bundle``, ``limits`` and ``_resolve``)."""

    bundle: Any
    limits: Any

    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        text = routed_text(req, self.limits)
        try:
            msgs = None if req.messages is None else [m.as_dict() for m in req.messages]
        except ValueError as e:
            raise P.APIError(400, str(e), param="messages") from None
        template = {} if req.messages is None else P.template_options(
            req.messages, req.add_generation_prompt, req.continue_final_message, req.chat_template_kwargs,
            "add_generation_prompt" in req.model_fields_set)
        branch = await branch_of(self._resolve, req.model, text, "tokenize")  # type: ignore[attr-defined]
        tok = self.bundle.tokenizer(branch)

        def encode() -> list[int]:  # (off the event loop: a long prompt, a chat template)
            if req.prompt is not None:
                return list(tok(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])
            tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
            return self.bundle.encode_messages(msgs, branch, tools=tools, **template)

        chars = len(str(req.prompt if req.prompt is not None else msgs))
        try:
            ids = await self.off_loop(encode, chars=chars)  # type: ignore[attr-defined]
        except BranchmergeError as e:
            raise P.APIError(400, str(e), param="messages") from None
        return {"count": len(ids), "max_model_len": self.bundle.context_limit(branch), "tokens": ids,
                "token_strs": tok.convert_ids_to_tokens(ids) if req.return_token_strs else None,
                "branch": branch}

    async def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        if req.model == "auto":
            raise P.APIError(400, "detokenize needs a branch: token ids name no question to route", param="model")
        branch = await branch_of(self._resolve, req.model, "", "detokenize")  # type: ignore[attr-defined]
        try:
            self.bundle.check_ids([req.tokens], [branch], rows=["tokens"])
        except BranchmergeError as e:
            raise P.APIError(400, str(e), param="tokens") from None
        text = await self.off_loop(self.bundle.tokenizer(branch).decode, req.tokens,  # type: ignore[attr-defined]
                                   chars=4 * len(req.tokens))
        return {"prompt": text, "branch": branch}
