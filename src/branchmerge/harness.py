"""lm-evaluation-harness backend: evaluate a bundle branch, ``auto`` (the router picks per request) or a
plain HF folder, in process, with the runtime's batched, prefix-sharing scoring.

    lm_eval.simple_evaluate(model="branchmerge", model_args="bundle=DIR,branch=NAME", tasks=[...])
    branchmerge lm-eval DIR --branch NAME -- --tasks mmlu --limit 20     # lm_eval's own CLI, backend registered

Registered under the name ``branchmerge`` when this module is imported (lm_eval finds models only through
its registry, so its bare CLI needs the ``branchmerge lm-eval`` wrapper). Tokenization follows lm_eval's
``hf`` backend (trailing context spaces move to the continuation; the tokenizer's own special tokens;
``prefix_token_id`` for an empty context; left truncation to ``max_length``), so an r=0 branch scores as
the original model does under ``--model hf``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm_eval's own models first: its registry fills itself only when empty)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from branchmerge.errors import ConfigError
from branchmerge.runtime.sampling import RowSampler, RowSettings

logger = logging.getLogger(__name__)


def _as_bool(v: Any) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    return str(v).strip().lower() in ("1", "true", "yes")


@register_model("branchmerge")
class BranchmergeLM(TemplateLM):
    """An lm_eval model over one branch of a bundle, ``auto``, or a plain HF folder (``pretrained=``)."""

    def __init__(self, bundle: str | None = None, branch: str = "auto", pretrained: str | None = None,
                 peft: str | None = None,
                 dtype: str | None = "float32", device: str = "cpu", batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 **_: Any) -> None:
        super().__init__()
        import branchmerge

        if (bundle is None) == (pretrained is None):
            raise ConfigError("the branchmerge lm_eval model needs exactly one of bundle=DIR or pretrained=DIR")
        if pretrained is not None:  # a plain HF folder: a one-branch bundle at r=0 is that model, exactly
            self._tmp = tempfile.TemporaryDirectory(prefix="branchmerge-lm-eval-")  # removed with this object
            bundle, branch = self._bundle_of(pretrained, Path(self._tmp.name) / "bundle", peft), "model"
        elif peft is not None:
            raise ConfigError("the branchmerge lm_eval model's peft=ADAPTER goes with pretrained=BASE, not a bundle")
        self.bundle = branchmerge.load(bundle, dtype=dtype, device=device)
        if branch != "auto":
            self.bundle.reader.branch(branch)  # BranchNotFoundError lists the branches
        elif self.bundle.router is None:
            raise ConfigError(f"branch=auto needs a router; {bundle} has none (branchmerge router build)")
        self.branch = branch
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self._max_length, self._max_gen_toks = max_length, int(max_gen_toks)
        self.add_bos_token = _as_bool(add_bos_token)
        self._current = self.bundle.branch_names[0] if branch == "auto" else branch

    @staticmethod
    def _bundle_of(folder: str, out: Path, peft: str | None = None) -> str:
        """A one-branch r=0 bundle of ``folder`` (with the PEFT LoRA adapter ``peft`` over it, as lm_eval's
        ``hf`` backend takes ``pretrained=BASE,peft=ADAPTER``): that model exactly."""
        from branchmerge.config import parse_config
        from branchmerge.merge import run_merge

        branch = {"name": "model", "model": str(folder)} if peft is None else \
            {"name": "model", "model": str(peft), "base": str(folder)}
        run_merge(parse_config({"branches": [branch], "compress_rate": 0.0, "dtype": "float32"}), out,
                  progress=False)
        return str(out)

    # ---- what TemplateLM asks ------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.bundle.tokenizer(self._current)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or self.bundle.context_limit(self._current) or 2048

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw: Any) -> list[int]:
        kwargs = {}
        if add_special_tokens is not None:
            kwargs["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kwargs["add_special_tokens"] = self.add_bos_token
        bos = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and bos and string.startswith(bos):
            kwargs["add_special_tokens"] = False
        return list(self.tokenizer.encode(string, **kwargs))

    # ---- routing: one branch at a time ----------------------------------------------------------------
    def _by_branch(self, texts: Sequence[str]) -> dict[str, list[int]]:
        names = self.bundle.router.route(list(texts)) if self.branch == "auto" else [self.branch] * len(texts)
        out: dict[str, list[int]] = {}
        for i, b in enumerate(names):
            out.setdefault(b, []).append(i)
        return out

    def _per_branch(self, requests, text_of, run) -> list:
        results: list = [None] * len(requests)
        for b, idx in self._by_branch([text_of(r) for r in requests]).items():
            self._current = b
            for i, r in zip(idx, run([requests[i] for i in idx])):
                results[i] = r
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._per_branch(requests, lambda r: r.args[0] or r.args[1],
                                lambda rs: super(BranchmergeLM, self).loglikelihood(rs, disable_tqdm=True))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
        """``[((context, continuation), context_ids, continuation_ids)]`` → ``(logprob, is_greedy)`` each,
        scored in batches of ``batch_size`` (contexts shared by several continuations run once)."""
        seqs = [(c + x)[-(self.max_length + 1):] for _, c, x in requests]
        out = []
        for s in range(0, len(seqs), self.batch_size):
            chunk = seqs[s:s + self.batch_size]
            scored = self.bundle.token_logprobs_many(chunk, [self._current] * len(chunk), top=1)
            for (_, _, cont), sc in zip(requests[s:s + self.batch_size], scored):
                n = len(cont)
                lp = sum(sc.logprobs[-n:])
                greedy = all(top[0][0] == t for top, t in zip(sc.top[-n:], sc.token_ids[-n:]))
                out.append((float(lp), bool(greedy)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        def run(rs):
            res = []
            for r in rs:
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(r.args[0]), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                scores = self._loglikelihood_tokens([((None, None), c, x) for c, x in windows])
                res.append(sum(s for s, _ in scores))
            return res

        return self._per_branch(requests, lambda r: r.args[0], run)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy or sampled generations, ``batch_size`` at a time (longest contexts first, as lm_eval's ``hf``
        backend batches), each row stopping at its own ``until`` strings, ``max_gen_toks`` or end of text."""
        def run(rs):
            rows = []
            for r in rs:
                context, kw = r.args
                kw = dict(kw or {})
                until = kw.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                mt = int(kw.pop("max_gen_toks", self._max_gen_toks))
                temperature = float(kw.get("temperature", 0.0) or 0.0) if kw.get("do_sample", False) else 0.0
                rows.append((self.tok_encode(context)[-(self.max_length - mt):], mt, until, temperature))
            res: list[str | None] = [None] * len(rows)
            order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
            with tqdm(total=len(rows), disable=disable_tqdm, desc=f"generate ({self._current})") as bar:
                for s in range(0, len(order), self.batch_size):
                    chunk = [rows[i] for i in order[s:s + self.batch_size]]
                    gens = self.bundle.generate_ids(
                        [c[0] for c in chunk], [self._current] * len(chunk), max_new_tokens=[c[1] for c in chunk],
                        stop=[c[2] for c in chunk], row_sampler=RowSampler([RowSettings(temperature=c[3])
                                                                            for c in chunk]))
                    for i, g in zip(order[s:s + self.batch_size], gens):
                        res[i] = g.text  # decoded without special tokens, as lm_eval's hf backend
                    bar.update(len(chunk))
            return res

        return self._per_branch(requests, lambda r: r.args[0], run)


