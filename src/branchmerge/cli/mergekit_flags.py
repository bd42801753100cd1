"""mergekit's command-line flags on ``merge``, ``moe`` and ``multimerge``, so that a ``mergekit-yaml CONFIG OUT
--cuda --copy-tokenizer --lazy-unpickle`` line works with ``branchmerge merge`` in front of it.

The output folder may be the second argument (mergekit's form) or ``-o``. ``--cuda``, ``--device``,
``--out-shard-size`` (mergekit's ``5B``/``500M``/``100K``: bytes), ``--random-seed`` and
``--write-model-card/--no-write-model-card`` act; flags whose job branchmerge always does (or never needs) are
accepted and change nothing; ``--trust-remote-code`` is refused; anything else is an unknown option.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from branchmerge.config import MergeConfig

logger = logging.getLogger(__name__)

UsageError = typer.BadParameter.__base__  # (click's UsageError as typer raises and reports it: typer vendors click)
EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}  # a command's context_settings

NO_OPS = {  # flag → why it changes nothing here
    "--lazy-unpickle": "inputs are read lazily from safetensors, and never unpickled",
    "--no-lazy-unpickle": "inputs are read lazily from safetensors",
    "--allow-crimes": "models of different architectures are refused by name, as they cannot be merged tensor "
                      "by tensor",
    "--no-allow-crimes": "",
    "--copy-tokenizer": "the output always gets a tokenizer",
    "--safe-serialization": "outputs are always safetensors",
    "--clone-tensors": "tensors are written one at a time, never shared",
    "--no-clone-tensors": "",
    "--low-cpu-memory": "tensors are read and written one at a time",
    "--read-to-gpu": "",
    "--multi-gpu": "",
    "--gpu-rich": "",
    "--i-understand-this-is-not-useful-without-training": "identical experts get a warning, not an error",
}
WITH_VALUE = ("--out-shard-size", "--random-seed", "--device", "--lora-merge-cache", "--transformers-cache",
              "--num-threads", "--lora-merge-dtype")
SHARD_UNITS = {"k": 10**3, "m": 10**6, "b": 10**9}


@dataclass(frozen=True)
class MergekitFlags:
    """What a command's mergekit flags ask for (None: not given)."""

    out: Path | None = None
    device: str | None = None
    shard_bytes: int | None = None
    seed: int | None = None
    model_card: bool | None = None

    def apply(self, cfg: MergeConfig) -> MergeConfig:
        """A merge config with these flags' device, shard size and seed (the rSVD's and the random methods')."""
        update: dict[str, Any] = {k: v for k, v in (("device", self.device), ("max_shard_bytes", self.shard_bytes))
                                  if v is not None}
        if self.seed is not None:
            update["rsvd"] = cfg.rsvd.model_copy(update={"seed": self.seed})
        return cfg.model_copy(update=update) if update else cfg

    def card(self, default: bool) -> bool:
        """Whether to write a model card: ``--[no-]write-model-card`` if given, else the command's own flag."""
        return default if self.model_card is None else self.model_card


def _bad(msg: str) -> typer.BadParameter:
    return typer.BadParameter(msg, param_hint="mergekit flags")


def shard_bytes(text: str) -> int:
    """mergekit's ``--out-shard-size``: a count with an optional K, M or B (thousand, million, billion) suffix."""
    t = text.strip().lower()
    scale = SHARD_UNITS.get(t[-1:], 1)
    digits = t[:-1] if scale > 1 else t
    if not digits.isdigit() or int(digits) * scale <= 0:
        raise _bad(f"--out-shard-size {text!r}: a positive count with an optional K, M or B suffix (5B = 5·10⁹ "
                   "bytes)")
    return int(digits) * scale


def parse(ctx: typer.Context, *, takes_out: bool = True) -> MergekitFlags:
    """Read a command's extra arguments (``ctx.args``: mergekit's flags, and the output folder as a second
    argument).

    Raises:
        typer.BadParameter: an unknown option, a flag without its value, ``--trust-remote-code``, a second
            positional argument, a malformed size or seed.
    """
    args = list(ctx.args)
    out: Path | None = None
    found: dict[str, str] = {}
    card: bool | None = None
    i = 0
    while i < len(args):
        a = args[i]
        name, eq, inline = a.partition("=") if a.startswith("--") else (a, "", "")
        if name == "--trust-remote-code":
            raise _bad("--trust-remote-code: branchmerge never runs code from a model's folder; it reads "
                       "architectures it knows")
        if name == "--cuda":
            found["--device"] = "cuda"
        elif name in ("--write-model-card", "--no-write-model-card"):
            card = name == "--write-model-card"
        elif name in ("-v", "--verbose", "-q", "--quiet"):  # (mergekit's, after the command: as branchmerge -v)
            logging.getLogger("branchmerge").setLevel(logging.DEBUG if name in ("-v", "--verbose") else logging.WARNING)
        elif name in NO_OPS:
            if NO_OPS[name]:
                logger.info("%s changes nothing here: %s", name, NO_OPS[name])
        elif name in WITH_VALUE:
            if eq:
                value = inline
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise _bad(f"{name} needs a value")
            found[name] = value
        elif a.startswith("-"):
            known = [o for p in ctx.command.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))]
            close = difflib.get_close_matches(name, known, n=1)
            raise UsageError(f"No such option: {name}" + (f" (did you mean {close[0]}?)" if close else ""), ctx)
        elif takes_out and out is None:
            out = Path(a)
        else:
            raise UsageError(f"Got unexpected extra argument ({a})", ctx)
        i += 1
    seed = found.get("--random-seed")
    if seed is not None and not seed.lstrip("-").isdigit():
        raise _bad(f"--random-seed {seed!r} is not an integer")
    size = found.get("--out-shard-size")
    return MergekitFlags(out=out, device=found.get("--device"), shard_bytes=None if size is None else shard_bytes(size),
                         seed=None if seed is None else int(seed), model_card=card)


def output(flags: MergekitFlags, option: Path | None) -> Path:
    """The output folder: ``-o`` or the second argument (the same one if both are given)."""
    if option is not None and flags.out is not None and option != flags.out:
        raise typer.BadParameter(f"two outputs: -o {option} and {flags.out}", param_hint="OUT")
    out = option or flags.out
    if out is None:
        raise typer.BadParameter("give the output folder: -o OUT (or as the second argument, as mergekit-yaml)",
                                 param_hint="OUT")
    return out
