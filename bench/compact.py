"""Compact branches: worst-task retention against the bytes of each branch's compressed difference.

For the skills family (4 branches) and the real SmolLM2-135M fine-tunes of bench/fidelity_real.py's recipe
(`facts`, `words`), at fractions of the factor bytes a uniform r=0.95 uses today (F95), measured side by
side in one run:

* uniform rate (today), at the rate that spends the bytes;
* byte budget, ranks allocated by spectra (16-bit factors), + int8 factors, + mixed 8/4-bit;
* baselines at equal bytes beside the same W̄ (delta-compression literature): BitDelta sign (one point:
  one bit per entry), DARE drop-and-rescale, magnitude top-k.

x = bytes of a branch's compressed differences (factors, their scales; or the baseline's storage),
the per-branch tensors every method keeps (embeddings, norms) left out; retention = min over tasks of
(branch accuracy / its fine-tune's). Also: what per-branch ranks would buy over one rank per tensor (from
the spectra), the 48 GB table with the best setting, and decode speed and memory of a quantized branch
(dequantized at load vs kept quantized) against the dense model on this CPU.

    python bench/compact.py [--skip-real] [-n 100] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from _common import CACHE, ROOT
import branchmerge
from branchmerge.architectures import for_hf_config
from branchmerge.compress import frobenius_scale, normalize
from branchmerge.compress.allocate import allocate, spectrum
from branchmerge.compress.baselines import DELTA_CODECS
from branchmerge.config import parse_config
from branchmerge.merge import run_merge

OURS = {  # label → config fields
    "uniform rate (today)": {},
    "budget, 16-bit factors": {"factor_bits": 16},
    "budget + int8 factors": {"factor_bits": 8},
    "budget + mixed 8/4-bit": {"factor_bits": "mixed"},
}
BASELINES = ("bitdelta", "dare", "topk")


def factor_bytes(man: dict) -> float:
    """Per-branch bytes of the compressed differences in a bundle manifest."""
    total, n = 0, 0
    for g, recs in man["tensors"].items():
        nb = len(man["groups"][g]["branches"])
        n = max(n, nb)
        for r in recs.values():
            if r["role"] == "compressed":
                m, k = r["shape"]
                esize = {"float32": 4, "bfloat16": 2, "float16": 2}[man["dtype"]]
                total += r["bytes"] - m * k * esize - 4 * nb
    return total / n


class Setup:
    """One family of fine-tunes: folders, a scorer, the fine-tunes' own accuracy."""

    def __init__(self, name: str, folders: dict[str, Path], score_bundle, score_state, tasks):
        self.name, self.folders, self.score_bundle, self.score_state, self.tasks = name, folders, score_bundle, score_state, tasks
        self.branches = [{"name": b, "model": str(p)} for b, p in folders.items()]


def retention(acc: dict[str, float], ft: dict[str, float]) -> float:
    return min(acc[t] / ft[t] if ft[t] else 1.0 for t in ft)


def run_ours(setup: Setup, work: Path, label: str, frac: float, ref: dict, dtype: str) -> tuple[float, dict]:
    extra = OURS[label]
    data = {"branches": setup.branches, "dtype": dtype}
    if not extra:
        data["compress_rate"] = 1 - 0.05 * frac
    else:
        data.update(extra, budget={"total_bytes": int(ref["fixed"] + frac * ref["F95"] * len(setup.branches)),
                                   "max_rank_factor": 3.0})
    out = work / "bundle"
    man = run_merge(parse_config(data), out, force=True, progress=False, check_load=False)
    b = branchmerge.load(out, verify=False, dtype="float32")
    return factor_bytes(man), setup.score_bundle(b)


def baseline_states(setup: Setup, codec: str, frac: float, ref: dict, esize: int) -> dict[str, dict]:
    """Per branch, the fine-tune's state dict with every compressed weight replaced by s_i·(W̄ + codec(Δ_i))."""
    states = {b: load_file(str(p / "model.safetensors")) for b, p in setup.folders.items()}
    cfg = json.loads((next(iter(setup.folders.values())) / "config.json").read_text())
    arch = for_hf_config(cfg)
    first = next(iter(states.values()))
    comp = [k for k, t in first.items() if arch.role(k, tuple(t.shape)) == "compress"]
    dense_total = sum(first[k].numel() for k in comp)
    budget = frac * ref["F95"]
    gen = torch.Generator().manual_seed(0)
    spent = {b: 0 for b in states}
    for k in comp:
        scales = {b: frobenius_scale(s[k]) for b, s in states.items()}
        hats = {b: normalize(s[k], scales[b]) for b, s in states.items()}
        mean = (sum(hats.values()) / len(hats)).to(torch.bfloat16 if esize == 2 else torch.float32).float()
        nbytes = int(budget * first[k].numel() / dense_total)
        for b, s in states.items():
            approx, used = DELTA_CODECS[codec].fn(hats[b] - mean, nbytes, esize=esize, generator=gen)
            s[k] = ((mean + approx) * scales[b]).to(s[k].dtype)
            spent[b] += used
    return {"states": states, "bytes": sum(spent.values()) / len(spent)}


