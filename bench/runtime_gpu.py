"""Inference overhead of a bundle on a GPU, side by side with the dense model in one run (issue: run a bundle).

No weights can travel to a lent GPU machine, so each model is a randomly initialized Llama of a real shape:
``smollm2`` (SmolLM2-135M: hidden 576, 30 layers) and ``1b`` (Llama-3.2-1B's blocks: hidden 2048,
16 layers, 32k vocabulary). Two perturbed copies join it as "fine-tunes"; the three are merged at r=0.95 by
the real pipeline (``run_merge`` with ``device: cuda``) and loaded with ``branchmerge.load``. Speed does
not depend on the weight values: every run generates a fixed number of tokens.

Each model runs two ways:

- **eager**: ``model.generate`` as users call it, every kernel launched from Python;
- **graph**: one decode step over a static KV cache captured in a CUDA graph and replayed, as vLLM
  serves, so the time is the GPU's alone.

Ratios come from rounds of dense / bundle / dense back to back (median and quartiles).

With ``--in-memory 8b`` (the write-up's Llama-3-8B shape), one random model is built in GPU memory and
its block linears are swapped in place for branched ones (three random rank-k factor pairs each): too
large to write to disk three times within a lease. Its rows are CUDA-graph decode steps and a captured
prefill, dense vs branched.

    python bench/runtime_gpu.py [--device cuda] [--shapes smollm2,1b] [--repeat 8] [--tokens 32]
    python bench/runtime_gpu.py --shapes "" --in-memory 1b,8b --layouts split,fused,triton --repeat 6

The ``triton`` layout runs every branched layer as the two kernels of ``branchmerge.runtime.kernels``
(issue 16), q/k/v and gate/up as one call each (``runtime.siblings``), a one-branch prefill of over
256 rows through cuBLAS; ``triton-solo`` (in-memory shapes) runs each layer by itself and prefill in
the kernels too, to show what each choice buys. On a machine without CUDA the script
says so and exits (``--device cpu`` runs it anyway, at the ``tiny`` shape, to check the script).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, StaticCache

import branchmerge
from _common import CACHE
from branchmerge.architectures import registry
from branchmerge.config import parse_config
from branchmerge.family import save_tokenizer
from branchmerge.compress import rank_for
from branchmerge.merge import run_merge
from branchmerge.runtime import kernels
from branchmerge.runtime.generation import cache_arg
from branchmerge.runtime.modules import BranchedLinear, BranchState
from branchmerge.runtime.siblings import group_siblings
from runtime import decode, mixed_decoder, paired, prefill, spread

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=True, rope_theta=500000.0),
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_models(shape: str, dev: torch.device, root: Path) -> list[Path]:
    """A random Llama of ``shape`` and two copies with rank-16 + noise deltas (2 %) on every block weight."""
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    paths = []
    orig = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n}
    g = torch.Generator(device=dev).manual_seed(1)
    for i in range(3):
        out = root / f"m{i}"
        if i:
            for n, p in model.named_parameters():
                if n in orig:
                    w = orig[n].float()
                    m, k = w.shape
                    d = torch.randn(m, 16, generator=g, device=dev) @ torch.randn(16, k, generator=g, device=dev)
                    d += 0.1 * torch.randn(m, k, generator=g, device=dev)
                    p.data.copy_(w + d * (0.02 * w.norm() / d.norm()))
        model.save_pretrained(out)
        save_tokenizer(out)  # generate() needs one; any small one will do (speed does not depend on it)
        paths.append(out)
    del model, orig
    return paths


class GraphedStep:
    """One step of ``model`` over ``tokens`` new tokens for ``batch`` rows (1: a decode step; more: a
    prefill) after ``prompt`` cached ones, over a static KV cache, captured in a CUDA graph."""

    def __init__(self, model, batch: int, prompt: int, vocab: int, dev: torch.device, tokens: int = 1) -> None:
        self.cache = StaticCache(config=model.config, max_cache_len=prompt + tokens + 8)
        ids = torch.randint(3, vocab, (batch, prompt), device=dev)
        with torch.no_grad():
            self.arg = cache_arg(model)  # past_key_values, or cache where transformers renamed it
            model(input_ids=ids, **{self.arg: self.cache}, cache_position=torch.arange(prompt, device=dev))
            self.tok = torch.randint(3, vocab, (batch, tokens), device=dev)
            self.pos = torch.arange(prompt, prompt + tokens, device=dev)
            self.model, self.graph = model, None
            # cache layers that count their own length (transformers ≥ 5.2x) are rewound inside the step
            self.lengths = [t for t in (getattr(la, "cumulative_length", None) for la in getattr(self.cache, "layers", []))
                            if isinstance(t, torch.Tensor)]
            self.prompt = prompt
            if dev.type != "cuda":  # the same step, uncaptured (to check this code without a GPU)
                return
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    self.step()
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.step()

    def step(self) -> torch.Tensor:
        for t in self.lengths:
            t.fill_(self.prompt)
        return self.model(input_ids=self.tok, **{self.arg: self.cache}, cache_position=self.pos).logits

    def __call__(self, steps: int = 20) -> None:
        with torch.no_grad():
            for _ in range(steps):
                self.step() if self.graph is None else self.graph.replay()


def floor_of(bdir: Path, dense) -> float:
    """Extra factor bytes of one branch over the dense block weights + lm_head: the overhead floor."""
    man = json.loads((bdir / "manifest.json").read_text())
    extra = sum(r["rank"] * sum(r["shape"]) for r in man["tensors"]["main"].values()
                if r["role"] == "compressed" and r["rank"] > 0 and not r["dense"])
    linear = sum(p.numel() for n, p in dense.named_parameters() if p.ndim == 2 and ".layers." in n)
    return extra / (linear + dense.lm_head.weight.numel())


def bench_shape(shape: str, dev: torch.device, args) -> list[str]:
    root = CACHE / f"gpu-{shape}"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    paths = make_models(shape, dev, root)
    bdir = root / "bundle"
    cfg = parse_config({"branches": [{"name": f"m{i}", "model": str(p)} for i, p in enumerate(paths)],
                        "compress_rate": args.rate, "dtype": "bfloat16", "device": str(dev)})
    run_merge(cfg, bdir, force=True, progress=False)
    dense = AutoModelForCausalLM.from_pretrained(paths[0], dtype=torch.bfloat16).to(dev).eval()
    layouts = {f: branchmerge.load(bdir, device=str(dev), dtype="bfloat16", fused=f == "fused",
                                   kernels="triton" if f.startswith("triton") else "torch")
               for f in args.layouts.split(",")}
    for m in layouts["triton-solo"].groups["main"].model.modules() if "triton-solo" in layouts else ():
        if isinstance(m, BranchedLinear) and m.sibling is not None:
            m.sibling.dissolve()
    vocab = SHAPES[shape]["vocab_size"]
    floor = floor_of(bdir, dense)
    n_dense = sum(p.numel() for p in dense.parameters())
    held = ", ".join(f"{f} {b.memory_bytes() / 1e9:.2f} GB" for f, b in layouts.items())
    print(f"\n## {shape}: {n_dense / 1e6:.0f} M parameters per model, 3 branches at r={args.rate}, bfloat16, "
          f"{dev}; models made and merged in {time.perf_counter() - t0:.0f} s; floor from bytes {floor:+.1%}; "
          f"bundle holds {held} vs {3 * n_dense * 2 / 1e9:.2f} GB for 3 dense", flush=True)
    if any(f.startswith("triton") for f in layouts) and not kernels.STATE["ok"]:
        print(f"the triton layouts run the torch path here: the kernels are off ({kernels.STATE['why']})", flush=True)
    rows = []
    branch, n = "m1", args.repeat
    ids = torch.randint(3, vocab, (1, 16), device=dev)
    long_ids = torch.randint(3, vocab, (1, args.prompt_len), device=dev)
    bids = torch.randint(3, vocab, (8, 16), device=dev)
    names = [f"m{i % 3}" for i in range(8)]
    timed_sync = lambda f: (lambda: (f(), sync()))  # noqa: E731

    def row(label, ratios, invert=False):
        line = f"| {shape} | {label} | {spread(ratios, invert=invert)} |"
        rows.append(line)
        print(line, flush=True)

    if "split" in layouts:  # the layouts compute the same function
        ref = layouts["split"].logits(bids, names).float()
        for f in set(layouts) - {"split"}:
            got = layouts[f].logits(bids, names).float()
            print(f"{f} vs split logits, mixed batch: relative error {((got - ref).norm() / ref.norm()).item():.2e}")
    how = "CUDA graph" if dev.type == "cuda" else "static-cache (not captured)"
    for lay, bundle in layouts.items():
        model = bundle.model(branch)
        g = bundle.groups["main"]
        mixed_decode = mixed_decoder(bundle, names, bids, args.tokens)
        decode(dense, ids, 4), decode(model, ids, 4), mixed_decode()  # warm-up
        prefill(dense, long_ids), prefill(model, long_ids)
        r, _ = paired(timed_sync(lambda: decode(dense, ids, args.tokens)), timed_sync(lambda: decode(model, ids, args.tokens)), n)
        row(f"{lay}: eager decode, batch 1, {args.tokens} tokens: time vs dense", r)
        r, _ = paired(timed_sync(lambda: prefill(dense, long_ids)), timed_sync(lambda: prefill(model, long_ids)), n)
        row(f"{lay}: eager prefill, {args.prompt_len} tokens: time vs dense", r)
        r, _ = paired(timed_sync(lambda: decode(dense, bids, args.tokens)), timed_sync(mixed_decode), n)
        row(f"{lay}: eager mixed batch 8 over 3 branches: throughput vs dense", r, invert=True)
        for b in (1, 8, 32):
            try:
                gd = GraphedStep(dense, b, 128, vocab, dev)
                if b == 1:
                    model = bundle.model(branch)
                else:
                    g.state.set_rows([i % 3 for i in range(b)])
                gb = GraphedStep(g.model, b, 128, vocab, dev)
                r, _ = paired(timed_sync(gd), timed_sync(gb), n * 2)
                what = "one branch" if b == 1 else "mixed over 3 branches"
                row(f"{lay}: {how} decode step, batch {b}, {what}: time vs dense", r)
            except Exception as e:  # a transformers version whose decode step cannot be captured
                print(f"{how}, batch {b}: failed: {type(e).__name__}: {e}"[:400], flush=True)
            finally:
                g.state.set_rows(None)
                torch.cuda.empty_cache() if dev.type == "cuda" else None

    # whole-model generate: eager vs static cache (transformers compiles its decode step to CUDA graphs)
    bundle = layouts.get("triton") or next(iter(layouts.values()))
    static = branchmerge.load(bdir, device=str(dev), dtype="bfloat16", kernels=bundle.kernels, static_cache=True)
    prompt = [list(range(3, 19))]
    made = {}
    for label, b in (("eager", bundle), ("static cache + graphs", static)):
        b.generate_ids(prompt, [branch], max_new_tokens=8)  # warm-up (compiles)
        sync()
        t = time.perf_counter()
        made[label] = b.generate_ids(prompt, [branch], max_new_tokens=args.tokens, min_new_tokens=args.tokens)[0].new_ids
        sync()
        print(f"generate, {label}, kernels={b.kernels}: {args.tokens / (time.perf_counter() - t):.1f} tok/s",
              flush=True)
    print(f"generate: static cache + graphs gives the eager tokens: {made['eager'] == made['static cache + graphs']}",
          flush=True)
    del static
    bundle = next(iter(layouts.values()))
    hot = bundle.materialize(branch)
    model = bundle.model(branch)
    decode(model, ids, 4)
    r, _ = paired(timed_sync(lambda: decode(dense, ids, args.tokens)), timed_sync(lambda: decode(model, ids, args.tokens)), n)
    row(f"hot branch (+{hot / 1e6:.0f} MB): eager decode: time vs dense", r)
    r, _ = paired(timed_sync(lambda: prefill(dense, long_ids)), timed_sync(lambda: prefill(model, long_ids)), n)
    row("hot branch: eager prefill: time vs dense", r)
    del dense, layouts, bundle, model
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    return rows


TRITON_MAX_ROWS = BranchedLinear.triton_max_rows  # the library's own, restored after triton-solo


def branch_in_place(model, rate: float, n: int, fused: bool, triton: bool = False, group: bool = True
                    ) -> tuple[BranchState, list[nn.Module]]:
    """Swap every block linear of ``model`` for a :class:`BranchedLinear` with ``n`` random rank-k factors
    (k from ``rate``), its weight as ``W̄``. For shapes too large to write to disk three times; the
    per-branch norms and embeddings of a real bundle are left out. Returns the state and the replaced
    modules (kept alive: graphs captured before the swap still read their weights)."""
    state = BranchState([f"m{i}" for i in range(n)])
    kept = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and ".layers." in name:
            w = mod.weight.data
            out, inp = w.shape
            k = rank_for((out, inp), rate)
            diffs = [("lowrank", torch.randn(out, k, device=w.device, dtype=w.dtype) * 0.02,
                      torch.randn(k, inp, device=w.device, dtype=w.dtype) * 0.02) for _ in range(n)]
            parent, _, child = name.rpartition(".")
            new = BranchedLinear(state, w, [1.0] * n, diffs, fused=fused)
            new.use_triton = triton
            setattr(model.get_submodule(parent), child, new)
            kept.append(mod)
    if triton and group:
        print(f"sibling groups (q/k/v, gate/up as one call each): {group_siblings(model, registry()['llama'].siblings)}")
    return state, kept


def bench_in_memory(shape: str, dev: torch.device, args, layout: str) -> list[str]:
    """CUDA-graph decode steps and a graph-captured prefill of a ``shape`` Llama, dense vs branched in place."""
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    vocab, n = cfg.vocab_size, args.repeat
    steps = {"decode, batch 1": (1, 128, 1), "decode, batch 8 mixed": (8, 128, 1),
             "decode, batch 32 mixed": (32, 128, 1), f"prefill, {args.prompt_len} tokens": (1, 8, args.prompt_len)}
    # on CUDA the dense steps are graphs captured before the swap; uncaptured (CPU) they need their own copy
    ref = model if dev.type == "cuda" else copy.deepcopy(model)
    dense = {k: GraphedStep(ref, b, p, vocab, dev, t) for k, (b, p, t) in steps.items()}
    nparams = sum(p.numel() for p in model.parameters())
    state, kept = branch_in_place(model, args.rate, 3, fused=layout == "fused", triton=layout.startswith("triton"),
                                  group=layout != "triton-solo")
    # triton-solo also runs a single branch's prefill in the kernels (triton leaves it to cuBLAS)
    BranchedLinear.triton_max_rows = 10**9 if layout == "triton-solo" else TRITON_MAX_ROWS
    kernels.prepare(dev)
    print(f"\n## {shape} in memory: {nparams / 1e9:.2f} B parameters, 3 branches at r={args.rate}, bfloat16, "
          f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    if layout.startswith("triton"):  # the kernels against the torch path at this shape, a mixed batch of 8
        ids = torch.randint(3, vocab, (8, 16), device=dev)
        state.set_rows([i % 3 for i in range(8)])
        with torch.no_grad():
            got = model(input_ids=ids).logits.float()
            branched = [m for m in model.modules() if isinstance(m, BranchedLinear)]
            for m in branched:
                m.use_triton = False
            want = model(input_ids=ids).logits.float()
            for m in branched:
                m.use_triton = True
        state.set_rows(None)
        on = "on" if kernels.STATE["ok"] else f"OFF ({kernels.STATE['why']})"
        print(f"triton vs torch logits, {shape} in memory, mixed batch of 8: relative error "
              f"{((got - want).norm() / want.norm()).item():.2e}; kernels {on}", flush=True)
        if not kernels.STATE["ok"]:  # its rows would time the torch path under the triton name
            print(f"{shape} {layout}: no rows, the kernels are off", flush=True)
            return []
    rows = []
    for label, (b, p, t) in steps.items():
        if b == 1:
            state.set_rows(None)
            state.active = 1
        else:
            state.set_rows([i % 3 for i in range(b)])
        try:
            ours = GraphedStep(model, b, p, vocab, dev, t)
            r, _ = paired(lambda: (dense[label](5), sync()), lambda: (ours(5), sync()), 2 * n)
            line = f"| {shape} (in memory) | {layout}: CUDA graph {label}: time vs dense | {spread(r)} |"
            MEDIANS[(shape, layout, label)] = statistics.median(r)
            rows.append(line)
            print(line, flush=True)
            if layout.startswith("triton") and label in PROFILE_STEPS:
                profile(ours, f"{shape} {layout} {label}")
            del ours
        except Exception as e:
            print(f"{label}: failed: {type(e).__name__}: {e}"[:400], flush=True)
        finally:
            state.set_rows(None)
    if layout.startswith("triton") and kernels.triton is not None and hasattr(kernels, "_expand_tuned"):
        picks = {tuple(k[:6]): str(v) for k, v in getattr(kernels._expand_tuned, "cache", {}).items()}
        print(f"expand tiles picked by autotuning (K_IN, N_OUT, KP, M_BUCKET, M, MIXED): {picks}"[:3000], flush=True)
    del dense, kept, model
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    return rows


PROFILE_STEPS = ("decode, batch 1", "decode, batch 8 mixed")


def profile(step: "GraphedStep", title: str, top: int = 12) -> None:
    """Each kernel's device time in 5 uncaptured steps (where the time of a branched step goes), best effort."""
    try:
        from torch.profiler import ProfilerActivity, profile as prof
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with torch.no_grad(), prof(activities=acts) as p:
            for _ in range(5):
                step.step()
            sync()
        key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        print(f"\nkernels of 5 uncaptured steps, {title} (by {key}):\n"
              + p.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60), flush=True)
    except Exception as e:  # a profiler problem must not cost the measurements
        print(f"profile of {title} failed: {type(e).__name__}: {e}"[:300], flush=True)


