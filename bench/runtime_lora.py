"""Adapters loaded into a running server vs merged at start: two real PEFT LoRAs of SmolLM2-135M-Instruct
(bench/adapters.py trains and caches them), side by side in one run.

- start: merged at start (merge_adapters of base + adapters into a bundle, then load it: how
  ``serve BASE --lora-modules`` started before it loaded adapters);
- runtime: ``open_adapters_front`` (how it starts now: the base alone as a bundle, loaded, then
  ``load_lora`` of each adapter, what ``/v1/load_lora_adapter`` runs), then an unload and a reload into the
  freed slot (written in place);

then each adapter's logits in both (max abs difference, and against PEFT's unmerged model), the bytes held,
and a decode step of a batch mixed over base + both adapters, interleaved between the two bundles.

    python bench/runtime_lora.py [--tokens 16] [--repeat 6]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from _common import CACHE, smollm2_folder
import branchmerge
from branchmerge.front import open_adapters_front
from branchmerge.merge import merge_adapters

torch.set_num_threads(2)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def decode_s(bundle, ids, names, tokens: int) -> float:
    t = time.perf_counter()
    bundle.generate_ids(ids, names, max_new_tokens=[tokens] * len(ids))
    return time.perf_counter() - t


def stall(bundle, prompts, names, adapters, rounds: int = 6) -> None:
    """Serving while adapters load: a thread decodes 4-token segments as the server's engine does (holding the
    bundle's weights lock per segment); meanwhile an adapter is loaded and unloaded ``rounds`` times. The
    longest wait between two segments, against the segments' own time, is what a load costs running requests."""
    import statistics
    import threading

    gaps, segs, stop = [], [], threading.Event()

    def serve() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            bundle.weights_lock.let_waiters_first()  # (as the engine does)
            with bundle.weights_lock:
                t = time.perf_counter()
                gaps.append(t - last)
                bundle.generate_ids(prompts, names, max_new_tokens=[4] * len(prompts))
                last = time.perf_counter()
                segs.append(last - t)

    th = threading.Thread(target=serve)
    th.start()
    time.sleep(4.0)
    quiet = len(gaps)
    loads = []
    for _ in range(rounds):
        t = time.perf_counter()
        bundle.load_lora("extra", adapters["facts"])
        loads.append(time.perf_counter() - t)
        bundle.unload_lora("extra")
        time.sleep(0.3)
    stop.set()
    th.join()
    print(f"while serving ({len(segs)} segments of 3 rows × 4 tokens, median {statistics.median(segs) * 1000:.0f} ms): "
          f"load_lora {statistics.median(loads) * 1000:.0f} ms median; longest wait between segments "
          f"{max(gaps[quiet:]) * 1000:.0f} ms during loads vs {max(gaps[1:quiet], default=0) * 1000:.0f} ms before")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16, help="Tokens generated per decode measurement.")
    ap.add_argument("--repeat", type=int, default=6, help="Interleaved decode measurements per bundle.")
    args = ap.parse_args()
    base = smollm2_folder()
    adapters = {t: CACHE / "lora" / f"{t}-r16-s60" for t in ("facts", "words")}
    missing = [str(p) for p in adapters.values() if not (p / "adapter_model.safetensors").is_file()]
    if missing:
        raise SystemExit(f"run `python bench/adapters.py` first (it trains and caches {', '.join(missing)})")
    tmp = Path(tempfile.mkdtemp(prefix="bm-runtime-lora-"))
    try:
        _, t_merge = timed(lambda: merge_adapters(base, adapters, tmp / "start", base_name="base", dtype="float32",
                                                  progress=False))
        start, t_load = timed(lambda: branchmerge.load(tmp / "start", dtype="float32"))
        front, t_front = timed(lambda: open_adapters_front(base, adapters, tmp / "front", base_name="base",
                                                           dtype="float32"))
        live = front.bundle
        _, t_merge0 = timed(lambda: merge_adapters(base, {}, tmp / "alone", base_name="base", dtype="float32",
                                                   progress=False))
        alone, t_load0 = timed(lambda: branchmerge.load(tmp / "alone", dtype="float32"))
        t_adapters = {n: timed(lambda n=n, p=p, b=alone: b.load_lora(n, p))[1] for n, p in adapters.items()}
        alone = None  # (its memory back before the decode measurements)
        _, t_unload = timed(lambda: live.unload_lora("facts"))
        again, t_reload = timed(lambda: live.load_lora("facts", adapters["facts"]))

        print(f"merged at start (before this change): merge {t_merge:.2f} s + load {t_load:.2f} s = "
              f"{t_merge + t_load:.2f} s")
        print(f"serve --lora-modules start now (open_adapters_front: base alone + load_lora each): {t_front:.2f} s")
        print(f"  its parts: merge the base alone {t_merge0:.2f} s + load {t_load0:.2f} s; "
              + ", ".join(f"{n} load_lora {t:.2f} s" for n, t in t_adapters.items())
              + f"; unload {t_unload * 1000:.0f} ms; reload into the freed slot {t_reload:.2f} s "
              f"(slot {again.slot}, in place)")

        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        ids = torch.tensor([start.tokenizer("base").encode("The capital of Veloria is")])
        for name, folder in adapters.items():
            with torch.no_grad():
                with start.use(name) as m:
                    a = m(input_ids=ids).logits
                with live.use(name) as m:
                    b = m(input_ids=ids).logits
                peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                                 folder).eval()
                c = peft(input_ids=ids).logits
            print(f"{name}: max |logit| difference loaded vs start {float((a - b).abs().max()):.2e}, "
                  f"loaded vs PEFT {float((b - c).abs().max()):.2e}")
        mb = 1 << 20
        print(f"memory: start {start.memory_bytes() / mb:.0f} MB, loaded at runtime {live.memory_bytes() / mb:.0f} MB")

        tok = start.tokenizer("base")
        prompts = [tok.encode(p) for p in ("The capital of Veloria is", "Write 47 in words:", "Hello, my name is",
                                           "Twelve plus nine is", "The sky is", "Write 312 in words:")]
        names = ["base", "facts", "words"] * 2
        width = max(map(len, prompts))
        prompts = [[tok.pad_token_id or 0] * (width - len(p)) + p for p in prompts]
        times = {"start": [], "runtime": []}
        for _ in range(args.repeat):
            times["start"].append(decode_s(start, prompts, names, args.tokens))
            times["runtime"].append(decode_s(live, prompts, names, args.tokens))
        best = {k: min(v) for k, v in times.items()}
        print(f"decode of 6 rows mixed over 3 branches, {args.tokens} tokens (best of {args.repeat}, interleaved): "
              f"start {best['start']:.3f} s, runtime-loaded {best['runtime']:.3f} s "
              f"(ratio {best['runtime'] / best['start']:.3f})")
        stall(live, prompts[:3], ["base", "facts", "words"], adapters)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
