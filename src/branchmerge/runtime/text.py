"""Text-side helpers used by every front end (library, CLI, server, pipelines), written once: chat
encoding, pad-token fallback, stop strings and right/left padded batches."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from branchmerge.errors import ConfigError

# below this, a temperature is greedy decoding (sampling at 1e-45 divides logits into Inf/NaN)
MIN_TEMPERATURE = 1e-5


def ensure_pad_token(tok: Any) -> Any:
    """Give a tokenizer without a pad token its eos (or unk) token as pad; returns it."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def describe_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """A system message's text listing OpenAI ``tools`` (``{"type": "function", "function": {...}}``)."""
    listed = [{k: t.get("function", {}).get(k) for k in ("name", "description", "parameters")
               if t.get("function", {}).get(k) is not None} for t in tools]
    return "You can call these functions (JSON schema of each one's parameters):\n" + json.dumps(listed)


def encode_messages(tok: Any, messages: Sequence[Mapping[str, Any]], *, chat: bool | None = None,
                    what: str = "the chat template", tools: Sequence[Mapping[str, Any]] | None = None,
                    add_generation_prompt: bool = True, continue_final_message: bool = False,
                    template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """Token ids of chat ``messages`` (``{"role", "content"}``, and an assistant's ``tool_calls``, a tool
    result's ``tool_call_id`` and ``name``), ending where the assistant answers.

    Uses the tokenizer's chat template when it has one (or ``chat`` is True); otherwise the contents
    joined by newlines. ``developer`` messages count as ``system``. ``tools`` (OpenAI's ``tools``) go to the
    template; one that does not render them (nor ``tool_calls``) gets them described in a system message
    and each call as its message's JSON content instead.

    ``add_generation_prompt`` (default): the template opens the assistant's turn; ``continue_final_message``:
    the last message (an assistant's) is left open, its answer going on from its text; ``template_kwargs``:
    more variables for the template (``enable_thinking``…); all three as in transformers and vLLM.

    Raises:
        ConfigError: the chat template (named by ``what``) raised: roles it does not accept, or code its
            sandbox refuses.
    """
    msgs = [{**m, "role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
            for m in messages]
    template = str(getattr(tok, "chat_template", None) or "")
    if tools and "tools" not in template:  # described where every template reads them: a system message
        head = describe_tools(tools)
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {**msgs[0], "content": f"{msgs[0]['content']}\n\n{head}"}
        else:
            msgs.insert(0, {"role": "system", "content": head})
    if "tool_calls" not in template:
        msgs = [{**m, "content": json.dumps([{"name": c.get("function", {}).get("name"),
                                              "arguments": c.get("function", {}).get("arguments")}
                                             for c in m["tool_calls"]])} if m.get("tool_calls") and not m["content"]
                else m for m in msgs]
    use_chat = bool(template) if chat is None else chat
    if use_chat:
        from jinja2 import TemplateError

        try:
            ids = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt and not continue_final_message,
                                          continue_final_message=continue_final_message, tokenize=True,
                                          **({"tools": list(tools)} if tools else {}), **(template_kwargs or {}))
        except TemplateError as e:  # the template's own raise_exception, or the sandbox refusing unsafe code
            raise ConfigError(f"{what} refused these messages ({type(e).__name__}: {e})") from None
        except ValueError as e:  # continue_final_message: the last message's text is not in what it renders
            raise ConfigError(f"{what} cannot continue the last message: {e}") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return list(tok("\n".join(m["content"] for m in msgs if m["content"]))["input_ids"])


def bad_word_ids(tok: Any, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """vLLM's ``bad_words`` as token sequences: each word as it tokenizes alone and, where that differs in its
    first token but not in length, after a space (a word at the start of the text and in its middle)."""
    out: list[tuple[int, ...]] = []
    for w in words:
        alone = tuple(tok.encode(w.lstrip(), add_special_tokens=False))
        spaced = tuple(tok.encode(" " + w.lstrip(), add_special_tokens=False))
        out += [s for s in (alone, spaced if spaced and alone and spaced[0] != alone[0] and len(spaced) == len(alone)
                            else ()) if s]
    return tuple(dict.fromkeys(out))


def cut_at_stop(text: str, stop: Sequence[str], *, keep: bool = False, start: int = 0) -> tuple[str, bool]:
    """``text`` up to the earliest stop string (with ``keep``, up to its end), and whether one occurred.

    ``start``: only a stop string that ends after ``text[:start]`` counts (vLLM's ``min_tokens``: the text
    of a row's first ``min_tokens - 1`` tokens cannot end it)."""
    hits = ((text.find(s, max(0, start - len(s) + 1)), -len(s)) for s in stop if s)
    found = min((h for h in hits if h[0] >= 0), default=None)
    if found is None:
        return text, False
    return text[:found[0] - found[1] if keep else found[0]], True


def min_tokens_start(decode: Callable[[list[int]], str], new_ids: Sequence[int], min_tokens: int) -> int:
    """The ``start`` of :func:`cut_at_stop` for a row that must have ``min_tokens`` tokens: the length of the
    text of its first ``min_tokens - 1`` (0 when it has no minimum)."""
    return len(decode(list(new_ids[:min_tokens - 1]))) if min_tokens > 1 else 0


def stop_prefix(text: str, stop: Sequence[str]) -> int:
    """How many characters at the end of ``text`` may begin a stop string: a stream holds them back until
    the next tokens show whether the string completes (then they are cut) or not."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class HeldText:
    """A streamed text watched for stop strings: what can go out now, and whether one ended it.

    :meth:`feed` takes the whole text so far and returns the characters that can go out: all but a tail
    that may begin a stop string (or a character still being decoded, ``\ufffd``), held back until the next
    tokens show; once a stop string completes, the text up to it (with ``keep``, through it) and never more.
    :meth:`finish` gives what is still held back when the text ends.
    """

    def __init__(self, stop: Sequence[str], *, keep: bool = False) -> None:
        self.stop, self.keep = [s for s in stop if s], keep
        self.text, self.hit, self.sent = "", False, 0

    def feed(self, text: str, *, start: int = 0, final: bool = False) -> str:
        """``text``: the whole text so far (ignored once a stop string ended it); ``start``: as
        :func:`cut_at_stop` (``len(text)``: no stop string may end it yet). ``final``: nothing more comes."""
        if not self.hit:
            self.text, self.hit = cut_at_stop(text, self.stop, keep=self.keep, start=start)
        final = final or self.hit
        end = len(self.text) if final else len(self.text) - stop_prefix(self.text, self.stop)
        if end <= self.sent or not final and self.text[:end].endswith("\ufffd"):
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def finish(self) -> str:
        """What is still held back, once the text ended without (another) stop string."""
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece


def pad_rows(seqs: Sequence[Sequence[int]], *, pad: int = 0, left: bool = False,
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, W], mask [B, W])`` of token sequences padded to ``width`` (default: the longest),
    right-padded, or left-padded with ``left``."""
    w = max((len(q) for q in seqs), default=0) if width is None else width
    ids = torch.full((len(seqs), w), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), w), dtype=torch.long)
    for r, q in enumerate(seqs):
        if not q:
            continue
        sl = slice(w - len(q), w) if left else slice(0, len(q))
        ids[r, sl] = torch.as_tensor(list(q), dtype=torch.long)
        mask[r, sl] = 1
    return ids, mask


def context_chunks(idx: list[int], lengths: Sequence[int], max_new_tokens: int, limit: int | None) -> list[list[int]]:
    """Rows ``idx`` split so that each batch's padded width (its longest prompt, ``lengths[i]``) plus
    ``max_new_tokens`` fits the ``limit`` context (two prompts that fit alone may not fit padded
    together); by length, in order. One chunk when there is no limit or everything fits."""
    if limit is None or max(lengths[i] for i in idx) + max_new_tokens <= limit:
        return [idx]
    chunks: list[list[int]] = []
    for i in sorted(idx, key=lambda i: lengths[i]):
        if chunks and max(lengths[j] for j in chunks[-1] + [i]) + max_new_tokens <= limit:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks
