"""The OpenAI wire format, pure: request models with their limits, and builders of response bodies,
stream chunks and errors. No HTTP, no model; unit-tested on their own."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from itertools import accumulate
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from branchmerge.runtime.structured import Structure, StructureError
from branchmerge.server.tools import MAX_TOOLS, Tool, ToolError, chosen, tool_structure


class APIError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type_=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def invalid(errors: list[dict[str, Any]], rename: dict[str, str] | None = None) -> APIError:
    """The 400 of a request that failed validation (pydantic's ``errors()``): its first error, named by its
    field (``rename``: a field's name as the client's API calls it)."""
    err = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = ".".join(str(x) for x in err["loc"] if x != "body")
    loc = next((ours + loc[len(theirs):] for theirs, ours in (rename or {}).items() if loc.startswith(theirs)), loc)
    msg = "request body is not valid JSON" if err.get("type") == "json_invalid" else \
        err["msg"].removeprefix("Value error, ")
    return APIError(400, f"{loc}: {msg}" if loc else msg, param=loc or None)


def _no_surrogates(v: str, where: str) -> str:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where} is not valid Unicode text (it holds a lone surrogate)") from None
    return v


class ContentPart(BaseModel):
    """One part of a message's content list; only text parts are understood."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text"] = "text"
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        return _no_surrogates(v, "a content part's text")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        for part in v if isinstance(v, list) else []:
            kind = part.get("type", "text") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"a content part of type {kind!r} is not supported: this server reads text parts")
        return v

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> Any:
        return _no_surrogates(v, "message content") if isinstance(v, str) else v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def as_dict(self) -> dict[str, Any]:
        """The message for a chat template: role, text, and an assistant's ``tool_calls`` (each a function's
        name and arguments) or a tool result's ``tool_call_id`` and ``name``."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        extra = self.model_extra or {}
        calls = extra.get("tool_calls")
        if calls:
            if not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict)
                    and isinstance(c["function"].get("name"), str)
                    and isinstance(c["function"].get("arguments", ""), str) for c in calls):
                raise ValueError("an assistant message's tool_calls are {\"type\": \"function\", \"function\": "
                                 "{\"name\": str, \"arguments\": str}} objects")
            out["tool_calls"] = [{"id": str(c.get("id", "")), "type": "function",
                                  "function": {"name": c["function"]["name"],
                                               "arguments": c["function"].get("arguments", "")}} for c in calls]
        for k in ("tool_call_id", "name"):
            if isinstance(extra.get(k), str):
                out[k] = extra[k]
        return out


MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias
MAX_STOP_CHARS = 512  # characters of one stop sequence
MAX_ALLOWED_TOKENS = 1 << 16  # entries of one request's allowed_token_ids
MAX_TEMPLATE_KWARGS = 32  # variables of one request's chat_template_kwargs
MAX_TEMPLATE_KWARGS_CHARS = 4096  # their JSON
# what chat_template_kwargs may not set: apply_chat_template's own arguments, and what the request gives itself
RESERVED_TEMPLATE_NAMES = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs"})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries its choice's usage so far


class _Req(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(max_length=256)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=1 << 31,
                              description="vLLM's: the k likeliest tokens (-1 or 0: all).")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0,
                                description="vLLM's: tokens at least this fraction as likely as the likeliest.")
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, description="Token id -> bias in [-100, 100].")
    stop_token_ids: list[int] | None = Field(default=None, max_length=64,
                                             description="vLLM's: more tokens that end the answer.")
    ignore_eos: bool = Field(default=False, description="vLLM's: end of text does not end the answer.")
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0,
                                             description="vLLM's: logits of tokens seen (prompt and answer) / it.")
    min_tokens: int = Field(default=0, ge=0,
                            description="vLLM's: no stop token or stop string before this many tokens.")
    allowed_token_ids: list[int] | None = Field(default=None, min_length=1, max_length=MAX_ALLOWED_TOKENS,
                                                description="vLLM's: the answer draws only these tokens.")
    bad_words: list[str] | None = Field(default=None, max_length=64,
                                        description="vLLM's: words the answer never contains (each as it tokenizes "
                                                    "alone and after a space).")
    include_stop_str_in_output: bool = Field(default=False, description="vLLM's: the text ends with the stop string.")
    skip_special_tokens: bool = Field(default=True, description="vLLM's: special tokens are left out of the text.")
    truncate_prompt_tokens: int | None = Field(default=None, ge=1,
                                               description="vLLM's: only the prompt's last k tokens are read.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16)
    use_beam_search: bool = Field(default=False, description="vLLM's: beam search with n beams; the n best answers.")
    length_penalty: float = Field(default=1.0, ge=-10.0, le=10.0,
                                  description="vLLM's, with beam search: answers ranked by sum logprob / length ** it.")
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20, description="vLLM's: each prompt token's "
                                        "log-probability and rank, with this many likeliest tokens (not streamed).")
    seed: int | None = Field(default=None, description="Sampled choices are reproducible under it (choice k: seed+k).")
    user: str | None = None
    cache_salt: str | None = Field(default=None, max_length=256,
                                   description="vLLM's: this request reuses only the prefix-cached KV of requests "
                                               "that gave the same salt (tenants kept apart).")
    _checked: Any = PrivateAttr(default=None)  # (structure,) once checked_structure has read it

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        for s in [v] if isinstance(v, str) else v or []:  # each decoding step looks this far back per row
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"a stop sequence has at most {MAX_STOP_CHARS} characters, got {len(s)}")
            _no_surrogates(s, "stop")
        return v

    @field_validator("bad_words")
    @classmethod
    def _bad_words(cls, v: list[str] | None) -> list[str] | None:
        for w in v or []:
            if not w.strip() or len(w) > MAX_STOP_CHARS:
                raise ValueError(f"a bad word has 1 to {MAX_STOP_CHARS} characters (not only spaces), got {w[:40]!r}")
            _no_surrogates(w, "bad_words")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries, got {len(v)}")
        for k, b in v.items():
            if not k.strip().lstrip("-").isdigit() or len(k) > 12:
                raise ValueError(f"logit_bias keys are token ids, got {k[:20]!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias values are in [-100, 100], got {b} for token {k}")
        return v

    def bias(self) -> dict[int, float]:
        """``logit_bias`` with integer token ids."""
        return {int(k): float(b) for k, b in (self.logit_bias or {}).items()}

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def structure(self) -> Structure | None:
        """The structure the answer must follow (not yet checked against its grammar), from OpenAI's
        ``response_format``, vLLM's ``structured_outputs`` or its older ``guided_*`` fields (one of them)."""
        extra = self.model_extra or {}
        found: list[Structure] = []
        rf = extra.get("response_format")
        if rf is not None and (st := _response_format(rf)) is not None:
            found.append(st)
        so = extra.get("structured_outputs")
        if so is not None:
            found.append(_structured_outputs(so, "structured_outputs"))
        guided = {k[len("guided_"):]: extra[k] for k in ("guided_json", "guided_regex", "guided_choice",
                                                         "guided_grammar") if extra.get(k) is not None}
        if guided:
            if len(guided) > 1:
                raise APIError(400, f"give one of {', '.join('guided_' + k for k in guided)}",
                               param="guided_" + next(iter(guided)))
            found.append(_structured_outputs(guided, "guided_"))
        if len(found) > 1:
            raise APIError(400, f"the answer's structure is given twice ({found[0].field} and {found[1].field}); "
                                "give one", param=found[1].field)
        return found[0] if found else None


