"""Anthropic's Messages API (``POST /v1/messages``, ``POST /v1/messages/count_tokens``), as vLLM serves it,
over the chat completions path: clients written against the ``anthropic`` SDK (and tools built on it) talk
to a bundle's branches.

A request is read into a chat request (``system`` first, text blocks, ``tool_use`` blocks as an assistant's
tool calls, ``tool_result`` blocks as tool messages, ``tools`` with their ``input_schema`` as functions,
``tool_choice`` auto/any/tool/none, ``stop_sequences``, sampling fields) and answered by the service's
``chat``; routing (``model: "auto"``), pipelines, batching and limits are those of chat completions. The
answer is a ``message`` (text and ``tool_use`` blocks; ``stop_reason`` ``end_turn``, ``max_tokens``,
``stop_sequence`` with the sequence that ended it, or ``tool_use``), or with ``stream`` Anthropic's event
stream. Errors have Anthropic's shape (``{"type": "error", "error": {"type", "message"}}``)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from branchmerge.server import protocol as P
from branchmerge.server.responses import _sse_data
from branchmerge.server.streams import Reply

Disconnected = Callable[[], Awaitable[bool]]
MAX_STOP_SEQUENCES = 4  # as the chat path takes them
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


class MessagesRequest(BaseModel):
    """A ``POST /v1/messages`` body. vLLM's sampling extensions (``min_p``, ``seed``, ``repetition_penalty``…)
    pass to the chat request as they are."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(max_length=256)
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=1024)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)  # (Anthropic's range)
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    service_tier: str | None = None
    output_config: dict[str, Any] | None = Field(default=None, description='{"format": {"type": "json_schema", '
                                                 '"schema": {...}}}: the answer is JSON that follows the schema.')


class CountTokensRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=256)
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=1024)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


def error_body(e: P.APIError) -> dict[str, Any]:
    """Anthropic's error JSON for ``e``."""
    kind = "api_error" if e.status >= 500 else _ERROR_TYPES.get(e.status, "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


def _blocks_text(content: Any, where: str) -> str:
    """Text of ``content``: a string, or a list of ``text`` blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise P.APIError(400, f"{where} is a string or a list of text blocks")
    out = []
    for k, b in enumerate(content):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            kind = b.get("type") if isinstance(b, dict) else type(b).__name__
            raise P.APIError(400, f"{where}[{k}] of type {kind!r} is not supported here: text blocks only")
        out.append(b["text"])
    return "".join(out)


def chat_messages(messages: list[dict[str, Any]], system: Any) -> list[dict[str, Any]]:
    """The chat messages of a Messages request."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": _blocks_text(system, "system")})
    for i, m in enumerate(messages):
        role, content, where = m.get("role"), m.get("content"), f"messages[{i}]"
        if role not in ("user", "assistant"):
            raise P.APIError(400, f"{where}.role must be user or assistant, got {str(role)[:40]!r}")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise P.APIError(400, f"{where}.content is a string or a list of content blocks")
        text, calls = [], []
        for k, b in enumerate(content):
            kind = b.get("type") if isinstance(b, dict) else None
            at = f"{where}.content[{k}]"
            if kind == "text" and isinstance(b.get("text"), str):
                text.append(b["text"])
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str) \
                        or not isinstance(b.get("input", {}), dict):
                    raise P.APIError(400, f"{at}: a tool_use block has a string id and name and an object input")
                calls.append({"id": b["id"], "type": "function",
                              "function": {"name": b["name"], "arguments": json.dumps(b.get("input", {}))}})
            elif kind == "tool_result" and role == "user":
                if not isinstance(b.get("tool_use_id"), str):
                    raise P.APIError(400, f"{at}: a tool_result block has a string tool_use_id")
                result = _blocks_text(b.get("content", ""), f"{at}.content")
                if b.get("is_error"):
                    result = f"Error: {result}"
                out.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": result})
            elif kind == "thinking" and role == "assistant":
                continue  # (a previous answer's reasoning: not sent back to the model)
            else:
                raise P.APIError(400, f"{at} of type {str(kind)[:40]!r} is not supported: this server reads text, "
                                      "tool_use (assistant) and tool_result (user) blocks")
        if text or calls or not out or out[-1]["role"] != "tool":
            out.append({"role": role, "content": "".join(text), **({"tool_calls": calls} if calls else {})})
    return out