def measure(setup: Setup, work: Path, fracs: list[float], dtype: str, rows: list) -> dict:
    esize = 2 if dtype == "bfloat16" else 4
    ft = setup.score_state({b: load_file(str(p / "model.safetensors")) for b, p in setup.folders.items()})
    man = run_merge(parse_config({"branches": setup.branches, "dtype": dtype, "compress_rate": 0.95}),
                    work / "bundle", force=True, progress=False, check_load=False)
    f95 = factor_bytes(man)
    ref = {"F95": f95, "fixed": man["total_bytes"] - f95 * len(setup.branches)}
    print(f"\n[{setup.name}] fine-tunes: {ft}; F95 = {f95 / 1e3:.1f} KB per branch", flush=True)
    for label in OURS:
        for frac in fracs:
            t = time.perf_counter()
            nb, acc = run_ours(setup, work, label, frac, ref, dtype)
            rows.append((setup.name, label, frac, nb / f95, acc, retention(acc, ft)))
            print(f"  {label:26s} @{frac:.2f}·F95: bytes {nb / f95:.3f}·F95  {acc}  retention "
                  f"{retention(acc, ft):.1%} ({time.perf_counter() - t:.0f}s)", flush=True)
    for codec in BASELINES:
        for frac in ([1.0] if codec == "bitdelta" else fracs):
            t = time.perf_counter()
            st = baseline_states(setup, codec, frac, ref, esize)
            acc = setup.score_state(st["states"])
            rows.append((setup.name, f"baseline: {codec}", frac, st["bytes"] / f95, acc, retention(acc, ft)))
            print(f"  baseline: {codec:16s} @{frac:.2f}·F95: bytes {st['bytes'] / f95:.3f}·F95  {acc}  retention "
                  f"{retention(acc, ft):.1%} ({time.perf_counter() - t:.0f}s)", flush=True)
    return ref


def per_branch_vs_shared(setup: Setup, fracs: list[float], ref: dict, esize: int) -> list[tuple[float, float]]:
    """Summed squared error of the differences (objective 'delta') with one rank per tensor shared by the
    branches (what the merge does) vs a rank per tensor and branch, at the same bytes, from exact spectra."""
    states = {b: load_file(str(p / "model.safetensors")) for b, p in setup.folders.items()}
    cfg = json.loads((next(iter(setup.folders.values())) / "config.json").read_text())
    arch = for_hf_config(cfg)
    first = next(iter(states.values()))
    shared, per = [], []
    for k, t in first.items():
        if arch.role(k, tuple(t.shape)) != "compress":
            continue
        m, n = t.shape
        hats = {b: normalize(s[k], frobenius_scale(s[k])) for b, s in states.items()}
        mean = sum(hats.values()) / len(hats)
        s2s, tot = [], 0.0
        for b in hats:
            sv = torch.linalg.svdvals(hats[b] - mean) ** 2
            s2s.append(sv)
            tot += float(sv.sum())
        cost = (m + n) * esize
        shared.append(spectrum(k, sum(s2s) / tot, 1.0, {16: cost * len(hats)}))
        per.extend(spectrum(f"{k}|{i}", s / tot, float(s.sum()) / tot, {16: cost}) for i, s in enumerate(s2s))
    out = []
    for frac in fracs:
        budget = int(frac * ref["F95"] * len(states))
        out.append((allocate(shared, budget, (16,)).error, allocate(per, budget, (16,)).error))
    return out


def family_setup(n: int) -> Setup:
    from branchmerge.family import SKILLS, accuracy, build_family, hf_generate
    from transformers import AutoModelForCausalLM

    fam = build_family(progress=True)
    folders = {s: fam[s] for s in SKILLS}

    def score_bundle(b):
        return {s: accuracy(lambda ps, s=s: b.generate(ps, s, max_new_tokens=12), s, n) for s in SKILLS}

    def score_state(states):
        out = {}
        for s in SKILLS:
            model = AutoModelForCausalLM.from_pretrained(folders[s], dtype=torch.float32).eval()
            model.load_state_dict({k: v.float() for k, v in states[s].items()}, strict=False)
            out[s] = accuracy(lambda ps: hf_generate(model, ps), s, n)
        return out

    return Setup("skills family", folders, score_bundle, score_state, SKILLS)