def checked_template_kwargs(v: dict[str, Any] | None) -> dict[str, Any] | None:
    """vLLM's ``chat_template_kwargs``, bounded: at most :data:`MAX_TEMPLATE_KWARGS` variables, named as
    identifiers, none of apply_chat_template's own arguments or the request's fields."""
    if not v:
        return v
    if len(v) > MAX_TEMPLATE_KWARGS or len(json.dumps(v)) > MAX_TEMPLATE_KWARGS_CHARS:
        raise ValueError(f"chat_template_kwargs takes at most {MAX_TEMPLATE_KWARGS} variables and "
                         f"{MAX_TEMPLATE_KWARGS_CHARS} characters of JSON")
    for k in v:
        if not k.isidentifier() or k.startswith("_") or k in RESERVED_TEMPLATE_NAMES:
            raise ValueError(f"chat_template_kwargs cannot set {k[:40]!r}"
                             + (" (a field of the request itself)" if k in RESERVED_TEMPLATE_NAMES else
                                ": variables are identifiers not starting with _"))
    return v


def template_options(messages: list[Message], add_generation_prompt: bool, continue_final_message: bool,
                     template_kwargs: dict[str, Any] | None, generation_prompt_given: bool) -> dict[str, Any]:
    """The keyword arguments of :func:`~branchmerge.runtime.text.encode_messages` for a request's vLLM fields,
    checked: a 400 for ``continue_final_message`` with ``add_generation_prompt`` set true too (its default,
    true, gives way), or without an assistant's last message."""
    if continue_final_message:
        if add_generation_prompt and generation_prompt_given:
            raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true",
                           param="continue_final_message")
        if not messages or messages[-1].role != "assistant":
            raise APIError(400, "continue_final_message needs the last message to be the assistant's",
                           param="continue_final_message")
    return {"add_generation_prompt": add_generation_prompt and not continue_final_message,
            "continue_final_message": continue_final_message, "template_kwargs": dict(template_kwargs or {})}