def _tools(tools: list[dict[str, Any]] | None, choice: dict[str, Any] | None) -> dict[str, Any]:
    """The chat request's ``tools`` and ``tool_choice``."""
    out: dict[str, Any] = {}
    if tools:
        funcs = []
        for i, t in enumerate(tools):
            if t.get("type") not in (None, "custom") or not isinstance(t.get("name"), str):
                raise P.APIError(400, f"tools[{i}]: this server calls client tools ({{\"name\", \"description\", "
                                      f"\"input_schema\"}}), not {str(t.get('type'))[:40]!r}")
            funcs.append({"type": "function", "function": {
                "name": t["name"], **({"description": t["description"]} if t.get("description") else {}),
                "parameters": t.get("input_schema") or {"type": "object"}}})
        out["tools"] = funcs
    if choice is not None:
        kind = choice.get("type")
        if kind == "tool" and isinstance(choice.get("name"), str):
            out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        elif kind in ("auto", "any", "none"):
            out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
        else:
            raise P.APIError(400, 'tool_choice is {"type": "auto" | "any" | "none"} or {"type": "tool", "name": ...}')
        if choice.get("disable_parallel_tool_use"):
            out["parallel_tool_calls"] = False
    return out


def chat_request(req: MessagesRequest) -> P.ChatRequest:
    """``req`` as a chat completion request (the stop sequences kept in the answer, so that the one that ended
    it is known; :func:`_cut` takes it off)."""
    for name, neutral in (("thinking", lambda v: not v or v.get("type") == "disabled"),
                          ("service_tier", lambda v: v in (None, "auto", "standard_only"))):
        value = getattr(req, name)
        if not neutral(value):
            raise P.APIError(400, f"`{name}` is not supported by this server (got {json.dumps(value)[:80]}); "
                                  "leave it out")
    body: dict[str, Any] = {**(req.model_extra or {}), "model": req.model, "max_tokens": req.max_tokens,
                            "stream": req.stream, "messages": chat_messages(req.messages, req.system),
                            **_tools(req.tools, req.tool_choice)}
    for name in ("temperature", "top_p", "top_k"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    if req.stop_sequences:
        body.update(stop=req.stop_sequences, include_stop_str_in_output=True)
    out_cfg = req.output_config or {}
    if out_cfg.get("effort") is not None or set(out_cfg) - {"format", "effort"}:
        raise P.APIError(400, f"output_config takes a format here (got {json.dumps(out_cfg)[:80]})")
    fmt = out_cfg.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise P.APIError(400, 'output_config.format is {"type": "json_schema", "schema": {...}}')
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if isinstance(req.metadata, dict) and isinstance(req.metadata.get("user_id"), str):
        body["user"] = req.metadata["user_id"][:256]
    try:
        return P.ChatRequest.model_validate(body)
    except ValidationError as e:
        raise P.invalid(e.errors()) from None


def _cut(text: str, reason: str | None, stops: list[str]) -> tuple[str, str, str | None]:
    """``(text, stop_reason, stop_sequence)``: the answer without the stop sequence that ended it."""
    if reason == "stop":
        for s in stops:
            if text.endswith(s):
                return text[:-len(s)], "stop_sequence", s
        return text, "end_turn", None
    return text, {"length": "max_tokens", "tool_calls": "tool_use"}.get(reason or "", "end_turn"), None


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    fn = call["function"]
    try:
        args = json.loads(fn.get("arguments") or "{}")
    except json.JSONDecodeError:
        args = {}
    return {"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}", "name": fn["name"],
            "input": args if isinstance(args, dict) else {"value": args}}


def _usage(u: dict[str, int] | None) -> dict[str, int]:
    return {"input_tokens": (u or {}).get("prompt_tokens", 0), "output_tokens": (u or {}).get("completion_tokens", 0),
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


class Messages:
    """``/v1/messages`` over a chat ``service`` (:class:`~.api.OpenAIService` or the gateway's)."""

    def __init__(self, service: Any) -> None:
        self.service = service

    async def create(self, req: MessagesRequest, disconnected: Disconnected | None = None) -> Reply:
        chat = chat_request(req)
        reply = await self.service.chat(chat, disconnected)
        mid, stops = f"msg_{uuid.uuid4().hex[:24]}", list(req.stop_sequences or [])
        if reply.stream is not None:
            return Reply(stream=self._events(reply.stream, mid, req.model, stops), headers=reply.headers)
        body = reply.body or {}
        choice = body["choices"][0]
        msg = choice["message"]
        text, stop_reason, seq = _cut(msg.get("content") or "", choice.get("finish_reason"), stops)
        if msg.get("tool_calls"):
            stop_reason = "tool_use"
        content = ([{"type": "text", "text": text}] if text or not msg.get("tool_calls") else []) + \
            [_tool_use(c) for c in msg.get("tool_calls") or []]
        out = {"id": mid, "type": "message", "role": "assistant", "model": req.model, "content": content,
               "stop_reason": stop_reason, "stop_sequence": seq, "usage": _usage(body.get("usage")),
               **{k: body[k] for k in ("branch", "stages") if k in body}}
        return Reply(body=out, headers=reply.headers)

    async def _events(self, chunks: AsyncIterator[Any], mid: str, model: str, stops: list[str]) -> AsyncIterator[str]:
        """Anthropic's event stream of a chat completion's event stream. Text is held back by the longest stop
        sequence's length, so that the one that ends the answer is never sent."""

        def event(kind: str, **data: Any) -> str:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"

        yield event("message_start", message={"id": mid, "type": "message", "role": "assistant", "model": model,
                                              "content": [], "stop_reason": None, "stop_sequence": None,
                                              "usage": _usage(None)})
        hold = max((len(s) for s in stops), default=0)
        text, sent, calls, reason, usage, opened = "", 0, [], None, None, False
        async with aclosing(_sse_data(chunks)) as datas:
            async for data in datas:
                if "error" in data and not data.get("choices"):
                    yield event("error", error={"type": "api_error", "message": data["error"].get("message")})
                    return
                usage = data.get("usage") or usage
                for ch in data.get("choices") or []:
                    delta = ch.get("delta") or {}
                    text += delta.get("content") or ""
                    calls += delta.get("tool_calls") or []
                    reason = ch.get("finish_reason") or reason
                if len(text) - hold > sent:
                    if not opened:
                        opened = True
                        yield event("content_block_start", index=0, content_block={"type": "text", "text": ""})
                    yield event("content_block_delta", index=0,
                                delta={"type": "text_delta", "text": text[sent:len(text) - hold]})
                    sent = len(text) - hold
        text, stop_reason, seq = _cut(text, reason, stops)
        if calls:
            stop_reason = "tool_use"
        if len(text) > sent or (not opened and not calls):
            if not opened:
                opened = True
                yield event("content_block_start", index=0, content_block={"type": "text", "text": ""})
            if len(text) > sent:
                yield event("content_block_delta", index=0, delta={"type": "text_delta", "text": text[sent:]})
        if opened:
            yield event("content_block_stop", index=0)
        for k, call in enumerate(calls, start=int(opened)):
            block = _tool_use(call)
            yield event("content_block_start", index=k, content_block={**block, "input": {}})
            yield event("content_block_delta", index=k,
                        delta={"type": "input_json_delta", "partial_json": json.dumps(block["input"])})
            yield event("content_block_stop", index=k)
        u = _usage(usage)
        yield event("message_delta", delta={"stop_reason": stop_reason, "stop_sequence": seq},
                    usage={"input_tokens": u["input_tokens"], "output_tokens": u["output_tokens"]})
        yield event("message_stop")

    async def count_tokens(self, req: CountTokensRequest) -> dict[str, int]:
        """``{"input_tokens": n}``: the conversation as the branch's chat template renders it, tools too
        (through the service's ``/tokenize``; ``auto`` routes)."""
        from branchmerge.server.tokens import TokenizeRequest

        tokenize = getattr(self.service, "tokenize", None)
        if tokenize is None:
            raise P.APIError(404, "count_tokens is not available here")
        chat = chat_request(MessagesRequest(model=req.model, max_tokens=1, messages=req.messages, system=req.system,
                                            tools=req.tools, tool_choice=req.tool_choice, thinking=req.thinking))
        try:
            treq = TokenizeRequest.model_validate({
                "model": req.model, "messages": [m.model_dump(exclude_none=True) for m in chat.messages],
                **({"tools": [t.model_dump(exclude_none=True) for t in chat.tools]} if chat.tools else {})})
        except ValidationError as e:
            raise P.invalid(e.errors()) from None
        return {"input_tokens": (await tokenize(treq))["count"]}
