"""Structured outputs: each row's tokens constrained to a JSON schema, any JSON object, a regular
expression, one of a list of choices or an EBNF grammar (OpenAI's ``response_format``, vLLM's
``structured_outputs``).

A :class:`Structure` is the request's constraint, checked and parsed once (``xgrammar``, the backend
vLLM uses by default); a :class:`Structurer` compiles it against one tokenizer's vocabulary; a
:class:`Constraint` is one row's state, a grammar matcher fed each token the row generates. At each
decoding step :meth:`Constraint.fill` marks the tokens that keep the row's text a prefix of something the
grammar accepts; once the text is complete only the row's stop tokens are left, so it ends there.

The constraint is on the row's tokens, not on its answer's meaning: a model that does not know JSON still
writes valid JSON, and a row cut by ``max_tokens`` (finish reason ``length``) may hold incomplete JSON,
as in vLLM. JSON is written on one line, as Python's ``json.dumps`` writes it (one space after ``,`` and
``:``, none elsewhere): small models given free whitespace can fill an answer with blank lines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, get_args

import torch

from branchmerge.errors import BranchmergeError

Kind = Literal["json", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = get_args(Kind)
MAX_SPEC_CHARS = 65_536  # characters of one schema, regular expression, grammar or list of choices (as JSON)
MAX_CHOICES = 1024


class StructureError(BranchmergeError, ValueError):
    """A schema, regular expression, grammar or choice list that cannot constrain an answer; ``field``: where
    it was given (a request's or a config's field), when known."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


OPTION_KEYS = ("choice", "grammar", "json", "json_object", "regex")  # vLLM's StructuredOutputsParams fields read


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise StructureError("structured outputs need the `xgrammar` package: pip install 'branchmerge[structured]'"
                             ) from e
    return xgrammar


def _clean(e: Exception) -> str:
    """xgrammar's message without its ``[time] /path/file.cc:line:`` prefix."""
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(e).strip().splitlines()[0] if str(e).strip() else repr(e))


@dataclass(frozen=True)
class Structure:
    """What a row's answer must be. ``spec``: the JSON schema (as JSON text) for ``json``, the pattern for
    ``regex``, the EBNF grammar (root rule ``root``) for ``grammar``, the choices as a JSON list of strings
    for ``choice``; empty for ``json_object`` (any JSON object). ``field``: the request field it came from,
    named in errors."""

    kind: Kind
    spec: str = ""
    field: str = "structured_outputs"

    @classmethod
    def choices(cls, options: Sequence[str], field: str = "structured_outputs.choice") -> Structure:
        """The answer is exactly one of ``options``."""
        return cls("choice", json.dumps(list(options)), field)

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str, field: str = "structured_outputs.json") -> Structure:
        return cls("json", schema if isinstance(schema, str) else json.dumps(schema), field)

    @classmethod
    def from_options(cls, options: Any, where: str = "structured_outputs") -> Structure:
        """vLLM's ``structured_outputs`` object (``{"json" | "regex" | "choice" | "grammar" | "json_object":
        ...}``, exactly one; falsy values count as absent), as a request or a pipelines file gives it; with
        ``where`` ending in ``_`` the keys are vLLM's older ``guided_*`` fields. Not yet checked
        (:meth:`check`). Raises :class:`StructureError` naming the field."""
        if not isinstance(options, dict):
            raise StructureError(f"{where} must be an object, such as {{\"regex\": \"[0-9]+\"}}", where)
        name = (lambda k: where + k) if where.endswith("_") else (lambda k: f"{where}.{k}")
        given = {k: x for k, x in options.items() if x is not None and x is not False}
        unknown = sorted(set(given) - set(OPTION_KEYS))
        if unknown:
            raise StructureError(f"`{name(unknown[0])}` is not supported; use one of {', '.join(OPTION_KEYS)}",
                                 name(unknown[0]))
        if len(given) != 1:
            raise StructureError(f"{where.rstrip('_')} needs exactly one of {', '.join(OPTION_KEYS)}, got "
                                 f"{len(given)}", where.rstrip("_"))
        (key, x), = given.items()
        field = name(key)
        if key == "json_object":
            if x is not True:
                raise StructureError(f"{field} must be true", field)
            return cls("json_object", field=field)
        if key == "json":
            if not isinstance(x, (dict, str)):
                raise StructureError(f"{field} must be a JSON schema (an object or its JSON text)", field)
            return cls.json_schema(x, field)
        if key == "choice":
            if not isinstance(x, list):
                raise StructureError(f"{field} must be a list of strings", field)
            if (bad := next((i for i, c in enumerate(x) if not isinstance(c, str)), None)) is not None:
                hint = " (YAML reads yes, no, on, off unquoted as booleans: quote them)" \
                    if isinstance(x[bad], bool) else ""
                raise StructureError(f"{field} must be a list of strings; item {bad} is "
                                     f"{json.dumps(x[bad])[:40]}{hint}", field)
            return cls.choices(x, field)
        if not isinstance(x, str):
            raise StructureError(f"{field} must be a string", field)
        return cls(key, x, field)

    def check(self) -> Structure:
        """Parse the spec (cached); raises :class:`StructureError` naming ``field`` and what is wrong."""
        _grammar(self.kind, self.spec, self.field)
        return self


