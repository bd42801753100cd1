"""Tool calling (OpenAI's ``tools`` and ``tool_choice``). ``tool_choice: "required"`` and a named function go
through structured outputs, as vLLM does them: the answer is constrained to a JSON list of calls
(``[{"name": ..., "parameters": {...}}, ...]``, each a tool's name and arguments of its ``parameters``
schema), or to the named function's arguments, and comes back as the message's ``tool_calls``. ``"auto"``
(the model decides whether to call) needs a parser of the model's own call format: with one
(``serve --tool-call-parser hermes|llama3_json|mistral|pythonic``, :mod:`.tool_parsers`) the answer is
generated freely and its calls read out of it; without, ``"auto"`` is refused, as vLLM refuses it. Pure: wire format in, structures and response parts out."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from branchmerge.runtime.structured import Structure
from branchmerge.server.tool_parsers import PARSERS

MAX_TOOLS = 128  # as OpenAI


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = Field(default=None, max_length=16_384)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: FunctionDef


class ToolError(ValueError):
    """A ``tools``/``tool_choice`` combination this server cannot answer; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _parameters(f: FunctionDef) -> dict[str, Any]:
    return f.parameters if f.parameters is not None else {"type": "object", "properties": {}}


def chosen(tools: list[Tool] | None, tool_choice: Any, parser: str | None = None) -> str | None:
    """What the request asks of the tools: None (answer in text: no tools, or ``"none"``), ``"required"``,
    ``"auto"`` (only with a ``parser``) or the name of the function it must call. Raises :class:`ToolError`
    for ``"auto"`` without a parser and a choice that names no tool."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ToolError("tool_choice needs tools", "tool_choice")
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ToolError(f"tools name the function {twice!r} twice", "tools")
    if tool_choice == "none":
        return None
    if tool_choice in (None, "auto") and parser is not None:
        return "auto"
    if tool_choice in (None, "auto"):
        raise ToolError('tool_choice "auto" (the default with tools) needs a parser of the model\'s own tool-call '
                        f'format (serve --tool-call-parser {"|".join(PARSERS)}); or set '
                        'tool_choice to "required" or to {"type": "function", "function": {"name": ...}}',
                        "tool_choice")
    if tool_choice == "required":
        return "required"
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or (isinstance(tool_choice, dict)
                                     and tool_choice.get("type", "function") != "function"):
        raise ToolError('tool_choice is "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
                        "tool_choice")
    if name not in names:
        raise ToolError(f"tool_choice names {name[:64]!r}, which is not among the tools", "tool_choice")
    return name


def tool_structure(tools: list[Tool], choice: str, parallel: bool = True) -> Structure:
    """The structure of an answer that calls tools: the named function's arguments, or for ``"required"`` a
    JSON list of ``{"name", "parameters"}`` calls (one at most unless ``parallel``)."""
    if choice != "required":
        f = next(t.function for t in tools if t.function.name == choice)
        return Structure.json_schema(_parameters(f), f"tools[{f.name}].parameters")
    call = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                        "parameters": _parameters(t.function)},
                       "required": ["name", "parameters"], "additionalProperties": False} for t in tools]}
    schema: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return Structure.json_schema(schema, "tools")


def tool_calls(text: str, choice: str, parser: str = "hermes") -> tuple[str | None, list[dict[str, Any]] | None]:
    """``(content, tool_calls)`` of an answer: made under :func:`tool_structure` (content None; no calls
    when the answer is not complete JSON, as when ``max_tokens`` cut it), or for ``"auto"`` read with
    ``parser`` (one of :data:`~.tool_parsers.PARSERS`; content: the text before the calls)."""
    if choice == "auto":
        content, calls = PARSERS[parser].parse(text)
        if not calls:
            return text, None
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text, None
        calls = [{"name": choice, "parameters": value}] if choice != "required" else value
        content = None
        if not isinstance(calls, list):
            return text, None
    return content, [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": c.get("name"), "arguments": json.dumps(c.get("parameters", {}))}}
                     for c in calls if isinstance(c, dict)]


def finish_reason(choice: str, calls: list | None, reason: str) -> str:
    """An answer's finish reason: ``tool_calls`` for calls made under ``"required"`` or ``"auto"`` that ended
    by themselves (a named function's stays ``stop``, as OpenAI gives it)."""
    return "tool_calls" if calls and choice in ("required", "auto") and reason == "stop" else reason


def answer_calls(body: dict[str, Any], choice: str, parser: str = "hermes") -> dict[str, Any]:
    """A chat response whose answers were made under :func:`tool_structure` (or, for ``"auto"``, freely),
    each one with calls as its message's ``tool_calls`` (``content`` null, or for ``"auto"`` the text before
    the calls; finish reason ``tool_calls`` for ``"required"`` and ``"auto"``, ``stop`` for a named
    function, as vLLM and OpenAI give them). An answer cut short, or without calls, stays text."""
    for c in body["choices"]:
        content, calls = tool_calls(c["message"].get("content") or "", choice, parser)
        if calls:
            c["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
            c["finish_reason"] = finish_reason(choice, calls, c["finish_reason"])
    return body
