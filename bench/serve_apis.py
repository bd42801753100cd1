"""What OpenAI's Responses API and Anthropic's Messages API cost over chat completions: the same
conversations through `/v1/chat/completions`, `/v1/responses` and `/v1/messages` (each read into a chat
request and answered by the chat path), with their real SDKs, on a bundle of three SmolLM2-135M-based
branches (r=0.95, float32) served in-process on 127.0.0.1. Rounds alternate the APIs so that drift on this
noisy machine falls on all three. Reported: median latency per request, plain and streamed (time to the
last event), as ratios to chat; and whether the answers are the same text.

    python bench/serve_apis.py [--requests 12] [--rounds 3] [--max-tokens 24]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import anthropic
import openai

from _common import smollm2_bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import branchmerge  # noqa: E402
from branchmerge.server import create_app  # noqa: E402
from tests.serving import serving  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What do bees make?",
             "How many legs does a spider have?", "What is water made of?", "Who wrote Hamlet?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    _, bdir = smollm2_bundle(0.95)
    bundle = branchmerge.load(bdir, dtype="float32")
    mt = args.max_tokens
    with serving(create_app(bundle, max_batch=8, wait_ms=1)) as url:
        oa = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        an = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=120)

        def ask(i: int) -> tuple[str, list[dict]]:
            return f"m{i % 3}", [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]

        def chat(i, stream):
            m, msgs = ask(i)
            if stream:
                return "".join(ch.choices[0].delta.content or "" for ch in oa.chat.completions.create(
                    model=m, messages=msgs, max_tokens=mt, temperature=0, stream=True) if ch.choices)
            return oa.chat.completions.create(model=m, messages=msgs, max_tokens=mt, temperature=0).choices[0].message.content

        def responses(i, stream):
            m, msgs = ask(i)
            if stream:
                return "".join(e.delta for e in oa.responses.create(model=m, input=msgs, max_output_tokens=mt,
                                                                     temperature=0, stream=True)
                               if e.type == "response.output_text.delta")
            return oa.responses.create(model=m, input=msgs, max_output_tokens=mt, temperature=0).output_text

        def messages(i, stream):
            m, msgs = ask(i)
            if stream:
                with an.messages.stream(model=m, messages=msgs, max_tokens=mt, extra_body={"temperature": 0}) as s:
                    return "".join(s.text_stream)
            return an.messages.create(model=m, messages=msgs, max_tokens=mt,
                                      extra_body={"temperature": 0}).content[0].text

        apis = {"chat completions": chat, "responses": responses, "messages": messages}
        for f in apis.values():  # warm every path once
            f(0, False)
            f(0, True)
        times = {(a, s): [] for a in apis for s in (False, True)}
        texts = {(a, s): {} for a in apis for s in (False, True)}
        for _ in range(args.rounds):
            for stream in (False, True):
                for name, f in apis.items():
                    for i in range(args.requests):
                        t = time.perf_counter()
                        texts[name, stream][i] = f(i, stream)
                        times[name, stream].append(time.perf_counter() - t)
    print(f"{args.requests} requests × {args.rounds} rounds per API, one at a time, greedy, {mt} tokens at most; "
          "SmolLM2-135M-based bundle r=0.95 float32, 3 branches in turn, this CPU")
    print("| API | plain: median ms | vs chat | streamed: median ms | vs chat | same answers as chat |")
    print("|---|---|---|---|---|---|")
    base = {s: statistics.median(times["chat completions", s]) for s in (False, True)}
    for name in apis:
        med = {s: statistics.median(times[name, s]) for s in (False, True)}
        same = sum(texts[name, s][i] == texts["chat completions", s][i] for s in (False, True)
                   for i in range(args.requests))
        print(f"| {name} | {1e3 * med[False]:.1f} | {med[False] / base[False]:.3f} | {1e3 * med[True]:.1f} | "
              f"{med[True] / base[True]:.3f} | {same}/{2 * args.requests} |")


if __name__ == "__main__":
    main()
