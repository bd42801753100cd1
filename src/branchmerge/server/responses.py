"""OpenAI's Responses API (``POST /v1/responses``, ``GET``/``DELETE /v1/responses/{id}``,
``GET /v1/responses/{id}/input_items``), as vLLM serves it, over the chat completions path.

A request is read into a chat request (``input`` and ``instructions`` as messages, ``text.format`` as
``response_format``, function tools, ``max_output_tokens``, sampling fields and vLLM's extensions as they
are) and answered by the service's ``chat`` — so routing (``model: "auto"``), pipelines, batching, tools,
structured outputs and limits are those of chat completions, on ``serve`` and on ``gateway`` alike. The answer
becomes a ``response`` object (output items: a message of ``output_text``, function calls), or with
``stream`` the Responses event stream (``response.created`` … ``response.output_text.delta`` …
``response.completed``). Responses are stored in memory (``store``, the default; at most ``max_stored``,
least recently used out first, and ``max_chars`` of conversation in all) so that ``previous_response_id``
continues a conversation; nothing is written to disk."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from branchmerge.server import protocol as P
from branchmerge.server.streams import Reply

Disconnected = Callable[[], Awaitable[bool]]
MAX_INPUT_ITEMS = 1024  # items of one request's input list
MAX_METADATA = 16  # as OpenAI: keys of 64 characters, values of 512
STORED_RESPONSES = 1024  # responses kept for previous_response_id and GET (0: none)
STORED_CHARS = 64 << 20  # characters of stored conversations, all responses together
_TEXT_PARTS = ("input_text", "output_text", "text")
# chat request fields named as a Responses request names them, for error messages
_FIELDS = {"max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens", "messages": "input",
           "response_format": "text.format"}


class ResponsesRequest(BaseModel):
    """A ``POST /v1/responses`` body. Fields not listed here (vLLM's ``top_k``, ``min_p``, ``seed``,
    ``repetition_penalty``…) pass to the chat request as they are."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(max_length=256)
    input: str | list[dict[str, Any]] = Field(description="The prompt, or a list of input items (messages, "
                                              "function calls and their outputs).")
    instructions: str | None = Field(default=None, description="A system message put first (not carried over "
                                     "from a previous response).")
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = Field(default=None, max_length=128)
    text: dict[str, Any] | None = Field(default=None, description='{"format": {"type": "text" | "json_object" '
                                        '| "json_schema", ...}}')
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = Field(default=None, max_length=16)
    background: bool = False
    user: str | None = Field(default=None, max_length=256)
    service_tier: str | None = None


class ResponseStore:
    """Stored responses in memory: each response's object, its input items and its whole conversation (the
    messages a ``previous_response_id`` continues from). Bounded by count and by characters (of all three,
    as JSON); least recently used out first."""

    def __init__(self, max_responses: int = STORED_RESPONSES, max_chars: int = STORED_CHARS) -> None:
        self.max_responses, self.max_chars = max_responses, max_chars
        self._items: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], int]] = \
            OrderedDict()
        self.chars = 0

    def put(self, response: dict[str, Any], inputs: list[dict[str, Any]], messages: list[dict[str, Any]]) -> None:
        size = len(json.dumps(response)) + len(json.dumps(messages)) + len(json.dumps(inputs))
        if self.max_responses <= 0 or size > self.max_chars:
            return
        self._items[response["id"]] = (response, inputs, messages, size)
        self.chars += size
        while len(self._items) > self.max_responses or self.chars > self.max_chars:
            _, (*_, old) = self._items.popitem(last=False)
            self.chars -= old

    def __len__(self) -> int:
        return len(self._items)

    def get(self, rid: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]] | None:
        got = self._items.get(rid)
        if got is None:
            return None
        self._items.move_to_end(rid)
        return got[:3]

    def delete(self, rid: str) -> bool:
        got = self._items.pop(rid, None)
        if got is not None:
            self.chars -= got[3]
        return got is not None