class ChatRequest(_Req):
    messages: list[Message]
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = Field(default=None, description="Each answer token's log-probability under the branch.")
    top_logprobs: int | None = Field(default=None, ge=0, le=20,
                                     description="With logprobs: this many likeliest tokens at each position.")
    add_generation_prompt: bool = Field(default=True, description="vLLM's: the template opens the assistant's "
                                        "turn after the messages.")
    continue_final_message: bool = Field(default=False, description="vLLM's: the last message (the assistant's) "
                                         "is left open and the answer goes on from its text.")
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, description="vLLM's: more variables for "
                                                        "the chat template (enable_thinking: false…).")
    _tool_parser: str | None = PrivateAttr(default=None)  # the server's (tools.PARSERS), set before reading calls

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return checked_template_kwargs(v)

    def template_options(self) -> dict[str, Any]:
        """How the conversation is rendered (see :func:`template_options`)."""
        return template_options(self.messages, self.add_generation_prompt, self.continue_final_message,
                                self.chat_template_kwargs, "add_generation_prompt" in self.model_fields_set)

    def calls(self) -> str | None:
        """None (answer in text), ``"required"``, ``"auto"`` (with the server's tool-call parser) or the name
        of the function the answer must call."""
        try:
            return chosen(self.tools, self.tool_choice, self._tool_parser)
        except ToolError as e:
            raise APIError(400, str(e), param=e.param) from None

    def structure(self) -> Structure | None:
        st = super().structure()
        choice = self.calls()
        if choice in (None, "auto"):  # (auto: answered freely, its calls read out of it)
            return st
        if st is not None:
            raise APIError(400, f"tool_choice and {st.field} both set the answer's structure; give one",
                           param=st.field)
        return tool_structure(self.tools or [], choice, self.parallel_tool_calls is not False)


class CompletionRequest(_Req):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        for p in v if isinstance(v, list) else [v]:
            if isinstance(p, str):
                _no_surrogates(p, "prompt")
        return v