@lru_cache(maxsize=256)
def _grammar(kind: str, spec: str, field: str) -> Any:
    """The xgrammar ``Grammar`` of a spec (parsed once per distinct spec)."""
    if kind not in KINDS:
        raise StructureError(f"{field}: unknown structure kind {kind!r} (one of {', '.join(KINDS)})", field)
    if len(spec) > MAX_SPEC_CHARS:
        raise StructureError(f"{field} has {len(spec):,} characters; at most {MAX_SPEC_CHARS:,}", field)
    xgr = _xgrammar()
    try:
        if kind == "json_object":
            # any JSON object: the schema {"type": "object"} (xgrammar's built-in grammar allows any value)
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "json":
            try:
                schema = json.loads(spec)
            except json.JSONDecodeError as e:
                raise StructureError(f"{field} is not valid JSON: {e}", field) from None
            if not isinstance(schema, (dict, bool)):
                raise StructureError(f"{field} must be a JSON schema (an object), got {type(schema).__name__}", field)
            return xgr.Grammar.from_json_schema(spec, any_whitespace=False)
        if kind == "regex":
            if not spec:
                raise StructureError(f"{field} is an empty regular expression", field)
            return xgr.Grammar.from_regex(spec)
        if kind == "choice":
            options = json.loads(spec)
            if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
                raise StructureError(f"{field} must be a non-empty list of non-empty strings", field)
            if len(options) > MAX_CHOICES:
                raise StructureError(f"{field} has {len(options)} choices; at most {MAX_CHOICES}", field)
            # EBNF string literals take JSON's escapes
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(o) for o in dict.fromkeys(options)))
        if not spec.strip():
            raise StructureError(f"{field} is an empty grammar", field)
        return xgr.Grammar.from_ebnf(spec)
    except StructureError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError (and ValueError/TypeError) for a bad spec
        what = {"json": "JSON schema", "regex": "regular expression", "grammar": "EBNF grammar"}.get(kind, "spec")
        raise StructureError(f"{field} is not a usable {what}: {_clean(e)}", field) from None


class Structurer:
    """Compiles structures against one tokenizer's vocabulary (``vocab_size``: the model's logits width,
    which may exceed the tokenizer's). Compiled grammars are cached by xgrammar."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> None:
        xgr = _xgrammar()
        self.vocab_size, self.stop_ids = vocab_size, sorted(set(stop_ids))
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=self.stop_ids or None)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2)

    def compile(self, structure: Structure) -> Any:
        """``structure`` compiled against this vocabulary (cached: the server compiles a request's on a worker
        thread before its jobs reach the engine, up to ~0.3 s for a 25 KB schema and a 49k vocabulary)."""
        return self.compiler.compile_grammar(_grammar(structure.kind, structure.spec, structure.field))

    def constraint(self, structure: Structure, stops: Sequence[int] | None = None) -> Constraint:
        """A fresh row state for ``structure``, ending on ``stops`` (default: the tokenizer's end of text)
        once the answer is complete."""
        xgr = _xgrammar()
        compiled = self.compile(structure)
        stops = sorted(set(stops or ())) or self.stop_ids
        return Constraint(xgr.GrammarMatcher(compiled, override_stop_tokens=stops or None,
                                             terminate_without_stop_token=not stops), stops,
                          words=(self.vocab_size + 31) // 32)


class Constraint:
    """One row's grammar state. ``accepted``: how many of the row's generated tokens it has taken;
    ``complete``: the grammar took one of the row's ``stops`` (the answer is whole; a row that goes on, with
    ``ignore_eos``, may draw only stop tokens, as in vLLM); ``done``: a token from outside the grammar came
    (the padding of an ended row): the row is no longer masked."""

    def __init__(self, matcher: Any, stops: Sequence[int] = (), words: int | None = None) -> None:
        self.matcher, self.stops, self.accepted, self.complete, self.done = matcher, list(stops), 0, False, False
        self.words = words  # the bitmask row of its own vocabulary, in int32 words (None: the batch's)
        self._own: torch.Tensor | None = None  # that row, filled here when the batch's is wider
        self._stop_words: torch.Tensor | None = None  # the bitmask row of only its stop tokens, once complete

    def feed(self, tokens: Sequence[int]) -> None:
        """Take the row's next generated tokens, in order."""
        for t in tokens:
            self.accepted += 1
            if self.done or (self.complete and int(t) in self.stops):
                continue
            if self.complete or not self.matcher.accept_token(int(t)):
                self.done = True
            elif self.matcher.is_terminated():
                self.complete = True

    def fill(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the tokens the row may draw next into row ``row`` of ``bitmask`` (``[B, ceil(V/32)]``
        int32); False when the row is done (its row of the mask is left as it is)."""
        if self.done:
            return False
        if self.complete:  # only its stop tokens
            if self._stop_words is None:
                words = [0] * bitmask.shape[1]
                for t in self.stops:
                    words[t // 32] |= 1 << (t % 32)
                self._stop_words = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words],
                                                dtype=torch.int32)
            bitmask[row] = self._stop_words
            return bool(self.stops)
        if self.words is None or self.words == bitmask.shape[1]:
            self.matcher.fill_next_token_bitmask(bitmask, row)
        else:  # a batch with another branch's larger vocabulary: this row's tokens past its own stay forbidden
            if self._own is None:
                self._own = torch.zeros((1, self.words), dtype=torch.int32)
            self.matcher.fill_next_token_bitmask(self._own, 0)
            bitmask[row].zero_()
            n = min(self.words, bitmask.shape[1])
            bitmask[row, :n] = self._own[0, :n]
        return True


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """``[rows, ceil(vocab_size/32)]`` int32, every token allowed."""
    return _xgrammar().allocate_token_bitmask(rows, vocab_size)


def apply_bitmask(scores: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set ``scores[r, t]`` (``[B, V]``) to -inf where row ``r`` of ``bitmask`` forbids token ``t``, for ``rows``."""
    _xgrammar().apply_token_bitmask_inplace(scores, bitmask.to(scores.device, non_blocking=True),
                                            vocab_size=scores.shape[1], indices=rows)