def _text(content: Any, where: str) -> str:
    """A message item's content: a string, or a list of text parts (``input_text``/``output_text``)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise P.APIError(400, f"{where}.content is a string or a list of input_text parts", param="input")
    out = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise P.APIError(400, f"{where}.content[{k}] of type {kind!r} is not supported: this server reads "
                                  "text parts (input_text, output_text)", param="input")
        out.append(part["text"])
    return "".join(out)


def input_messages(items: str | list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The chat messages of a request's ``input``, and its input items as stored (each with an ``id``)."""
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": items}]}]
    if not items:
        raise P.APIError(400, "input must be a non-empty string or list", param="input")
    if len(items) > MAX_INPUT_ITEMS:
        raise P.APIError(400, f"{len(items)} input items; this server takes at most {MAX_INPUT_ITEMS}", param="input")
    messages: list[dict[str, Any]] = []
    stored = []
    for i, item in enumerate(items):
        where, kind = f"input[{i}]", item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise P.APIError(400, f"{where}.role must be user, system, developer or assistant, got {role!r}",
                                 param="input")
            messages.append({"role": "system" if role == "developer" else role,
                             "content": _text(item.get("content"), where)})
            prefix = "msg"
        elif kind == "function_call":
            name, args, call_id = item.get("name"), item.get("arguments", ""), item.get("call_id")
            if not all(isinstance(v, str) for v in (name, args, call_id)):
                raise P.APIError(400, f"{where}: a function_call has string name, arguments and call_id", param="input")
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"] \
                    and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            prefix = "fc"
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not isinstance(output, str):
                raise P.APIError(400, f"{where}: a function_call_output has a string call_id and output", param="input")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
            prefix = "fco"
        else:
            raise P.APIError(400, f"{where} of type {kind!r} is not supported: input items are messages, "
                                  "function_call and function_call_output", param="input")
        stored.append({"id": item.get("id") or f"{prefix}_{uuid.uuid4().hex[:24]}", "type": kind,
                       **{k: v for k, v in item.items() if k not in ("id", "type")}})
    return messages, stored


