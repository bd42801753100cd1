"""LoRA fine-tunes as branches: two PEFT LoRA adapters of SmolLM2-135M-Instruct, merged straight from their
adapter folders (no merged copies written first), against PEFT's own merged models.

The script trains its adapters on CPU (bench/fidelity_real.py's tasks: ``facts``, 40 invented capitals;
``words``, numbers in hyphenated words scored on numbers never trained on; cached under
bench/.cache/lora/), then merges both adapters as exact LoRA branches (``lora: exact``) and as merged models compressed at several
rates (``lora: merged``), and reports, side by side in one run:
each task's exact-match score of the PEFT model and of its branch, the largest logit difference on the test
prompts, the bundle's bytes against base + adapters, and the merge's time against PEFT's
``merge_and_unload`` + ``save_pretrained`` of each adapter (what a user had to do before); then the decode
time of an exact LoRA branch, of PEFT's unmerged adapter and of a batch mixed over both branches, each
interleaved against the dense merged model.

    python bench/adapters.py [--steps 60] [--rank 16] [--tokens 16] [--repeat 8]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from _common import CACHE, smollm2_folder
from fidelity_real import TASKS, chat_answers, encode_pair, score
import branchmerge
from branchmerge.config import parse_config
from branchmerge.io.writer import claim_output
from branchmerge.merge import run_merge


def train_lora(base: Path, task: str, out: Path, steps: int, rank: int, lr: float = 1e-3, batch: int = 8) -> Path:
    """A PEFT LoRA adapter (every linear layer of the blocks, rank ``rank``, alpha 2·rank) trained on ``task``."""
    if (out / "adapter_model.safetensors").is_file():
        return out
    import random

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    rng = random.Random(1)
    tok = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    train, t0 = TASKS[task][0], time.perf_counter()
    for step in range(steps):
        enc = [encode_pair(tok, q, a) for q, a in (rng.choice(train) for _ in range(batch))]
        width = max(len(ids) for ids, _ in enc)
        ids = torch.full((batch, width), tok.pad_token_id or 0)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for r, (seq, start) in enumerate(enc):
            ids[r, : len(seq)], mask[r, : len(seq)] = torch.tensor(seq), 1
            labels[r, start: len(seq)] = torch.tensor(seq[start:])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            print(f"  {task} step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out


def peft_merged(base: Path, adapter: Path, out: Path):
    """PEFT's merge of ``adapter`` into ``base``, written as a plain folder (timed by the caller)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    merged = model.merge_and_unload().eval()
    merged.save_pretrained(out)
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rates", default="0,0.9,0.95,0.99")
    ap.add_argument("--tokens", type=int, default=16, help="decoded tokens per timed run")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=8, help="interleaved rounds per decode ratio")
    args = ap.parse_args()
    base = smollm2_folder()
    root = CACHE / "lora"
    root.mkdir(parents=True, exist_ok=True)
    adapters = {t: train_lora(base, t, root / f"{t}-r{args.rank}-s{args.steps}", args.steps, args.rank) for t in TASKS}
    tok = AutoTokenizer.from_pretrained(base)

    work = root / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    t = time.perf_counter()
    dense = {name: peft_merged(base, ad, work / f"peft-{name}") for name, ad in adapters.items()}
    peft_s = time.perf_counter() - t
    scores = {name: score(chat_answers(m, tok), name) for name, m in dense.items()}
    prompts = [q for task in TASKS for q, _ in TASKS[task][1][:8]]
    enc = tok([tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
               for q in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        ref = {name: m(**enc).logits for name, m in dense.items()}
    adapter_mb = sum((a / "adapter_model.safetensors").stat().st_size for a in adapters.values()) / 1e6
    base_mb = (base / "model.safetensors").stat().st_size / 2e6  # float32 on disk: its size at bfloat16

    rows = []
    runs = [("exact (lora: exact, any rate)", {"lora": "exact", "compress_rate": 0.95})] + [
        (f"merged, r={r}", {"lora": "merged", "compress_rate": float(r)}) for r in args.rates.split(",")]
    for label, over in runs:
        out = work / f"bundle-{len(rows)}"
        cfg = parse_config({"branches": [{"name": n, "model": f"{base}+{a}"} for n, a in adapters.items()],
                            "dtype": "float32", **over})
        t = time.perf_counter()
        claim_output(out)
        run_merge(cfg, out, force=True, progress=False)
        merge_s = time.perf_counter() - t
        bundle = branchmerge.load(out, dtype="float32")
        got, diff = {}, 0.0
        for name in adapters:
            with bundle.use(name) as m, torch.no_grad():
                diff = max(diff, float((m(**enc).logits - ref[name]).abs().max()))
            got[name] = score(lambda qs, n=name: bundle.generate(qs, n, max_new_tokens=12), name)
        mb = sum(p.stat().st_size for p in out.rglob("*.safetensors")) / 2e6  # stored float32: bf16 size
        rows.append((label, got, diff, mb, merge_s))
        print(f"{label}: {got} max |Δlogit| {diff:.4f} {mb:.0f} MB at bf16, merge {merge_s:.1f}s", flush=True)

    speed = decode_speed(work / "bundle-0", dense, adapters, base, tok, args)

    print(f"\nPEFT merge_and_unload + save_pretrained of both adapters: {peft_s:.1f}s; base {base_mb:.0f} MB "
          f"at bf16, adapters {adapter_mb / 2:.1f} MB at bf16 (rank {args.rank}, {args.steps} steps)\n")
    print("| model | " + " | ".join(TASKS) + " | max abs logit diff vs PEFT | MB at bf16 | merge s |")
    print("|---|" + "---|" * (len(TASKS) + 3))
    print("| PEFT merged (one dense model per adapter) | " + " | ".join(f"{scores[t]:.2f}" for t in TASKS)
          + f" | 0 | {base_mb * len(TASKS):.0f} | {peft_s:.1f} |")
    print("| base + adapters, unmerged (multi-LoRA serving) | " + " | ".join(f"{scores[t]:.2f}" for t in TASKS)
          + f" | 0 | {base_mb + adapter_mb / 2:.0f} | - |")
    for label, got, diff, mb, merge_s in rows:
        print(f"| branchmerge {label} | " + " | ".join(f"{got[t]:.2f}" for t in TASKS)
              + f" | {diff:.4f} | {mb:.0f} | {merge_s:.1f} |")
    print(f"\n| decode time ({args.tokens} tokens after {args.prompt_len}, float32, CPU) | ratio: median "
          "(quartiles) |\n|---|---|")
    print("\n".join(speed))


def decode_speed(bundle_dir: Path, dense: dict, adapters: dict, base: Path, tok, args) -> list[str]:
    """Greedy decode time (``--tokens`` tokens after a ``--prompt-len`` prompt), interleaved against the dense
    merged model (bench/runtime.py's pairing): one exact LoRA branch, PEFT's unmerged adapter (LoRA applied
    on the fly, as serving adapters without merging runs them), and a batch of 8 rows over both branches in one
    pass against 8 rows on one dense model."""
    from peft import PeftModel

    from runtime import decode, mixed_decoder, paired, spread

    bundle = branchmerge.load(bundle_dir, dtype="float32")
    names = list(adapters)
    first = names[0]
    g = bundle.groups["main"]
    ids = torch.randint(100, 20000, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    batch = ids.repeat(8, 1)
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                         adapters[first]).eval()
    ref = dense[first]

    def branch_run() -> None:
        with g.state.select([g.state.index(first)]):
            decode(g.model, ids, args.tokens)

    out = []
    for label, ours, reference in (
            (f"one exact LoRA branch ({first}) vs the dense merged model, batch 1", branch_run,
             lambda: decode(ref, ids, args.tokens)),
            ("PEFT's unmerged adapter vs the dense merged model, batch 1", lambda: decode(unmerged, ids, args.tokens),
             lambda: decode(ref, ids, args.tokens)),
            ("8 rows over both branches in one pass vs 8 rows on one dense model",
             mixed_decoder(bundle, [names[i % 2] for i in range(8)], batch, args.tokens),
             lambda: decode(ref, batch, args.tokens))):
        decode(ref, ids, 2)
        ratios, _ = paired(reference, ours, args.repeat)
        out.append(f"| {label} | {spread(ratios)} |")
        print(out[-1], flush=True)
    return out


if __name__ == "__main__":
    main()