# OpenAI request fields this server does not implement, each with the test of its neutral value. A request
# that sets one otherwise is refused with a 400 naming it rather than answered as if it were not there.
_NEUTRAL: dict[str, Any] = {
    "functions": lambda v: not v, "function_call": lambda v: v in (None, "none"),
    "best_of": lambda v: v in (None, 1), "suffix": lambda v: not v,
    # vLLM's sampling extensions that this server does not implement (top_k and min_p it does)
    "guided_whitespace_pattern": lambda v: v is None, "structural_tag": lambda v: v is None,
}
_NEUTRAL_CHAT: dict[str, Any] = {
    # vLLM takes a request's own Jinja template only with --trust-request-chat-template; documents go to RAG
    # templates; echo repeats the assistant's last message (with continue_final_message)
    "chat_template": lambda v: v is None, "documents": lambda v: not v, "echo": lambda v: not v,
}
_NEUTRAL_COMPLETION: dict[str, Any] = {"tools": lambda v: not v, "tool_choice": lambda v: v in (None, "none")}


def unsupported(req: _Req) -> APIError | None:
    """The 400 for the first field of ``req`` that asks for something this server does not do, if any."""
    if req.length_penalty != 1 and not req.use_beam_search:  # (it ranks beams: without them it would do nothing)
        return APIError(400, "`length_penalty` is not supported without use_beam_search (it ranks beams); leave it "
                             "out or set use_beam_search", param="length_penalty")
    table = {**_NEUTRAL, **(_NEUTRAL_CHAT if isinstance(req, ChatRequest) else _NEUTRAL_COMPLETION)}
    for name, neutral in table.items():
        value = (req.model_extra or {}).get(name, getattr(req, name, None))
        if not neutral(value):
            hint = " or use /v1/completions with `logprobs`" if name.endswith("logprobs") else ""  # (prompt_)
            return APIError(400, f"`{name}` is not supported by this server (got {json.dumps(value)[:80]}); "
                                 f"leave it out{hint}", param=name)
    return None


def checked_structure(req: _Req) -> Structure | None:
    """The request's answer structure, its schema, pattern or grammar parsed (a 400 naming the field when it
    cannot be used); read once per request, then remembered on it."""
    if req._checked is None:
        st = req.structure()
        try:
            req._checked = (None if st is None else st.check(),)
        except StructureError as e:
            raise APIError(400, str(e), param=e.field or st.field) from None
    return req._checked[0]


def _response_format(v: Any) -> Structure | None:
    """OpenAI's ``response_format``: ``{"type": "text" | "json_object" | "json_schema", "json_schema":
    {"name", "schema", "strict"?, "description"?}}`` (``text``: no structure)."""
    kind = v.get("type") if isinstance(v, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Structure("json_object", field="response_format")
    if kind == "json_schema":
        js = v.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), (dict, bool)):
            raise APIError(400, "response_format.json_schema must be an object with a `schema` object",
                           param="response_format.json_schema")
        return Structure.json_schema(js.get("schema", {}), "response_format.json_schema.schema")
    raise APIError(400, f"response_format.type must be text, json_object or json_schema, got {json.dumps(kind)[:40]}",
                   param="response_format")


def _structured_outputs(v: Any, where: str) -> Structure:
    """vLLM's ``structured_outputs`` (``{"json" | "regex" | "choice" | "grammar" | "json_object": ...}``), or
    its older ``guided_*`` fields (``where`` = ``guided_``)."""
    try:
        return Structure.from_options(v, where)
    except StructureError as e:
        raise APIError(400, str(e), param=e.field) from None


def prompt_logprobs(decode: Callable[[int], str], ids: list[int], logprobs: list[float | None],
                    ranks: list[int | None], tops: list[list[tuple[int, float]] | None]
                    ) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token (None for the first), its own ``{"logprob", "rank",
    "decoded_token"}`` and those of its position's likeliest tokens, keyed by token id."""
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for p in range(1, len(ids)):
        d = {str(ids[p]): {"logprob": logprobs[p], "rank": ranks[p], "decoded_token": decode(ids[p])}}
        for r, (i, v) in enumerate(tops[p] or [], 1):
            d.setdefault(str(i), {"logprob": v, "rank": r, "decoded_token": decode(i)})
        out.append(d)
    return out