def run_cli(bundle: str, branch: str, args: Sequence[str], *, dtype: str | None = None, batch_size: int = 8,
            device: str = "cpu") -> None:
    """lm_eval's own command line with this backend registered and ``--model branchmerge --model_args
    bundle=…,branch=…`` supplied (``args`` are the rest of lm_eval's arguments)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if any(a in ("--model", "--model_args") or a.startswith(("--model=", "--model_args=")) for a in args):
        raise ConfigError("branchmerge lm-eval sets --model and --model_args itself; pass lm_eval's other arguments")
    if branch != "auto":  # before lm_eval spends its start-up: an unknown branch is named from the manifest
        from branchmerge.io.bundle import BundleReader

        BundleReader(bundle, verify=False).branch(branch)
    model_args = f"bundle={bundle},branch={branch}" + (f",dtype={dtype}" if dtype else "")
    for flag, value in (("--batch_size", str(batch_size)), ("--device", device)):  # lm_eval's own defaults: 1, cuda
        if not any(a == flag or a.startswith(flag + "=") for a in args):
            args = [*args, flag, value]
    old = sys.argv
    sys.argv = ["lm_eval", "run", "--model", "branchmerge", "--model_args", model_args, *args]
    try:
        cli_evaluate()
    except ValueError as e:
        if str(e).startswith("Tasks not found"):  # lm_eval's own words for a task name it does not know
            raise ConfigError(f"lm_eval: {e} (`lm_eval ls tasks` lists them)") from None
        raise
    finally:
        sys.argv = old
