"""A branch's ``generation_config.json`` read as input, pure: the sampling defaults a model's creator set
(what the server answers requests with, as vLLM's ``--generation-config auto``), and which of its fields
generation honors, checked (token ids inside the vocabulary, values in range); the rest are named, to be
ignored. Dicts in, dicts out: no files, no transformers objects."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# a model creator's sampling defaults in its generation config: what vLLM's ``--generation-config auto`` reads
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def sampling_defaults(values: Mapping[str, Any], where: str) -> dict[str, float | int]:
    """The sampling defaults ``values`` sets (a generation config's diff dict, or an operator's override), checked.

    As vLLM's ``--generation-config auto``: only the :data:`SAMPLING_FIELDS` given (``top_k`` 0 or below: none).
    A config that sets ``do_sample: true`` without a temperature samples at 1.0, as ``transformers`` would.

    Raises:
        ValueError: a value out of range or of the wrong type, naming ``where`` and the field.
    """
    checks = {"temperature": (lambda v: v >= 0, "a number >= 0", float),
              "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]", float),
              "top_k": (lambda v: True, "an integer (0 or below: no top-k)", int),
              "min_p": (lambda v: 0 <= v <= 1, "a number in [0, 1]", float),
              "repetition_penalty": (lambda v: v > 0, "a number > 0", float),
              "max_new_tokens": (lambda v: v >= 1, "an integer >= 1", int)}
    out: dict[str, float | int] = {}
    for k in SAMPLING_FIELDS:
        if (v := values.get(k)) is None:
            continue
        ok, rule, kind = checks[k]
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                or (kind is int and not float(v).is_integer()) or not ok(v)):
            raise ValueError(f"{where}: {k} is {v!r}; it must be {rule}")
        out[k] = kind(v)
    if "top_k" in out:
        out["top_k"] = max(0, out["top_k"])
    if values.get("do_sample") is True and "temperature" not in out:
        out["temperature"] = 1.0
    return out


# What of a branch's generation config is honored: its tokens, its sampling defaults (which each call sets
# itself), and the logits processing a model's creator may ask for (penalties, bans; beam search's length
# settings). The rest (num_beams, num_return_sequences, return_dict_in_generate, max_time, stop_strings,
# cache_implementation, guidance_scale, watermarking…) would change how every call of the branch decodes, or
# break it, so it is ignored with a warning; vLLM reads less still (its sampling defaults and end tokens).
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_PROCESSING_FIELDS = ("no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                      "sequence_bias", "length_penalty", "early_stopping")
_HONORED = {*_TOKEN_FIELDS, "do_sample", *SAMPLING_FIELDS, *_PROCESSING_FIELDS}
# ignored without a word: what transformers writes in every file, output formats, and neutral values
_SILENT = {"transformers_version", "_from_model_config", "output_attentions", "output_hidden_states", "output_scores",
           "output_logits", "return_dict_in_generate", "use_cache", "max_length"}
_NEUTRAL = {"num_beams": 1, "num_return_sequences": 1, "num_beam_groups": 1, "diversity_penalty": 0.0,
            "guidance_scale": 1.0, "min_length": 0, "min_new_tokens": 0}
MAX_CONFIG_TOKENS = 1 << 16  # token ids in a generation config's bans and biases, all together


def honored_config(values: Mapping[str, Any], vocab: int | None, where: str) -> tuple[dict[str, Any], list[str]]:
    """The fields of a generation config (``values``: its diff dict) that generation honors, checked; and the
    names of those it ignores (see :data:`_HONORED`).

    Raises:
        ValueError: a sampling default out of range, or a ban or bias naming a token id outside ``[0, vocab)``
            (a device assert on a GPU) or more than :data:`MAX_CONFIG_TOKENS` of them, named with ``where``.
    """
    sampling_defaults(values, where)
    kept = {k: v for k, v in values.items() if k in _HONORED}
    ids: list[Any] = []
    for k in ("bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "sequence_bias"):
        v = kept.get(k)
        if v is None:
            continue
        nested = k in ("bad_words_ids", "sequence_bias")
        if k == "sequence_bias" and isinstance(v, dict):  # {tuple(ids): bias}, or [[ids, bias], …]
            v = [[list(key), b] for key, b in v.items()]
        if not isinstance(v, list) or nested and not all(isinstance(w, list) for w in v):
            raise ValueError(f"{where}: {k} is {str(v)[:80]}; it must be a list of "
                             f"{'lists' if nested else 'token ids'}")
        if k == "sequence_bias":
            v = [w[0] if len(w) == 2 and isinstance(w[0], list) else None for w in v]
            if None in v:
                raise ValueError(f"{where}: sequence_bias entries are [[token ids], bias]")
        flat = [t for w in v for t in w] if nested else v
        if len(ids) + len(flat) > MAX_CONFIG_TOKENS:
            raise ValueError(f"{where}: its bans and biases name over {MAX_CONFIG_TOKENS} token ids")
        bad = next((t for t in flat if isinstance(t, bool) or not isinstance(t, int) or t < 0
                    or vocab is not None and t >= vocab), None)
        if bad is not None:
            raise ValueError(f"{where}: {k} names token {bad!r}, not an id in the vocabulary of {vocab} tokens")
        ids += flat
    n = kept.get("no_repeat_ngram_size")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"{where}: no_repeat_ngram_size is {n!r}; it must be an integer >= 0")
    return kept, sorted(k for k, v in values.items() if k not in _HONORED and k not in _SILENT
                        and not (k in _NEUTRAL and v == _NEUTRAL[k]) and v is not None)