MEDIANS: dict[tuple[str, str, str], float] = {}  # (shape, layout, step) → median time ratio, in-memory rows
TARGETS = {"decode, batch 1": 1.08, "decode, batch 8 mixed": 1.15, "prefill": 1.08}  # issue 16, at 8B


def verdicts() -> list[str]:
    """Issue 16's targets against the in-memory medians: one line per (shape, layout, step) with a target."""
    out = []
    for (shape, layout, label), ratio in MEDIANS.items():
        target = next((t for k, t in TARGETS.items() if label.startswith(k)), None)
        if target is not None:
            out.append(f"| {shape} | {layout} | {label} | {ratio:.3f} | ≤ {target} | "
                       f"{'met' if ratio <= target else 'missed'} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="smollm2,1b")
    ap.add_argument("--rate", type=float, default=0.95)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--layouts", default="split,fused,triton",
                    help="branched-layer layouts to measure: split, fused (load(fused=...)), triton (load(kernels=...)), "
                         "triton-solo (in-memory only: no sibling groups)")
    ap.add_argument("--in-memory", default="", help="shapes (e.g. 8b) to branch in place, without files")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: this benchmark needs a lent GPU. The kernels' correctness is tested on the CPU "
              "in Triton's interpreter (tests/test_kernels.py, make test-kernels).")
        return
    if dev.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"transformers {__import__('transformers').__version__}")
    rows = []
    for shape in filter(None, args.shapes.split(",")):
        rows += bench_shape(shape, dev, args)
    for shape in filter(None, args.in_memory.split(",")):
        rows += [r for lay in args.layouts.split(",") for r in bench_in_memory(shape, dev, args, lay)]
    print(f"\n{args.repeat} rounds of dense / bundle / dense (graph rows: {2 * args.repeat} rounds of 20 replays); "
          "median ratio (quartiles)\n\n| model | measurement | ratio |\n|---|---|---|")
    print("\n".join(rows))
    if MEDIANS:
        print("\nIssue 16's targets (median time vs dense; they are set for the 8B shape)\n\n"
              "| shape | layout | step | ratio | target | |\n|---|---|---|---|---|---|")
        print("\n".join(verdicts()))


if __name__ == "__main__":
    main()
