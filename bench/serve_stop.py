"""Requests with stop strings under concurrent load: each row's generation ends where its text first holds
one of its stop strings, against generating to ``max_tokens`` (or end of text) and then cutting the text
(what the server did before for requests that are not streamed), side by side in one run, rounds
interleaved (this machine is noisy). Both give the same text; the script checks it for every prompt.

The SmolLM2-135M bundle of `serve_auto.py` (three branches, r=0.95), branch m0 named, served in-process
on loopback. `--clients` threads send /v1/completions for `--seconds` per round: "Question: …\nAnswer:",
up to 64 new tokens, stop at a blank line or "Question:" (as lm_eval's GSM8K `until` ends an answer).

    python bench/serve_stop.py [--seconds 15] [--clients 16] [--rounds 2]
"""

from __future__ import annotations

import statistics

import httpx
from serve_auto import PROMPTS, arguments, bundle_with_router, compare

import branchmerge
from branchmerge.runtime.text import cut_at_stop
from branchmerge.server import create_app
from tests.serving import serving

STOP, MAX_TOKENS, FORM = ["\n\n", "Question:"], 64, "Question: {}\nAnswer:"


def texts(url: str, stop: bool) -> tuple[list[str], float]:
    """Each prompt's text (cut at STOP here when the server was not given it) and the mean tokens generated."""
    out, tokens = [], []
    with httpx.Client(timeout=300) as c:
        for p in PROMPTS:
            body = {"model": "m0", "prompt": FORM.format(p), "max_tokens": MAX_TOKENS, **({"stop": STOP} if stop else {})}
            r = c.post(url + "/v1/completions", json=body).json()
            out.append(cut_at_stop(r["choices"][0]["text"], STOP)[0])
            tokens.append(r["usage"]["completion_tokens"])
    return out, statistics.mean(tokens)


def texts_of(app, stop: bool) -> tuple[list[str], float]:
    with serving(app) as url:
        return texts(url, stop)


def main() -> None:
    args = arguments(__doc__)
    bundle = branchmerge.load(bundle_with_router())
    bodies = {"stop strings end each row (now)": lambda i: {"max_tokens": MAX_TOKENS, "stop": STOP},
              "to max_tokens, then cut (before)": lambda i: {"max_tokens": MAX_TOKENS}}
    setups = {name: (create_app(bundle, max_batch=16, wait_ms=20), "m0", {"body": body, "form": FORM})
              for name, body in bodies.items()}
    (now, now_tokens), (before, before_tokens) = [texts_of(setups[n][0], stop)
                                                   for n, stop in zip(setups, (True, False))]
    print(f"same text for all {len(PROMPTS)} prompts: {now == before}; mean tokens generated per request: "
          f"{now_tokens:.1f} with stop strings, {before_tokens:.1f} without")
    compare(setups, args, "to max_tokens, then cut (before)", "SmolLM2-135M bundle r=0.95 float32, branch m0, "
            "in-process server on 127.0.0.1", "before", tokens=f"up to {MAX_TOKENS} new tokens")


if __name__ == "__main__":
    main()
