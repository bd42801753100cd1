"""Requests with stop strings under concurrent load: each row's generation ends where its text first holds
one of its stop strings, against generating to ``max_tokens`` (or end of text) and then cutting the text
(what the server did before for requests that are not streamed), side by side in one run, rounds
interleaved (this machine is noisy). Both give the same text; the script checks it for every question.

The SmolLM2-135M bundle of `serve_auto.py` (three branches, r=0.95), branch m0 named, served in-process
on loopback. `--clients` threads send /v1/completions for `--seconds` per round: "Question: …\\nAnswer:",
up to 64 new tokens, stop at a blank line or "Question:" (as lm_eval's GSM8K `until` ends an answer).
Two workloads: the 8 questions of `serve_auto.py`, one of which this model answers for all 64 tokens
(a batch runs until its longest row ends, so it holds the batch), and the 7 others.

    python bench/serve_stop.py [--seconds 15] [--clients 16] [--rounds 2]
"""

from __future__ import annotations

import httpx
from serve_auto import PROMPTS, arguments, bundle_with_router, compare

import branchmerge
from branchmerge.runtime.text import cut_at_stop
from branchmerge.server import create_app
from tests.serving import serving

STOP, MAX_TOKENS, FORM = ["\n\n", "Question:"], 64, "Question: {}\nAnswer:"


def texts(app, stop: bool) -> tuple[list[str], list[int]]:
    """Each question's text (cut at STOP here when the server was not given it) and its tokens generated."""
    out, tokens = [], []
    with serving(app) as url, httpx.Client(timeout=300) as c:
        for p in PROMPTS:
            body = {"model": "m0", "prompt": FORM.format(p), "max_tokens": MAX_TOKENS}
            r = c.post(url + "/v1/completions", json={**body, **({"stop": STOP} if stop else {})}).json()
            out.append(cut_at_stop(r["choices"][0]["text"], STOP)[0])
            tokens.append(r["usage"]["completion_tokens"])
    return out, tokens


def main() -> None:
    args = arguments(__doc__)
    bundle = branchmerge.load(bundle_with_router())
    app = create_app(bundle, max_batch=16, wait_ms=20)
    (now, now_tokens), (before, before_tokens) = texts(app, True), texts(app, False)
    long = [p for p, n in zip(PROMPTS, now_tokens) if n >= MAX_TOKENS]
    short = [p for p in PROMPTS if p not in long]
    print(f"same text for all {len(PROMPTS)} questions: {now == before}; tokens generated per question with stop "
          f"strings {now_tokens}, without {before_tokens}; running to {MAX_TOKENS} tokens: {long}")
    for load, prompts in ((f"{len(PROMPTS)} questions", PROMPTS), (f"{len(short)} short answers", short)):
        setups = {how: (create_app(bundle, max_batch=16, wait_ms=20), "m0",
                        {"body": lambda i, b=body: b, "form": FORM, "prompts": prompts})
                  for how, body in (("stop strings end each row (now)", {"max_tokens": MAX_TOKENS, "stop": STOP}),
                                    ("to max_tokens, then cut (before)", {"max_tokens": MAX_TOKENS}))}
        compare(setups, args, "to max_tokens, then cut (before)", f"{load}, SmolLM2-135M bundle r=0.95 float32, "
                "branch m0, in-process server on 127.0.0.1", "before", tokens=f"up to {MAX_TOKENS} new tokens")

if __name__ == "__main__":
    main()