def real_setup(steps: int) -> Setup:
    sys.path.insert(0, str(ROOT))
    import fidelity_real as fr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from _common import smollm2_folder

    base = smollm2_folder()
    folders = {t: fr.finetune(base, t, CACHE / "real" / f"ft-{t}-{steps}", steps) for t in fr.TASKS}  # cached

    def score_bundle(b):
        return {t: fr.score(lambda qs, t=t: b.generate(qs, t, max_new_tokens=12), t) for t in fr.TASKS}

    def score_state(states):
        out = {}
        for t in fr.TASKS:
            tok = AutoTokenizer.from_pretrained(folders[t])
            model = AutoModelForCausalLM.from_pretrained(folders[t], dtype=torch.float32).eval()
            model.load_state_dict({k: v.float() for k, v in states[t].items()}, strict=False)
            gen = fr.chat_answers(model, tok)
            out[t] = fr.score(gen, t)
        return out

    return Setup("SmolLM2-135M fine-tunes", folders, score_bundle, score_state, fr.TASKS)


def pareto_png(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = sorted({r[0] for r in rows})
    fig, axes = plt.subplots(1, len(setups), figsize=(6.5 * len(setups), 4.6), squeeze=False)
    for ax, name in zip(axes[0], setups):
        for label in [*OURS, *(f"baseline: {c}" for c in BASELINES)]:
            pts = sorted((r[3], r[5]) for r in rows if r[0] == name and r[1] == label)
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-" if "baseline" not in label else "s--",
                        label=label)
        ax.axhline(99, color="grey", lw=0.6, ls=":")
        ax.axhline(95, color="grey", lw=0.6, ls=":")
        ax.set_xlabel("bytes of each branch's compressed difference (× uniform r=0.95's)")
        ax.set_ylabel("worst-task retention vs fine-tune (%)")
        ax.set_title(name)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def decode_speed(work: Path, folders: dict[str, Path], ref: dict, rounds: int = 5, tokens: int = 24) -> None:
    """Decode tokens/s at batch 1: the dense model vs a uniform r=0.95 bundle branch vs a mixed 8/4 branch
    at F95/3 (dequantized at load, and kept quantized in memory); interleaved rounds, medians; and the
    memory each holds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = list(folders)
    branches = [{"name": b, "model": str(p)} for b, p in folders.items()]
    uni, mixed = work / "speed-uniform", work / "speed-mixed"
    run_merge(parse_config({"branches": branches, "dtype": "bfloat16", "compress_rate": 0.95}), uni, force=True,
              progress=False, check_load=False)
    budget = int(ref["fixed"] + ref["F95"] * len(branches) / 3)
    run_merge(parse_config({"branches": branches, "dtype": "bfloat16", "budget": {"total_bytes": budget},
                            "factor_bits": "mixed"}), mixed, force=True, progress=False, check_load=False)
    tok = AutoTokenizer.from_pretrained(folders[names[0]])
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    dense = AutoModelForCausalLM.from_pretrained(folders[names[0]], dtype=torch.float32).eval()
    models = {"dense model": lambda: dense.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)}
    mem = {"dense model": sum(p.numel() * p.element_size() for p in dense.parameters())}
    for label, out, how in (("bundle r=0.95 (today)", uni, None), ("bundle mixed 8/4 at F95/3, dequantized", mixed,
                                                                     "dequantize"),
                            ("bundle mixed 8/4 at F95/3, kept quantized", mixed, "quantized")):
        b = branchmerge.load(out, verify=False, dtype="float32", factors=how)
        g = b.groups["main"]
        mem[label] = sum(t.numel() * t.element_size() for t in [*g.model.parameters(), *g.model.buffers()])

        def run(b=b, g=g):
            with g.state.select(branch=g.state.index(names[0])), torch.no_grad():
                return g.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        models[label] = run
    times: dict[str, list[float]] = {k: [] for k in models}
    for k in models:
        models[k]()  # warm-up
    for _ in range(rounds):
        for k, f in models.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"\ndecode, batch 1, {tokens} tokens, float32 on this CPU (bench/runtime.py's setting), {rounds} interleaved rounds (medians); "
          f"bundles hold both branches:")
    print("| model | tok/s | time vs dense | weights held (MB) |\n|---|---|---|---|")
    for k in models:
        print(f"| {k} | {tokens / med[k]:.1f} | {med[k] / med['dense model']:.3f} | {mem[k] / 1e6:.1f} |")


def table_48gb(best_label: str, bits_per_factor_byte: float) -> None:
    """How many Llama-3-8B branches fit in 48 GB beside a standalone Phi-3-small (bfloat16, from shapes)."""
    sys.path.insert(0, str(ROOT))
    from runtime import shape_table

    rows = dict(shape_table())
    mean = rows["shared W̄ of the Llama-3-8B group (once)"]
    f95 = rows["low-rank U_i, V_i (3 branches)"] / 3
    emb = rows["embeddings + lm_head (3 branches)"] / 3
    phi = rows["Phi-3-small standalone branch"]
    reserve = 8e9
    room = 48e9 - mean - phi - reserve
    print(f"\n48 GB, bfloat16, from shapes: shared W̄ {mean / 1e9:.2f} GB + Phi-3-small {phi / 1e9:.2f} GB + 8 GB kept for "
          f"KV cache/activations leaves {room / 1e9:.2f} GB for Llama-3-8B branches")
    print("| per branch | factors GB | + embeddings/lm_head GB | branches that fit (fine-tunes that changed the "
          "embeddings) | (that left them alone) |\n|---|---|---|---|---|")
    for label, fb in (("uniform r=0.95 (today)", f95), (f"{best_label} at F95/3", f95 * bits_per_factor_byte)):
        print(f"| {label} | {fb / 1e9:.3f} | {(fb + emb) / 1e9:.3f} | {int(room // (fb + emb))} | {int(room // fb)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=100, help="prompts per skill (skills family)")
    ap.add_argument("--skip-real", action="store_true", help="skip the SmolLM2 fine-tunes")
    ap.add_argument("--speed-only", action="store_true", help="only the decode speed and memory rows")
    ap.add_argument("--steps", type=int, default=60, help="fine-tuning steps of the SmolLM2 fine-tunes (cached; "
                    "60 is what bench/model_selection.py builds)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    work = CACHE / "compact"
    work.mkdir(parents=True, exist_ok=True)
    rows: list = []
    if args.speed_only:
        real = real_setup(args.steps)
        man = run_merge(parse_config({"branches": real.branches, "dtype": "bfloat16", "compress_rate": 0.95}),
                        work / "bundle", force=True, progress=False, check_load=False)
        f95 = factor_bytes(man)
        decode_speed(work, real.folders, {"F95": f95, "fixed": man["total_bytes"] - f95 * len(real.branches)})
        return
    fam = family_setup(args.n)
    ref = measure(fam, work, [0.1, 0.25, 1 / 3, 0.5, 1.0], "bfloat16", rows)
    pb = per_branch_vs_shared(fam, [1 / 3, 1.0], ref, 2)
    real = None
    if not args.skip_real:
        real = real_setup(args.steps)
        ref_r = measure(real, work, [0.1, 1 / 3, 1.0], "bfloat16", rows)
        pb_r = per_branch_vs_shared(real, [1 / 3, 1.0], ref_r, 2)
    print("\n| setup | method | bytes (×F95) | " + "accuracy per task | worst-task retention |\n|---|---|---|---|---|")
    for name, label, frac, x, acc, ret in rows:
        print(f"| {name} | {label} | {x:.3f} | " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()) + f" | {ret:.1%} |")
    for name in sorted({r[0] for r in rows}):
        at = {}
        for target in (1.0, 1 / 3):
            best = max((r for r in rows if r[0] == name and "baseline" not in r[1] and abs(r[2] - target) < 1e-6),
                       key=lambda r: r[5])
            base = max((r[5] for r in rows if r[0] == name and "baseline" in r[1] and r[3] <= best[3] * 1.02),
                       default=float("nan"))
            at[target] = (best, base)
        print(f"\n{name}: at F95, best of ours {at[1.0][0][1]} keeps {at[1.0][0][5]:.1%} (target ≥ 99%); at F95/3, "
              f"{at[1 / 3][0][1]} keeps {at[1 / 3][0][5]:.1%} (target ≥ 95%); best baseline at no more bytes: "
              f"{at[1.0][1]:.1%} and {at[1 / 3][1]:.1%}")
    for name, res in [("skills family", pb)] + ([("SmolLM2 (two branches: their differences from the mean are "
                                                  "opposite, so their spectra are equal)", pb_r)] if real else []):
        print(f"{name}: per-branch ranks instead of one per tensor would change the summed error of the differences "
              + ", ".join(f"{s:.3f} → {p:.3f}" for s, p in res) + " (at F95/3, F95)")
    pareto_png(rows, ROOT / "compact.png")
    print(f"wrote {ROOT / 'compact.png'}")
    if real:
        decode_speed(work, real.folders, ref_r)
    table_48gb("budget + mixed 8/4-bit", 1 / 3)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