def logprob_entry(token: str, logprob: float, top: list[tuple[str, float]] | None) -> dict[str, Any]:
    """One token of a chat answer's ``logprobs.content``, as OpenAI gives it."""
    out = {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
    out["top_logprobs"] = [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))} for t, v in top or []]
    return out


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def content(kind: str, text: str) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text}


def body(kind: str, rid: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int,
         branch: str | list[str]) -> dict[str, Any]:
    """A complete response: ``choices`` are ``(text, finish_reason)`` in index order."""
    return {
        "id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, **content(kind, text), "finish_reason": reason, "logprobs": None}
                    for i, (text, reason) in enumerate(choices)],
        "usage": usage(prompt_tokens, completion_tokens),
        "branch": branch,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def usage_chunk(kind: str, rid: str, model: str, prompt_tokens: int, completion_tokens: int) -> str:
    """The last event of a stream with ``stream_options.include_usage``: no choices, the request's usage."""
    return sse({"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": model, "choices": [],
                "usage": usage(prompt_tokens, completion_tokens)})


def merge_bodies(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """One response for several prompts: choices re-indexed in order, each with its branch; usage summed."""
    merged = dict(bodies[0])
    merged["choices"] = [{**c, "index": i, "branch": b["branch"]}
                         for i, (b, c) in enumerate((b, c) for b in bodies for c in b["choices"])]
    merged["usage"] = {k: sum(b["usage"][k] for b in bodies) for k in bodies[0]["usage"]}
    merged["branch"] = [b["branch"] for b in bodies]
    return merged


def token_logprobs(kind: str, pieces: list[str], logprobs: list[float], tops: list[list[tuple[str, float]]],
                   offset: int = 0) -> dict[str, Any]:
    """The ``logprobs`` of a choice (or of a streamed chunk) for answer tokens ``pieces`` (their text), each
    with its log-probability and likeliest tokens: chat's ``{"content": [...]}`` or the completions form
    (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset`` from ``offset``)."""
    if kind == "chat":
        return {"content": [logprob_entry(p, v, t) for p, v, t in zip(pieces, logprobs, tops)], "refusal": None}
    return {"tokens": pieces, "token_logprobs": logprobs, "top_logprobs": [dict(t) for t in tops],
            "text_offset": list(accumulate(map(len, pieces), initial=offset))[:-1]}


def continuous_usage(req: _Req) -> bool:
    """Whether a streamed request asked for vLLM's ``stream_options.continuous_usage_stats``."""
    return bool(req.stream and req.stream_options is not None and req.stream_options.continuous_usage_stats)


def chunk(kind: str, rid: str, model: str, delta: str | None, reason: str | None, branch: str, *, first: bool = False,
          index: int = 0, logprobs: dict[str, Any] | None = None, usage: tuple[int, int] | None = None) -> str:
    """One server-sent event of a streamed response (``logprobs``: those of the tokens it carries; ``usage``:
    its choice's prompt and completion tokens so far, vLLM's ``continuous_usage_stats``)."""
    if kind == "chat":
        d: dict[str, Any] = {}
        if first:
            d["role"] = "assistant"
        if delta:
            d["content"] = delta
        choice: dict[str, Any] = {"index": index, "delta": d, "finish_reason": reason, "logprobs": logprobs}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": delta or "", "finish_reason": reason, "logprobs": logprobs}
        obj = "text_completion"
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice], "branch": branch}
    if usage is not None:
        out["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    return sse(out)


def sse(data: dict[str, Any] | str) -> str:
    return "data: " + (data if isinstance(data, str) else json.dumps(data)) + "\n\n"


DONE = sse("[DONE]")


def branch_header(branches: str | list[str]) -> dict[str, str]:
    """``X-Branchmerge-Branch``: the answering branch, or the distinct ones of several choices."""
    return {"X-Branchmerge-Branch": ",".join(dict.fromkeys([branches] if isinstance(branches, str) else branches))}
