"""Sampled requests under concurrent load: rows with their own temperature, top-p and seed in one batch,
against greedy requests, with OpenAI's penalties and logit_bias added, and against running each seeded
request alone (what the server did before it sampled per row), side by side in one run, rounds
interleaved (this machine is noisy).

The SmolLM2-135M bundle of `serve_auto.py` (three branches, r=0.95), branch m0 named, served in-process
on loopback. `--clients` threads send /v1/completions (8 new tokens) for `--seconds` per round.

    python bench/serve_sampling.py [--seconds 15] [--clients 16] [--rounds 2]
"""

from __future__ import annotations

from serve_auto import arguments, bundle_with_router, compare

import branchmerge
from branchmerge.server import create_app


def seeded(i: int) -> dict:
    """Client i's own seed and settings: temperatures 0.5-1.25, top-p 0.9 or none."""
    return {"seed": 1000 + i, "temperature": 0.5 + 0.05 * i, **({"top_p": 0.9} if i % 2 else {})}


def penalized(i: int) -> dict:
    """Client i's seeded settings plus OpenAI's penalties and a logit bias on two token ids."""
    return {**seeded(i), "presence_penalty": 0.5, "frequency_penalty": 0.3, "logit_bias": {"28": 2.0, "29": -2.0}}


def main() -> None:
    args = arguments(__doc__)
    bundle = branchmerge.load(bundle_with_router())
    setups = {name: (create_app(bundle, max_batch=mb, wait_ms=20), "m0", {"body": body})
              for name, (mb, body) in {"greedy": (16, lambda i: {}),
                                       "sampled, own seed and settings per client": (16, seeded),
                                       "same, plus penalties and logit_bias": (16, penalized),
                                       "same, each request alone (before)": (1, seeded)}.items()}
    compare(setups, args, "greedy", "SmolLM2-135M bundle r=0.95 float32, branch m0, in-process server on 127.0.0.1",
            "greedy")


if __name__ == "__main__":
    main()