def chat_fields(req: ResponsesRequest) -> dict[str, Any]:
    """The chat completion request fields (but ``messages``) that ``req`` asks for; a 400 for what this
    server does not do."""
    refused = {"background": req.background, "reasoning": req.reasoning and any(req.reasoning.values()),
               "truncation": req.truncation == "auto"}
    if req.service_tier not in (None, "auto", "default"):
        refused["service_tier"] = True
    extra = req.model_extra or {}
    for name in ("n", "best_of"):  # (a response has one answer)
        refused[name] = extra.get(name) not in (None, 1)
    for name, asked in refused.items():
        if asked:
            raise P.APIError(400, f"`{name}` is not supported by this server (got "
                                  f"{json.dumps(getattr(req, name, extra.get(name)))[:80]}); leave it out", param=name)
    for inc in req.include or []:
        if inc != "message.output_text.logprobs":
            raise P.APIError(400, f"include {inc[:80]!r} is not supported: this server includes "
                                  "message.output_text.logprobs only", param="include")
    if req.metadata and (len(req.metadata) > MAX_METADATA or any(len(k) > 64 or len(v) > 512
                                                                 for k, v in req.metadata.items())):
        raise P.APIError(400, f"metadata has at most {MAX_METADATA} keys of 64 characters, values of 512",
                         param="metadata")
    out: dict[str, Any] = dict(extra)
    out.update(model=req.model, stream=req.stream)
    for name in ("temperature", "top_p", "parallel_tool_calls", "user"):
        if getattr(req, name) is not None:
            out[name] = getattr(req, name)
    if req.max_output_tokens is not None:
        out["max_completion_tokens"] = req.max_output_tokens
    if req.top_logprobs or "message.output_text.logprobs" in (req.include or []):
        out.update(logprobs=True, top_logprobs=req.top_logprobs or 0)
    if req.stream:
        out["stream_options"] = {"include_usage": True}
    fmt = (req.text or {}).get("format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_schema":
            schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
            out["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif kind in ("text", "json_object"):
            out["response_format"] = {"type": kind}
        else:
            raise P.APIError(400, 'text.format is {"type": "text" | "json_object" | "json_schema", ...}',
                             param="text.format")
    if req.tools:
        tools = []
        for i, t in enumerate(req.tools):
            if t.get("type") != "function":
                raise P.APIError(400, f"tools[{i}] of type {t.get('type')!r} is not supported: this server "
                                      "calls function tools", param="tools")
            tools.append({"type": "function", "function": {k: v for k, v in t.items() if k != "type"}})
        out["tools"] = tools
    choice = req.tool_choice
    if isinstance(choice, dict):  # {"type": "function", "name": ...}
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise P.APIError(400, 'tool_choice is "none", "auto", "required" or {"type": "function", "name": ...}',
                             param="tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        out["tool_choice"] = choice
    return out


def _renamed(e: P.APIError) -> P.APIError:
    """A chat request's error, its fields named as the Responses request names them."""
    msg = e.message
    for chat, ours in _FIELDS.items():
        msg = re.sub(rf"\b{chat}\b", ours, msg)
    return P.APIError(e.status, msg, param=_FIELDS.get(e.param or "", e.param), type_=e.type, code=e.code)


def _usage(u: dict[str, int] | None) -> dict[str, Any]:
    pt, ct = (u or {}).get("prompt_tokens", 0), (u or {}).get("completion_tokens", 0)
    return {"input_tokens": pt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": ct,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": pt + ct}


def _message_item(text: str, logprobs: list[dict[str, Any]] | None, status: str, mid: str | None = None
                  ) -> dict[str, Any]:
    return {"type": "message", "id": mid or f"msg_{uuid.uuid4().hex[:24]}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]}


def _call_item(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    fn = call["function"]
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}", "call_id": call.get("id") or
            f"call_{uuid.uuid4().hex[:24]}", "name": fn["name"], "arguments": fn.get("arguments", ""), "status": status}


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as the chat messages that continue its conversation."""
    text = "".join(p["text"] for it in output if it["type"] == "message" for p in it["content"])
    calls = [{"id": it["call_id"], "type": "function", "function": {"name": it["name"], "arguments": it["arguments"]}}
             for it in output if it["type"] == "function_call"]
    return [{"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}]


class Responses:
    """``/v1/responses`` over a chat ``service`` (:class:`~.api.OpenAIService` or the gateway's)."""

    def __init__(self, service: Any, store: ResponseStore | None = None) -> None:
        self.service, self.store = service, store if store is not None else ResponseStore()

    def _object(self, rid: str, req: ResponsesRequest, created: int, status: str, output: list[dict[str, Any]],
                usage: dict[str, int] | None, reason: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"id": rid, "object": "response", "created_at": created, "model": req.model, "status": status,
                "output": output, "incomplete_details": {"reason": "max_output_tokens"} if reason == "length" else None,
                "error": None, "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
                "temperature": req.temperature, "top_p": req.top_p, "top_logprobs": req.top_logprobs,
                "tools": req.tools or [], "tool_choice": req.tool_choice or ("auto" if req.tools else "none"),
                "parallel_tool_calls": req.parallel_tool_calls is not False,
                "previous_response_id": req.previous_response_id, "store": req.store and self.store.max_responses > 0,
                "text": req.text or {"format": {"type": "text"}}, "truncation": req.truncation or "disabled",
                "metadata": req.metadata or {}, "user": req.user, "reasoning": None, "background": False,
                "service_tier": "default", "usage": _usage(usage) if usage is not None else None, **extra}

    async def create(self, req: ResponsesRequest, disconnected: Disconnected | None = None) -> Reply:
        fields = chat_fields(req)
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            got = self.store.get(req.previous_response_id)
            if got is None:
                off = " (this server stores none: --max-stored-responses 0)" if self.store.max_responses <= 0 else ""
                raise P.APIError(404, f"previous_response_id {req.previous_response_id[:128]!r} is not a stored "
                                      f"response{off}", param="previous_response_id", type_="not_found_error")
            history = got[2]
        new, inputs = input_messages(req.input)
        conversation = history + new
        system = [{"role": "system", "content": req.instructions}] if req.instructions else []
        try:
            chat_req = P.ChatRequest.model_validate({**fields, "messages": system + conversation})
        except ValidationError as e:
            raise P.invalid(e.errors(), _FIELDS) from None
        try:
            reply = await self.service.chat(chat_req, disconnected)
        except P.APIError as e:
            raise _renamed(e) from None
        rid, created = f"resp_{uuid.uuid4().hex[:24]}", int(time.time())
        if reply.stream is not None:
            return Reply(stream=self._events(reply.stream, rid, req, created, inputs, conversation),
                         headers=reply.headers)
        body = reply.body or {}
        choice = body["choices"][0]
        msg, reason = choice["message"], choice.get("finish_reason")
        status = "incomplete" if reason == "length" else "completed"
        output = []
        if msg.get("content") or not msg.get("tool_calls"):
            output.append(_message_item(msg.get("content") or "", (choice.get("logprobs") or {}).get("content"),
                                        status))
        output += [_call_item(c) for c in msg.get("tool_calls") or []]
        extra = {k: body[k] for k in ("branch", "stages") if k in body}
        out = self._object(rid, req, created, status, output, body.get("usage"), reason, **extra)
        if out["store"]:
            self.store.put(out, inputs, conversation + output_messages(output))
        return Reply(body=out, headers=reply.headers)

    async def _events(self, chunks: AsyncIterator[Any], rid: str, req: ResponsesRequest, created: int,
                      inputs: list[dict[str, Any]], conversation: list[dict[str, Any]]) -> AsyncIterator[str]:
        """The Responses event stream of a chat completion's event stream."""
        seq = 0

        def event(kind: str, **data: Any) -> str:
            nonlocal seq
            seq += 1
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **data, 'sequence_number': seq - 1})}\n\n"

        start = self._object(rid, req, created, "in_progress", [], None)
        yield event("response.created", response=start)
        yield event("response.in_progress", response=start)
        text: list[str] = []
        logprobs: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        mid, reason, usage, branch = f"msg_{uuid.uuid4().hex[:24]}", None, None, None
        opened = False
        async with aclosing(_sse_data(chunks)) as datas:
            async for data in datas:
                if "error" in data and not data.get("choices"):
                    err = data["error"]
                    yield event("error", code=err.get("code"), message=err.get("message"), param=err.get("param"))
                    failed = self._object(rid, req, created, "failed", [], None)
                    failed["error"] = {"code": err.get("code") or "server_error", "message": err.get("message")}
                    yield event("response.failed", response=failed)
                    return
                usage = data.get("usage") or usage
                branch = data.get("branch") or branch
                for ch in data.get("choices") or []:
                    delta = ch.get("delta") or {}
                    piece = delta.get("content")
                    if piece:
                        if not opened:
                            opened = True
                            yield event("response.output_item.added", output_index=0,
                                        item={**_message_item("", None, "in_progress", mid), "content": []})
                            yield event("response.content_part.added", item_id=mid, output_index=0, content_index=0,
                                        part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
                        lps = (ch.get("logprobs") or {}).get("content") or []
                        text.append(piece)
                        logprobs += lps
                        yield event("response.output_text.delta", item_id=mid, output_index=0, content_index=0,
                                    delta=piece, logprobs=lps)
                    calls += delta.get("tool_calls") or []
                    reason = ch.get("finish_reason") or reason
        status = "incomplete" if reason == "length" else "completed"
        output: list[dict[str, Any]] = []
        if opened or not calls:
            if not opened:
                yield event("response.output_item.added", output_index=0,
                            item={**_message_item("", None, "in_progress", mid), "content": []})
                yield event("response.content_part.added", item_id=mid, output_index=0, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            item = _message_item("".join(text), logprobs, status, mid)
            yield event("response.output_text.done", item_id=mid, output_index=0, content_index=0,
                        text=item["content"][0]["text"], logprobs=logprobs)
            yield event("response.content_part.done", item_id=mid, output_index=0, content_index=0,
                        part=item["content"][0])
            yield event("response.output_item.done", output_index=0, item=item)
            output.append(item)
        for call in calls:
            item, k = _call_item(call), len(output)
            yield event("response.output_item.added", output_index=k, item={**item, "arguments": "",
                                                                              "status": "in_progress"})
            yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=k,
                        delta=item["arguments"])
            yield event("response.function_call_arguments.done", item_id=item["id"], output_index=k,
                        name=item["name"], arguments=item["arguments"])
            yield event("response.output_item.done", output_index=k, item=item)
            output.append(item)
        done = self._object(rid, req, created, status, output, usage, reason,
                            **({"branch": branch} if branch else {}))
        if done["store"]:
            self.store.put(done, inputs, conversation + output_messages(output))
        yield event("response.incomplete" if status == "incomplete" else "response.completed", response=done)

    def get(self, rid: str) -> dict[str, Any]:
        return self._stored(rid)[0]

    def input_items(self, rid: str) -> dict[str, Any]:
        items = self._stored(rid)[1]
        return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
                "last_id": items[-1]["id"] if items else None, "has_more": False}

    def delete(self, rid: str) -> dict[str, Any]:
        if not self.store.delete(rid):
            raise P.APIError(404, f"response {rid[:128]!r} not found", param="response_id", type_="not_found_error")
        return {"id": rid, "object": "response.deleted", "deleted": True}

    def _stored(self, rid: str):
        got = self.store.get(rid)
        if got is None:
            raise P.APIError(404, f"response {rid[:128]!r} not found", param="response_id", type_="not_found_error")
        return got


async def _sse_data(chunks: AsyncIterator[Any]) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a stream of server-sent events (``[DONE]`` and comments left out), whatever the
    stream's chunking (the gateway passes an upstream's bytes as they come)."""
    buf = ""
    try:
        async for c in chunks:
            buf += c.decode() if isinstance(c, bytes) else c
            while "\n\n" in buf:
                ev, buf = buf.split("\n\n", 1)
                for line in ev.splitlines():
                    if line.startswith("data:") and line[5:].strip().startswith("{"):
                        yield json.loads(line[5:].strip())
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()  # the chat's work stops with the client
