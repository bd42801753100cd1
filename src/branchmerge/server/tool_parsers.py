"""Tool calls read out of free answers (``tool_choice: "auto"``), in the formats models are trained to write,
as vLLM's ``--tool-call-parser`` reads them. Pure string functions, one registry (:data:`PARSERS`).

Each parser gives ``(content, calls)``: the text before the calls (None when empty) and each call as
``{"name", "parameters"}``; no call at all unless every part of the call section reads as one (a half-written
or malformed call leaves the whole answer as text). :meth:`ToolParser.safe` says how much of a partial answer
can be streamed as text: everything before where a call may be beginning.

- ``hermes`` (Qwen2.5, Qwen3, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks.
- ``llama3_json`` (Llama 3.1/3.3): the answer is ``{"name": ..., "parameters": {...}}`` objects, separated by
  ``;``, after an optional ``<|python_tag|>``.
- ``mistral``: ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}``, or (newer tokenizers)
  ``[TOOL_CALLS]name[ARGS]{...}`` repeated.
- ``pythonic`` (Llama 3.2, Llama 4): the answer is a Python list of calls, ``[f(a=1, b="x"), g()]``; read with
  ``ast`` (never run), its arguments literals only.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Calls = list[dict[str, Any]]
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _call(obj: Any, keys: tuple[str, ...] = ("arguments", "parameters")) -> dict[str, Any] | None:
    """``{"name", "parameters"}`` of a decoded call object (arguments given as an object or its JSON text), or
    None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in keys if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return {"name": obj["name"], "parameters": args} if isinstance(args, dict) else None


def parse_hermes(text: str) -> tuple[str | None, Calls]:
    start = text.find("<tool_call>")
    if start < 0:
        return text, []
    calls = []
    for block in _HERMES.findall(text[start:]):
        try:
            c = _call(json.loads(block))
        except json.JSONDecodeError:
            return text, []
        if c is None:
            return text, []
        calls.append(c)
    return text[:start].strip() or None, calls


def _json_objects(text: str, sep: str = ";") -> list[Any] | None:
    """The JSON values ``text`` is made of (separated by ``sep`` and whitespace), or None if anything else is
    in it."""
    dec, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == sep):
            i += 1
        if i == len(text):
            return out or None
        try:
            value, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        out.append(value)


def parse_llama3_json(text: str) -> tuple[str | None, Calls]:
    body = text.strip()
    body = body.removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    values = _json_objects(body)
    calls = [_call(v) for v in values or []]
    if not calls or None in calls:
        return text, []
    return None, calls  # type: ignore[return-value]


_MISTRAL_ARGS = re.compile(r"\s*([A-Za-z_][\w.\-]*)\s*(?:\[ARGS\])?\s*")


def parse_mistral(text: str) -> tuple[str | None, Calls]:
    start = text.find("[TOOL_CALLS]")
    if start < 0:
        return text, []
    content = text[:start].strip() or None
    rest = text[start:].replace("[TOOL_CALLS]", " ").strip()
    if rest.startswith("["):  # a JSON list of calls
        try:
            values = json.loads(rest)
        except json.JSONDecodeError:
            return text, []
        calls = [_call(v) for v in values] if isinstance(values, list) else []
        return (content, calls) if calls and None not in calls else (text, [])  # type: ignore[return-value]
    calls, dec, i = [], json.JSONDecoder(), 0  # name[ARGS]{...} (or name{...}), repeated
    while i < len(rest):
        m = _MISTRAL_ARGS.match(rest, i)
        if not m:
            return text, []
        try:
            args, i = dec.raw_decode(rest, m.end())
        except json.JSONDecodeError:
            return text, []
        c = _call({"name": m.group(1), "arguments": args})
        if c is None:
            return text, []
        calls.append(c)
        while i < len(rest) and rest[i].isspace():
            i += 1
    return (content, calls) if calls else (text, [])


def parse_pythonic(text: str) -> tuple[str | None, Calls]:
    body = text.strip().removeprefix("<|python_start|>").removesuffix("<|python_end|>").strip()
    if not body.startswith("[") or len(body) > 65_536:
        return text, []
    try:
        tree = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        return text, []
    if not isinstance(tree, ast.List) or not tree.elts:
        return text, []
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or node.args or not isinstance(node.func, (ast.Name, ast.Attribute)):
            return text, []
        name = ast.unparse(node.func)
        try:
            args = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return text, []
        if len(args) != len(node.keywords):  # a **kwargs
            return text, []
        try:
            json.dumps(args)
        except (TypeError, ValueError):  # a set, bytes or complex number: not JSON
            return text, []
        calls.append({"name": name, "parameters": args})
    return None, calls


@dataclass(frozen=True)
class ToolParser:
    """A format of tool calls: ``parse`` reads an answer; ``marker`` is what a call section begins with,
    anywhere in the answer or (``at_start``) only at its beginning, where ``openers`` may begin it too."""

    name: str
    parse: Callable[[str], tuple[str | None, Calls]]
    marker: str
    at_start: bool = False
    openers: tuple[str, ...] = ()
    special: bool = False  # its marker is a special token: the answer is decoded with special tokens kept

    def safe(self, text: str) -> int:
        """How many of the first characters of the partial answer ``text`` are text whatever comes next (they
        can be streamed as content); the rest may be (the beginning of) a call section, held back."""
        if self.at_start:
            body = text.lstrip()
            if not body:
                return 0
            starts = (self.marker, *self.openers)
            if any(s.startswith(body[:len(s)]) for s in starts):
                return 0  # (it begins as a call would: all held, whatever follows)
            return len(text)
        i = text.find(self.marker)
        if i >= 0:
            return i
        for k in range(min(len(self.marker) - 1, len(text)), 0, -1):  # a marker's beginning at the end
            if self.marker.startswith(text[-k:]):
                return len(text) - k
        return len(text)


PARSERS: dict[str, ToolParser] = {p.name: p for p in (
    ToolParser("hermes", parse_hermes, "<tool_call>"),
    ToolParser("llama3_json", parse_llama3_json, "<|python_tag|>", at_start=True, openers=("{",)),
    ToolParser("mistral", parse_mistral, "[TOOL_CALLS]", special=True),
    ToolParser("pythonic", parse_pythonic, "[", at_start=True, openers=("<|python_start|>",)),
)}
